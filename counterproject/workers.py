"""The gunicorn worker of the web process: uvicorn (uvloop + httptools) serving ``counterproject.asgi``.

gunicorn stays the process manager (worker count, SIGTERM, max_requests recycling); this class maps
the rest of ``gunicorn.conf.py`` onto uvicorn: the graceful timeout bounds how long requests in
flight may finish after SIGTERM, ``worker_connections`` bounds the connections a worker holds, and
the access log keeps gunicorn's ``access_log_format`` (uvicorn's own access log is off).
"""

import gc
import os
import sys
import time
from datetime import timedelta

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker


def _gc_tune() -> None:
    """Once the application is imported: freeze what is there and collect the young rarely.

    Django's modules, settings, URL patterns and the config snapshot are hundreds of thousands of
    objects that live as long as the worker, and Python's default (a collection every 700 new
    container objects) walked them over and over: about 9 % of a fast-lane worker's CPU in GC under
    load (perf, bench/README.md). ``gc.freeze`` moves them out of the collector's sight; a request's
    own objects are nearly all freed by reference counting, so the young generation is collected
    every ``WEB_GC_THRESHOLD`` (default 20,000) allocations. Cyclic garbage is still collected, a
    little later. ``WEB_GC_THRESHOLD=0`` keeps Python's defaults.
    """
    threshold = int(os.environ.get("WEB_GC_THRESHOLD", "20000"))
    if threshold > 0:
        gc.collect()
        gc.freeze()
        gc.set_threshold(threshold, 50, 100)


class CounterServer(Server):
    """uvicorn's server; on shutdown it first ends the open event streams (GET /api/v1/stream),
    which would otherwise hold the worker until the graceful timeout."""

    async def shutdown(self, sockets=None) -> None:
        from counters.fastlane.streams import streams_close_all

        streams_close_all()
        await super().shutdown(sockets=sockets)


class CounterWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools", "access_log": False}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = self.cfg.graceful_timeout
        self.config.limit_concurrency = self.cfg.worker_connections

    async def _serve(self) -> None:
        _gc_tune()
        self._lane_protocol_choose()
        if self.log.access_log_enabled:
            self.wsgi = AccessLog(self.wsgi, self.log)
        # UvicornWorker._serve, with the server that ends the streams on shutdown.
        self.config.app = self.wsgi
        server = CounterServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def _lane_protocol_choose(self) -> None:
        """The service's own application is served by ``counterproject.lane_protocol``, which answers
        the fast lane's requests without uvicorn's ASGI cycle. Not with an access log (its lines are
        written around the ASGI application), not for any other application (the benchmarks' reference),
        and not with ``WEB_LANE_PROTOCOL=0``."""
        asgi = sys.modules.get("counterproject.asgi")
        if (
            asgi is None
            or self.wsgi is not asgi.application
            or self.log.access_log_enabled
            or os.environ.get("WEB_LANE_PROTOCOL", "1") == "0"
        ):
            return
        from .lane_protocol import LaneHttpProtocol

        LaneHttpProtocol.fast_lane = asgi.FAST_LANE
        self.config.http = LaneHttpProtocol
        if asgi.FAST_LANE:
            self.log.info("Fast lane requests are answered in the HTTP protocol (counterproject.lane_protocol)")


class _Reply:
    """What gunicorn's access-log atoms read from a response."""

    __slots__ = ("headers", "sent", "status")

    def __init__(self) -> None:
        self.status, self.sent, self.headers = 500, 0, []


class AccessLog:
    """One gunicorn access-log line per HTTP request, in the configured ``access_log_format``."""

    def __init__(self, app, log) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        reply = _Reply()

        async def logged_send(message) -> None:
            if message["type"] == "http.response.start":
                reply.status = message["status"]
                reply.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())]
            elif message["type"] == "http.response.body":
                reply.sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            headers = [(k.decode("latin-1").upper(), v.decode("latin-1")) for k, v in scope["headers"]]
            self.log.access(reply, headers, _environ(scope), timedelta(seconds=time.perf_counter() - started))


def _environ(scope) -> dict:
    query = scope["query_string"].decode("latin-1")
    raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    environ = {
        "REQUEST_METHOD": scope["method"],
        "RAW_URI": raw_path + (f"?{query}" if query else ""),
        "PATH_INFO": scope["path"],
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "REMOTE_ADDR": (scope.get("client") or ("-",))[0],
    }
    for name, value in scope["headers"]:
        environ["HTTP_" + name.decode("latin-1").upper().replace("-", "_")] = value.decode("latin-1")
    return environ
