"""gunicorn settings for the web process (values can be overridden by the environment)."""

import os
import shutil
import tempfile

# Prometheus metrics of all workers are merged from files in one directory (docs/metrics.md). It
# must be set before any worker imports prometheus_client; a Celery worker on the same host that
# shares it shows up in the same /metrics.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir = tempfile.mkdtemp(prefix="counterservice-metrics-")
else:
    _own_metrics_dir = None

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8080')}"

# Each worker is one uvicorn event loop (counterproject.workers): the hot endpoints are served by
# the async fast lane, whose Redis round trips are shared by every request in flight; the rest of
# Django runs on a pool of GUNICORN_THREADS threads per worker (counterproject.threaded_wsgi), as
# gthread ran it before. One process per usable core (taskset/cgroup aware). bench/README.md.
workers = int(os.environ.get("WEB_CONCURRENCY", len(os.sched_getaffinity(0))))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "counterproject.workers.CounterWorker")
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
# Game servers keep connections open: keep them longer than a typical client pause.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "30"))
# Up to 400 keep-alive clients per worker (the wrk -c400 of docs/requirements.md) must not be turned away.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))

# SIGTERM: stop accepting, let requests in flight finish for up to graceful_timeout, then exit.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))

# A safety net against slow leaks; the soak test shows memory is flat without it. Each recycle stops
# the worker's requests for about as long as a new worker takes to import Django (about a second
# here): at 100,000 requests that came every 15 s of a busy fast-lane worker and was its P99 at
# c16 (850 ms against 4 ms without it, bench/README.md). Millions: every few minutes at full load.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "5000000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "500000"))

# gunicorn's runtime control socket sits at one fixed path per user: several servers on one
# host (tests, benchmarks) would fight over it, and nothing here uses it.
control_socket_disable = True

accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"


def on_starting(server) -> None:
    """A shared metrics directory may hold live gauges of processes of an earlier run: drop them."""
    from metrics.processes import dead_processes_forget

    dead_processes_forget()


def child_exit(server, worker) -> None:
    """A worker that exited (recycled, killed) no longer counts in the live gauges of /metrics."""
    from metrics.processes import process_dead

    process_dead(pid=worker.pid)


def on_exit(server) -> None:
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
