"""Counts and times every request Django answers, labelled by surface and route name."""

from .recorders import Stopwatch, request_record, surface_of

UNMATCHED = "unmatched"


class RequestMetricsMiddleware:
    """Outermost middleware: it sees the final status, including 404s and 500s rendered below it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        watch = Stopwatch()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        # The route's name, never the path: a path carries counter names and would grow without bound.
        endpoint = (match.url_name or match.view_name) if match is not None else UNMATCHED
        request_record(
            surface=surface_of(request.path),
            endpoint=endpoint or UNMATCHED,
            method=request.method if request.method in KNOWN_METHODS else "OTHER",
            status=response.status_code,
            seconds=watch.seconds,
        )
        return response


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
