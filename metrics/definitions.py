"""Every metric written by a web or Celery process, under one prefix, in base units.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before this module is imported, as
gunicorn.conf.py and the Procfile do) each process writes its own files there and ``/metrics``
merges them; gauges say how (``livemax``: the highest value among processes still alive).
Labels never carry a user id: endpoints are route names, counters appear only in the scrape-time
collector, and only those listed in ``METRICS_COUNTERS``.
"""

import os

from prometheus_client import Counter, Gauge, Histogram, values

PREFIX = "counterservice"

# In multiprocess mode the values are ``process_values.ProcessValue``: prometheus_client's own, with
# the process id kept rather than asked of the kernel on every write, and several values added under
# one lock (a request's count and duration).
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    from .process_values import ProcessValue

    values.ValueClass = ProcessValue

# Seconds: a hot request takes about a millisecond; anything past a second is an outage.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000, 100000)

http_requests = Counter(
    f"{PREFIX}_http_requests",
    "HTTP requests answered, by surface, route name, method and status code.",
    ["surface", "endpoint", "method", "status"],
)
http_request_duration = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "Time from the request reaching the application to its response, by surface and route name.",
    ["surface", "endpoint"],
    buckets=LATENCY_BUCKETS,
)
redis_round_trips = Counter(
    f"{PREFIX}_redis_round_trips",
    "Round trips to the Redis counter store (a pipeline is one), by outcome.",
    ["outcome"],
)
redis_batch_size = Histogram(
    f"{PREFIX}_redis_batch_size",
    "Updates sent to Redis in one pipelined round trip.",
    buckets=SIZE_BUCKETS,
)
redis_breaker_open = Gauge(
    f"{PREFIX}_redis_breaker_open",
    "1 while the circuit breaker around a Redis node is open in some live process, else 0.",
    ["node"],
    multiprocess_mode="livemax",
)
degraded_reads = Counter(
    f"{PREFIX}_degraded_reads",
    "Reads answered from PostgreSQL because Redis was unavailable.",
)
flush_runs = Counter(
    f"{PREFIX}_flush_runs",
    "Runs of the write-behind flusher, by outcome (ok, locked_out, error).",
    ["outcome"],
)
flush_duration = Histogram(
    f"{PREFIX}_flush_duration_seconds",
    "Duration of one flusher run that held the lock.",
    buckets=TASK_BUCKETS,
)
flush_deltas = Histogram(
    f"{PREFIX}_flush_deltas",
    "Operations (increments and decrements) written to PostgreSQL by one flusher run.",
    buckets=(0, *SIZE_BUCKETS),
)
flush_rows = Histogram(
    f"{PREFIX}_flush_rows",
    "Value rows and unique members upserted into PostgreSQL by one flusher run.",
    buckets=(0, *SIZE_BUCKETS),
)
archive_runs = Counter(
    f"{PREFIX}_archive_runs",
    "Runs of the period archive, by outcome (ok, locked_out, flush_busy, error).",
    ["outcome"],
)
archive_duration = Histogram(
    f"{PREFIX}_archive_duration_seconds",
    "Duration of one archive run that held the lock.",
    buckets=TASK_BUCKETS,
)
archived_periods = Counter(
    f"{PREFIX}_archived_periods",
    "Closed periods (of one counter) written to the archive.",
)
alert_deliveries = Counter(
    f"{PREFIX}_alert_deliveries",
    "Delivery attempts of threshold alerts, by channel kind and outcome (sent, retrying, failed).",
    ["channel", "outcome"],
)
celery_tasks = Counter(
    f"{PREFIX}_celery_tasks",
    "Celery tasks finished in a worker, by task name and final state.",
    ["task", "state"],
)
celery_task_duration = Histogram(
    f"{PREFIX}_celery_task_duration_seconds",
    "Run time of Celery tasks in a worker, by task name.",
    ["task"],
    buckets=TASK_BUCKETS,
)
streams_open = Gauge(
    f"{PREFIX}_streams_open",
    "Server-sent event streams (GET /api/v1/stream) open, summed over the live web processes.",
    multiprocess_mode="livesum",
)
stream_channels = Gauge(
    f"{PREFIX}_stream_channels",
    "Redis channels (one per counter watched) the web processes' stream hubs subscribe to, summed.",
    multiprocess_mode="livesum",
)
stream_events = Counter(
    f"{PREFIX}_stream_events",
    "Values sent on server-sent event streams (the initial values and every change).",
)
