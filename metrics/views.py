"""GET /metrics: the Prometheus text format, for a bearer token or a caller on an allowed network."""

import hmac
import ipaddress
import os

from django.conf import settings
from django.http import HttpResponse
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from counters.api_errors import error_response
from counters.errors import AuthenticationRequired, Forbidden, MethodNotAllowed

from . import definitions  # noqa: F401 (the metrics register on import)
from .scrape import StoreCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _bearer(request) -> str:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


def caller_allowed(request) -> bool:
    """A valid token, or a peer address inside METRICS_ALLOWED_NETWORKS (the socket's, never a header's)."""
    token = _bearer(request)
    if token and settings.METRICS_TOKEN and hmac.compare_digest(token.encode(), settings.METRICS_TOKEN.encode()):
        return True
    try:
        peer = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(peer in network for network in settings.METRICS_ALLOWED_NETWORKS)


def process_metrics() -> bytes:
    """Every process's metrics when PROMETHEUS_MULTIPROC_DIR is set, else this process's own."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def metrics(request) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        return error_response(MethodNotAllowed(f"Method {request.method} not allowed. Use GET."), "rest")
    if not caller_allowed(request):
        if _bearer(request):
            return error_response(Forbidden("The metrics token is not valid."), "rest")
        return error_response(
            AuthenticationRequired("Metrics need a bearer token or a caller on an allowed network."), "rest"
        )
    store = CollectorRegistry(auto_describe=False)
    store.register(StoreCollector())
    return HttpResponse(process_metrics() + generate_latest(store), content_type=CONTENT_TYPE)
