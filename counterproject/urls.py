from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from alerts.apis import MessageListView, ThresholdDetailView, ThresholdListView
from archive.apis import CounterBatchResetView, CounterHistoryView
from counters import functions
from counters.apis import CounterBatchUpdateView, CounterBatchView, CounterStreamView, CounterViewSet, healthz
from metrics.views import metrics

counter_read = CounterViewSet.as_view({"get": "retrieve"})
counter_increment = CounterViewSet.as_view({"post": "increment"})
counter_decrement = CounterViewSet.as_view({"post": "decrement"})
counter_reset = CounterViewSet.as_view({"post": "reset"})
counter_heartbeat = CounterViewSet.as_view({"post": "heartbeat"})

urlpatterns = [
    path("api/v1/counter/<str:name>", counter_read, name="counter-detail"),
    path("api/v1/counter/<str:name>/increment", counter_increment, name="counter-increment"),
    path("api/v1/counter/<str:name>/decrement", counter_decrement, name="counter-decrement"),
    path("api/v1/counter/<str:name>/reset", counter_reset, name="counter-reset"),
    path("api/v1/counter/<str:name>/heartbeat", counter_heartbeat, name="counter-heartbeat"),
    path("api/v1/counter/<str:name>/history", CounterHistoryView.as_view(), name="counter-history"),
    path("api/v1/counter/<str:name>/thresholds", ThresholdListView.as_view(), name="counter-thresholds"),
    path(
        "api/v1/counter/<str:name>/thresholds/<int:threshold_id>",
        ThresholdDetailView.as_view(),
        name="counter-threshold-detail",
    ),
    path("api/v1/alerts/messages", MessageListView.as_view(), name="alert-messages"),
    path("api/v1/counters", CounterBatchView.as_view(), name="counter-batch"),
    path("api/v1/stream", CounterStreamView.as_view(), name="counter-stream"),
    path("api/v1/counters/reset", CounterBatchResetView.as_view(), name="counter-batch-reset"),
    path("api/v1/functions/getCounter", functions.GetCounterView.as_view(), name="fn-getCounter"),
    path("api/v1/functions/increaseCounter", functions.IncreaseCounterView.as_view(), name="fn-increaseCounter"),
    path("api/v1/functions/decreaseCounter", functions.DecreaseCounterView.as_view(), name="fn-decreaseCounter"),
    path("api/v1/functions/resetCounter", functions.ResetCounterView.as_view(), name="fn-resetCounter"),
    path("api/v1/functions/getCounterStats", functions.GetCounterStatsView.as_view(), name="fn-getCounterStats"),
    path("api/v1/functions/<str:name>", functions.UnknownFunctionView.as_view(), name="fn-unknown"),
    path("api/v1/stats", functions.StatsView.as_view(), name="stats"),
    path("api/v1/player-tokens", functions.PlayerTokenView.as_view(), name="player-tokens"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/v1/counters/batch", CounterBatchUpdateView.as_view(), name="counter-batch-update"),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("board/", include("board.urls")),
]

handler404 = "counters.api_errors.not_found"
handler500 = "counters.api_errors.server_error"
