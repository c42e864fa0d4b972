from django.urls import path

from .views import BoardValuesView, board_page

app_name = "board"

urlpatterns = [
    path("", board_page, name="page"),
    path("values", BoardValuesView.as_view(), name="values"),
]
