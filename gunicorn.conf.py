"""gunicorn settings for the web process (values can be overridden by the environment)."""

import multiprocessing
import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8080')}"
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2))
worker_class = "sync"
keepalive = 5

# SIGTERM: stop accepting, let requests in flight finish for up to graceful_timeout, then exit.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))

# A safety net against slow leaks; the soak test shows memory is flat without it.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "100000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "10000"))

# gunicorn's runtime control socket sits at one fixed path per user: several servers on one
# host (tests, benchmarks) would fight over it, and nothing here uses it.
control_socket_disable = True

accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"
