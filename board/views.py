"""The ops-room board: a read-only page of an app's public counters. It reads a small JSON endpoint,
then follows the values over server-sent events (GET /api/v1/stream), polling if a stream fails."""

from django.conf import settings
from django.http import Http404
from django.shortcuts import render
from rest_framework.response import Response
from rest_framework.views import APIView

from counters import selectors
from counters.clock import iso_utc
from counters.config import DEFAULT_APP_SLUG

from .selectors import board_get


def _app_slug(request) -> str:
    return request.GET.get("app") or DEFAULT_APP_SLUG


def board_page(request):
    slug = _app_slug(request)
    if selectors.app_id_get(slug) is None:
        raise Http404(f"App {slug!r} not found.")
    context = {"app_slug": slug, "poll_ms": settings.BOARD_POLL_MILLISECONDS, "stream": settings.BOARD_STREAM}
    return render(request, "board/board.html", context)


class BoardValuesView(APIView):
    """GET /board/values?app=<slug>: the public counters' values; ``degraded`` while read from PostgreSQL."""

    error_shape = "rest"

    def get(self, request) -> Response:
        board = board_get(app_slug=_app_slug(request))
        body = {
            "app": board.app_slug,
            "degraded": board.degraded,
            "counters": [
                {
                    "name": v.counter.name,
                    "display_name": v.counter.display_name or v.counter.name,
                    "unit": v.counter.unit,
                    "value": v.value,
                    "last_updated": iso_utc(v.last_updated),
                }
                for v in board.values
            ],
        }
        headers = {"Cache-Control": "no-store", "X-Counter-Source": "database" if board.degraded else "redis"}
        return Response(body, headers=headers)
