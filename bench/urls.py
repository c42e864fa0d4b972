"""Bench-only URLs: the production ones, plus a baseline that does one Redis INCRBY and nothing else."""

from django.urls import path
from django_redis import get_redis_connection
from rest_framework.response import Response
from rest_framework.views import APIView

from counterproject.urls import handler404, handler500
from counterproject.urls import urlpatterns as production_urlpatterns

BASELINE_KEY = "bench:baseline"


class BaselineIncrement(APIView):
    """The floor of any DRF endpoint here: DRF's default request machinery and one Redis call."""

    def post(self, request) -> Response:
        return Response({"success": True, "current_value": get_redis_connection("default").incrby(BASELINE_KEY, 1)})


urlpatterns = [*production_urlpatterns, path("bench/baseline/increment", BaselineIncrement.as_view())]

__all__ = ["handler404", "handler500", "urlpatterns"]
