"""The web worker's HTTP protocol: uvicorn's httptools protocol, with the fast lane's requests answered
without the ASGI request cycle.

uvicorn spends about 15 µs of Python on every request around the application (the scope, a
``RequestResponseCycle``, the receive and send coroutines and their message dicts, the proxy-headers
middleware, the reply's header checks): on this machine a trivial ASGI app answers 52,000 req/s on
one core under uvicorn, the same reply written by a bare httptools protocol 236,000 (bench/README.md).
For the hot endpoints that is a fifth of all the work. This protocol takes a hot request once its
headers are parsed, collects its body and runs the lane's handler (``counters.fastlane.handlers.answer``,
the same one the ASGI application calls) in a task of its own, then writes the reply with the
headers uvicorn and the ASGI path write, in the same order: the contract test compares the bytes.

An increment or decrement sent again (a kept plan, ``counters.fastlane.plans``, under a config
snapshot that needs no check) does not take a task: its script call is queued as its request
completes (``handlers.kept_update_send``), and a callback on the call's reply writes a plain OK.
Any other reply (an error, Redis down, a limit, a threshold crossed, a value to hydrate) is
finished in a task by ``answer``'s own code, as if the request had taken it from the start. A task
and the coroutines around the call cost about 3 µs of the ~50 µs a request costs the worker.

Everything else is uvicorn's own code path, and so is every request this protocol is not sure of:
- anything ``counterproject.asgi.application`` would not send to the lane (other paths and methods,
  a Host Django would refuse, the lane switched off, a root path);
- HTTP/1.0, ``Expect: 100-continue``, upgrades, a chunked body, a Content-Length over the body limit
  (uvicorn's cycle and the ASGI application answer 413 as they always have);
- a request pipelined behind one not yet answered (it waits in uvicorn's pipeline queue and is
  started by ``on_response_complete``, so replies keep their order);
- a worker over its ``limit_concurrency`` (uvicorn answers 503).

Graceful shutdown, keep-alive timeouts, flow control and ``max_requests`` recycling are uvicorn's:
a lane request stands in ``self.cycle`` for uvicorn's cycle (``_LaneCycle``: the attributes uvicorn
reads of it), its task (if it has one) is in ``server_state.tasks``, and its end calls
``on_response_complete``. A shutdown waits for a request without a task through its connection,
which stays open until its reply is written.
"""

import urllib.parse

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from counters.fastlane import handlers
from counters.fastlane import http as lane_http
from counters.fastlane.http import AFTER_LENGTH, BEFORE_LENGTH, JSON, host_value_allowed
from metrics.recorders import Stopwatch


def _lines(headers) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)


_JSON_LINE = _lines([JSON])
_BEFORE_LENGTH = _lines(BEFORE_LENGTH)
_AFTER_LENGTH = _lines(AFTER_LENGTH)
_SERVER_ERROR = (
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
)


class _NoEvent:
    """uvicorn sets its cycle's message event when the connection is lost; a lane request has none."""

    @staticmethod
    def set() -> None:
        pass


class _LaneCycle:
    """What uvicorn's protocol reads and writes of ``self.cycle``, for a request the lane answers."""

    __slots__ = ("disconnected", "keep_alive", "response_complete")
    message_event = _NoEvent

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_complete = False


