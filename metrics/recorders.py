"""What the request path, the store, the flusher, the archive and the alerts call to be counted.

Each function is cheap (a label lookup and an add in this process's memory or mmap file) and never
raises into its caller's work.
"""

import bisect
import time
from urllib.parse import urlsplit

from django.conf import settings

from . import definitions as m
from .process_values import ProcessValue, add_together

REST_PREFIX = "/api/v1/"
FUNCTIONS_PREFIX = "/api/v1/functions/"


def surface_of(path: str) -> str:
    """The API surface of a request path (a fixed, small set: safe as a label)."""
    if path.startswith(FUNCTIONS_PREFIX):
        return "functions"
    if path.startswith(REST_PREFIX):
        return "rest"
    if path.startswith("/board/"):
        return "board"
    if path.startswith("/admin/"):
        return "admin"
    return "other"


class RequestMeter:
    """The request metrics of one label set: a request's count, its duration's sum and its bucket,
    written together (in multiprocess mode under one lock: ``process_values.add_together``)."""

    __slots__ = ("_bounds", "_buckets", "_count", "_sum", "_together")

    def __init__(self, surface: str, endpoint: str, method: str, status: int) -> None:
        count = m.http_requests.labels(surface, endpoint, method, str(status))
        duration = m.http_request_duration.labels(surface, endpoint)
        # The values ``Counter.inc`` and ``Histogram.observe`` would add to.
        self._count, self._sum, self._buckets = count._value, duration._sum, duration._buckets
        self._bounds = duration._upper_bounds
        self._together = isinstance(self._count, ProcessValue)

    def record(self, seconds: float) -> None:
        # Histogram.observe's bucket: the first whose upper bound is at least ``seconds``.
        bucket = self._buckets[bisect.bisect_left(self._bounds, seconds)]
        if self._together:
            add_together(((self._count, 1.0), (self._sum, seconds), (bucket, 1.0)))
        else:
            self._count.inc(1.0)
            self._sum.inc(seconds)
            bucket.inc(1.0)


# The meters by their labels: ``labels()`` takes a lock and checks its arguments on every call, a
# few percent of a fast-lane request (bench/README.md).
_request_meters: dict[tuple, RequestMeter] = {}


def request_meter(*, surface: str, endpoint: str, method: str, status: int) -> RequestMeter:
    """The meter of one label set; a caller that answers the same route often may keep it."""
    key = (surface, endpoint, method, status)
    meter = _request_meters.get(key)
    if meter is None:
        meter = _request_meters[key] = RequestMeter(surface, endpoint, method, status)
    return meter


def request_record(*, surface: str, endpoint: str, method: str, status: int, seconds: float) -> None:
    """One answered request. Also the hook for a server that answers outside Django (a fast lane)."""
    request_meter(surface=surface, endpoint=endpoint, method=method, status=status).record(seconds)


_round_trip_children: dict[bool, object] = {}


def redis_round_trip_record(*, ok: bool) -> None:
    child = _round_trip_children.get(ok)
    if child is None:
        child = _round_trip_children[ok] = m.redis_round_trips.labels("ok" if ok else "error")
    child.inc()


def redis_batch_record(*, size: int) -> None:
    """Updates that shared one pipelined round trip (the batch endpoint; a coalescing lane)."""
    m.redis_batch_size.observe(size)


def redis_node() -> str:
    if getattr(settings, "REDIS_CLUSTER", False):
        return "cluster"
    parts = urlsplit(settings.REDIS_URL)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


def breaker_state_record(*, is_open: bool, node: str | None = None) -> None:
    """``node``: a Redis Cluster node's own breaker; None: the store-wide one (REDIS_URL's first node)."""
    m.redis_breaker_open.labels(node or redis_node()).set(1 if is_open else 0)


def degraded_read_record() -> None:
    m.degraded_reads.inc()


def flush_record(*, outcome: str, seconds: float = 0.0, deltas: int = 0, rows: int = 0) -> None:
    m.flush_runs.labels(outcome).inc()
    if outcome == "ok":
        m.flush_duration.observe(seconds)
        m.flush_deltas.observe(deltas)
        m.flush_rows.observe(rows)


def archive_record(*, outcome: str, seconds: float = 0.0, periods: int = 0) -> None:
    m.archive_runs.labels(outcome).inc()
    if outcome == "ok":
        m.archive_duration.observe(seconds)
        m.archived_periods.inc(periods)


def alert_delivery_record(*, channel: str, outcome: str) -> None:
    m.alert_deliveries.labels(channel, outcome).inc()


def stream_open_record(*, delta: int) -> None:
    """A server-sent event stream opened (+1) or closed (-1)."""
    m.streams_open.inc(delta)


def stream_channels_record(*, count: int) -> None:
    """How many counter channels this process's stream hub subscribes to now."""
    m.stream_channels.set(count)


def stream_events_record(*, count: int) -> None:
    m.stream_events.inc(count)


class Stopwatch:
    """Seconds since it was made (monotonic)."""

    __slots__ = ("_start",)

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start
