from django.contrib import admin
from django.urls import include, path

from archive.apis import CounterBatchResetView, CounterHistoryView
from counters.apis import CounterBatchView, CounterViewSet, healthz

counter_read = CounterViewSet.as_view({"get": "retrieve"})
counter_increment = CounterViewSet.as_view({"post": "increment"})
counter_decrement = CounterViewSet.as_view({"post": "decrement"})
counter_reset = CounterViewSet.as_view({"post": "reset"})

urlpatterns = [
    path("api/v1/counter/<str:name>", counter_read, name="counter-detail"),
    path("api/v1/counter/<str:name>/increment", counter_increment, name="counter-increment"),
    path("api/v1/counter/<str:name>/decrement", counter_decrement, name="counter-decrement"),
    path("api/v1/counter/<str:name>/reset", counter_reset, name="counter-reset"),
    path("api/v1/counter/<str:name>/history", CounterHistoryView.as_view(), name="counter-history"),
    path("api/v1/counters", CounterBatchView.as_view(), name="counter-batch"),
    path("api/v1/counters/reset", CounterBatchResetView.as_view(), name="counter-batch-reset"),
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("board/", include("board.urls")),
]

handler404 = "counters.api_errors.not_found"
handler500 = "counters.api_errors.server_error"