class LaneHttpProtocol(HttpToolsProtocol):
    fast_lane = True  # counterproject.asgi.FAST_LANE; set by the worker

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._lane = None  # (handler, shape, params, scope, body chunks) of a request the lane takes

    def on_headers_complete(self) -> None:
        lane = self._lane_take() if self.fast_lane else None
        if lane is None:
            super().on_headers_complete()
            return
        self._lane = lane
        self.cycle = _LaneCycle(keep_alive=self.parser.should_keep_alive())

    def _lane_take(self):
        """The lane's part of a request whose headers are in, or None for uvicorn's own path."""
        parser = self.parser
        cycle = self.cycle
        if (
            (cycle is not None and not cycle.response_complete)
            or self.expect_100_continue
            or self.root_path
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
        ):
            return None
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return None
        method = parser.get_method().decode("ascii")
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        hot = handlers.route(method, path)
        if hot is None:
            return None
        host = length = None
        for name, value in self.headers:
            if name == b"host":
                if host is None:
                    host = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                return None
        if not host_value_allowed(host):
            return None
        if length is not None and not (length.isdigit() and int(length) <= lane_http.body_limit):
            return None
        scope = {"method": method, "path": path, "query_string": url.query or b"", "headers": self.headers}
        return (*hot, scope, [])

    def on_body(self, body: bytes) -> None:
        if self._lane is None:
            super().on_body(body)
        else:
            self._lane[4].append(body)

    def on_message_complete(self) -> None:
        if self._lane is None:
            super().on_message_complete()
            return
        handler, shape, params, scope, chunks = self._lane
        self._lane = None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        watch = Stopwatch()
        cycle = self.cycle
        kept = handlers.kept_update_send(scope, body, handler, params)
        if kept is not None:
            # A kept update: its script call is in this loop turn's round trip already, and its
            # reply is written by a callback, without a task (one costs ~3 µs of a ~50 µs request).
            kept[0].add_done_callback(lambda _: self._lane_kept_done(cycle, kept, handler, scope, body, watch))
            return
        self._lane_task(self._lane_serve(cycle, handler, shape, params, scope, body, watch))

    def _lane_task(self, coroutine) -> None:
        task = self.loop.create_task(coroutine)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _lane_kept_done(self, cycle: _LaneCycle, kept: tuple, handler, scope, body: bytes, watch: Stopwatch) -> None:
        """A kept update's script call answered: a plain outcome is written here; anything else (an
        error, a limit, a threshold crossed, a value to hydrate, a paused transport) is finished in
        a task, by ``answer`` like any other request."""
        pending, plain, finish = kept
        try:
            payload = None if self.flow.write_paused else handlers.kept_reply(pending, plain)
            if payload is not None:
                self._lane_reply(cycle, 200, payload, None)
                handlers.record(scope, handler, 200, watch)
                return
        except BaseException as exc:
            self._lane_failed(cycle, exc)
            return
        self._lane_task(self._lane_serve(cycle, finish, "rest", {}, scope, body, watch, recorded=handler))

    async def _lane_serve(
        self, cycle: _LaneCycle, handler, shape, params, scope, body: bytes, watch: Stopwatch, recorded=None
    ) -> None:
        """``recorded``: the handler the request is counted under, when ``handler`` finishes its work."""
        try:
            status, payload, extra = await handlers.answer(scope, body, handler, shape, params, own_task=True)
        except BaseException as exc:
            self._lane_failed(cycle, exc)
            return
        if self.flow.write_paused and not cycle.disconnected:
            await self.flow.drain()
        self._lane_reply(cycle, status, payload, extra)
        handlers.record(scope, recorded or handler, status, watch)

    def _lane_failed(self, cycle: _LaneCycle, exc: BaseException) -> None:
        """As uvicorn's RequestResponseCycle.run_asgi: logged, a bare 500."""
        self.logger.error("Exception in ASGI application\n", exc_info=exc)
        cycle.keep_alive = False
        self._lane_write(cycle, STATUS_LINE[500] + self._default_headers() + _SERVER_ERROR)

    def _lane_reply(self, cycle: _LaneCycle, status: int, payload: bytes, extra: list | None) -> None:
        head = [STATUS_LINE[status], self._default_headers(), _JSON_LINE]
        if extra:
            head.append(_lines(extra))
        head += [_BEFORE_LENGTH, b"content-length: %d\r\n" % len(payload), _AFTER_LENGTH]
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += [b"\r\n", payload]
        self._lane_write(cycle, b"".join(head))

    def _lane_write(self, cycle: _LaneCycle, reply: bytes) -> None:
        if cycle.disconnected:
            return
        self.transport.write(reply)
        cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def _default_headers(self) -> bytes:
        """uvicorn's Server and Date headers (the Date is renewed each second, as a new list)."""
        headers = self.server_state.default_headers
        global _default_seen, _default_lines
        if headers is not _default_seen:
            _default_seen, _default_lines = headers, _lines(headers)
        return _default_lines


_default_seen: list | None = None
_default_lines = b""
