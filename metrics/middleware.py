"""Counts and times every request Django answers, labelled by surface and route name."""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from .recorders import Stopwatch, request_record, surface_of

UNMATCHED = "unmatched"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetricsMiddleware:
    """Outermost middleware: it sees the final status, including 404s and 500s rendered below it.

    Sync and async capable, so that under ASGI it adds no thread hop to the request.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self._acall(request)
        watch = Stopwatch()
        response = self.get_response(request)
        _record(request, response, watch.seconds)
        return response

    async def _acall(self, request):
        watch = Stopwatch()
        response = await self.get_response(request)
        _record(request, response, watch.seconds)
        return response


def _record(request, response, seconds: float) -> None:
    match = getattr(request, "resolver_match", None)
    # The route's name, never the path: a path carries counter names and would grow without bound.
    endpoint = (match.url_name or match.view_name) if match is not None else UNMATCHED
    request_record(
        surface=surface_of(request.path),
        endpoint=endpoint or UNMATCHED,
        method=request.method if request.method in KNOWN_METHODS else "OTHER",
        status=response.status_code,
        seconds=seconds,
    )
