"""Server-sent events (GET /api/v1/stream?names=a,b), served live by the web process's event loop.

Every change of a value is published by the Lua script that made it on its counter's shard
channel (``keyspace.stream_channel``, ``SPUBLISH``): the update path makes no extra round trip.
Each worker process has one ``Hub``: one Redis connection subscribed to the channels of the
counters its open streams watch (a channel nobody watches any more is unsubscribed at once), and
it fans the messages out to the local streams, at most one value per counter per
``COUNTER_STREAM_MIN_INTERVAL_MS`` (leading and trailing edge: the last value always follows).

A stream first sends the current values (the exact read of GET /api/v1/counters, after its
subscription is confirmed, so no change in between is missed), then each change; every event has
an id, and a client that reconnects with ``Last-Event-ID`` gets the current values again, its ids
continuing from there. An idle stream gets a comment line every
``COUNTER_STREAM_HEARTBEAT_SECONDS``. A client that goes away leaves nothing behind: its stream's
watcher task ends, and the hub unsubscribes the channels only it watched. When the hub loses Redis
(the connection drops, or a PING after a quiet heartbeat interval goes unanswered for another) every
stream ends (the client reconnects; while Redis is down it is refused with 503, and the
board polls). On shutdown (SIGTERM) every stream ends so the worker can exit.
"""

import asyncio
import contextlib
import logging
import ssl
from urllib.parse import unquote, urlsplit

import hiredis
from django.conf import settings

from metrics.recorders import (
    Stopwatch,
    request_record,
    stream_channels_record,
    stream_events_record,
    stream_open_record,
)

from .. import apis, clock, keyspace, periods
from ..api_errors import error_response
from ..config import CounterConfig, pinned
from ..redis_store import StoreUnavailable
from . import services as lane
from .handlers import _endpoint
from .http import AFTER_LENGTH, BEFORE_LENGTH, LaneRequest, log_error_reply, send_json
from .snapshot import current_snapshot

logger = logging.getLogger(__name__)

PATH = "/api/v1/stream"
HEARTBEAT = b": heartbeat\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream"),
    *((k.lower().encode(), v.encode()) for k, v in apis.STREAM_HEADERS.items()),
    *BEFORE_LENGTH,
    *AFTER_LENGTH,
]


class Stream:
    """One open stream: the counters it watches and the latest value of each not sent yet."""

    __slots__ = ("closed", "counters", "latest", "wake")

    def __init__(self, counters: list[CounterConfig]) -> None:
        self.counters = counters
        self.latest: dict[int, int] = {}
        self.wake = asyncio.Event()
        self.closed = False

    def offer(self, counter_id: int, value: int) -> None:
        self.latest[counter_id] = value
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class _Watch:
    """The hub's state of one counter: who watches it, its current period, and its throttle."""

    __slots__ = ("config", "handle", "last_emit", "pending", "period_end", "period_key", "streams")

    def __init__(self, config: CounterConfig) -> None:
        self.config = config
        self.streams: set[Stream] = set()
        self.last_emit = float("-inf")
        self.pending: int | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.period_key = ""
        self.period_end = None

    def current_period(self) -> str:
        now = clock.now()
        if not self.period_key or (self.period_end is not None and now >= self.period_end):
            window = periods.window_at(self.config.period, self.config.time_zone, now)
            self.period_key, self.period_end = window.key, window.end
        return self.period_key


class Hub:
    """One subscriber connection per worker process, fanning the published changes out to its streams."""

    def __init__(self) -> None:
        self.watches: dict[int, _Watch] = {}
        self.channels: dict[bytes, int] = {}  # channel -> counter id
        self.confirming: dict[bytes, asyncio.Future] = {}
        self.streams: set[Stream] = set()
        self.closing = False
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.interval = settings.COUNTER_STREAM_MIN_INTERVAL_MS / 1000

    # --- streams join and leave -----------------------------------------------------------

    async def join(self, stream: Stream) -> None:
        """Watch the stream's counters; returns once every new channel's subscription is confirmed."""
        if self.closing:
            raise StoreUnavailable("the server is shutting down")
        waits = []
        async with self._lock:
            await self._connect()
            new = []
            for counter in stream.counters:
                watch = self.watches.get(counter.id)
                if watch is None:
                    watch = self.watches[counter.id] = _Watch(counter)
                    channel = keyspace.stream_channel(counter.id).encode()
                    self.channels[channel] = counter.id
                    self.confirming[channel] = asyncio.get_running_loop().create_future()
                    new.append(channel)
                watch.config = counter
                watch.streams.add(stream)
                channel = keyspace.stream_channel(counter.id).encode()
                if channel in self.confirming:
                    waits.append(self.confirming[channel])
            self.streams.add(stream)
            if new:
                self._send("SSUBSCRIBE", *new)
                stream_channels_record(count=len(self.watches))
        try:
            async with asyncio.timeout(settings.REDIS_SOCKET_TIMEOUT):
                await asyncio.gather(*(asyncio.shield(w) for w in waits))
        except (TimeoutError, ConnectionError) as exc:
            self.leave(stream)
            raise StoreUnavailable(f"stream subscription failed: {exc!r}") from exc

    def leave(self, stream: Stream) -> None:
        """Stop feeding ``stream``; unsubscribe the channels nobody watches any more (no await: it
        runs in the ``finally`` of a cancelled stream too)."""
        self.streams.discard(stream)
        gone = []
        for counter in stream.counters:
            watch = self.watches.get(counter.id)
            if watch is None:
                continue
            watch.streams.discard(stream)
            if not watch.streams:
                del self.watches[counter.id]
                if watch.handle is not None:
                    watch.handle.cancel()
                channel = keyspace.stream_channel(counter.id).encode()
                self.channels.pop(channel, None)
                self.confirming.pop(channel, None)
                gone.append(channel)
        if gone:
            stream_channels_record(count=len(self.watches))
            if not self.watches:
                self._disconnect()
            else:
                with contextlib.suppress(ConnectionError, OSError):
                    self._send("SUNSUBSCRIBE", *gone)

    def close_all(self) -> None:
        """Shutdown: end every stream (each one's handler finishes its reply) and refuse new ones."""
        self.closing = True
        for stream in list(self.streams):
            stream.close()

    # --- the subscriber connection --------------------------------------------------------

    async def _connect(self) -> None:
        if self._writer is not None:
            return
        url = urlsplit(settings.REDIS_URL)
        context = ssl.create_default_context() if url.scheme == "rediss" else None
        try:
            async with asyncio.timeout(settings.REDIS_CONNECT_TIMEOUT):
                host, port = url.hostname or "127.0.0.1", url.port or 6379
                reader, writer = await asyncio.open_connection(host, port, ssl=context)
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"stream hub cannot connect: {exc!r}") from exc
        self._writer = writer
        if url.password:
            auth = (unquote(url.username), unquote(url.password)) if url.username else (unquote(url.password),)
            writer.write(hiredis.pack_command(("AUTH", *auth)))
        self._reader_task = asyncio.ensure_future(self._read(reader, writer))

    def _send(self, *command) -> None:
        if self._writer is None:
            raise ConnectionError("stream hub not connected")
        self._writer.write(hiredis.pack_command(command))

    def _disconnect(self) -> None:
        writer, task = self._writer, self._reader_task
        self._writer = self._reader_task = None
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        pinged = False
        try:
            while True:
                # Quiet for a heartbeat's time: PING; quiet for another (a frozen Redis keeps the
                # TCP connection up): the connection counts as lost.
                try:
                    async with asyncio.timeout(settings.COUNTER_STREAM_HEARTBEAT_SECONDS):
                        data = await reader.read(65536)
                except TimeoutError:
                    if pinged:
                        raise ConnectionError("Redis did not answer the stream hub's PING") from None
                    self._send("PING")
                    pinged = True
                    continue
                pinged = False
                if not data:
                    raise ConnectionError("Redis closed the stream hub's connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    self._handle(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if writer is self._writer:
                logger.warning("stream hub lost Redis (%r): ending its %d streams", exc, len(self.streams))
                self._lost(exc)

    def _lost(self, exc: Exception) -> None:
        """The connection failed: every stream ends (its client reconnects and is answered afresh)."""
        for future in self.confirming.values():
            if not future.done():
                future.set_exception(ConnectionError(str(exc)))
        for stream in list(self.streams):
            stream.close()
        for watch in self.watches.values():
            if watch.handle is not None:
                watch.handle.cancel()
        self.watches.clear()
        self.channels.clear()
        self.confirming.clear()
        self.streams.clear()
        stream_channels_record(count=0)
        self._disconnect()

    def _handle(self, reply) -> None:
        if isinstance(reply, hiredis.ReplyError):
            raise ConnectionError(f"Redis refused the stream hub: {reply}")
        if not isinstance(reply, list) or len(reply) < 3:
            return  # AUTH's OK
        kind, channel = reply[0], reply[1]
        if kind == b"smessage":
            counter_id = self.channels.get(channel)
            if counter_id is not None:
                self._message(counter_id, reply[2])
        elif kind == b"ssubscribe":
            future = self.confirming.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)

    # --- fan-out, throttled per counter ---------------------------------------------------

    def _message(self, counter_id: int, message: bytes) -> None:
        watch = self.watches[counter_id]
        value, _ms, period, subject = keyspace.stream_message_parse(message)
        if subject or period != watch.current_period():
            return  # a player's value, or a write to another period than the current one
        now = asyncio.get_running_loop().time()
        if watch.handle is None and now - watch.last_emit >= self.interval:
            watch.last_emit = now
            self._emit(watch, value)
            return
        watch.pending = value
        if watch.handle is None:
            at = watch.last_emit + self.interval
            watch.handle = asyncio.get_running_loop().call_at(at, self._trailing, counter_id)

    def _trailing(self, counter_id: int) -> None:
        watch = self.watches.get(counter_id)
        if watch is None:
            return
        watch.handle = None
        if watch.pending is not None:
            value, watch.pending = watch.pending, None
            watch.last_emit = asyncio.get_running_loop().time()
            self._emit(watch, value)

    @staticmethod
    def _emit(watch: _Watch, value: int) -> None:
        for stream in watch.streams:
            stream.offer(watch.config.id, value)


_hubs: dict[int, Hub] = {}


def hub() -> Hub:
    """The hub of the running event loop (one per worker process)."""
    loop_id = id(asyncio.get_running_loop())
    found = _hubs.get(loop_id)
    if found is None:
        _hubs.clear()
        found = _hubs[loop_id] = Hub()
    return found


def streams_close_all() -> None:
    """End every open stream of this process (the worker's shutdown calls it before waiting)."""
    for found in _hubs.values():
        found.close_all()


async def _watch_disconnect(receive, stream: Stream) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stream.close()
            return


async def serve_stream(scope, receive, send) -> None:
    watch = Stopwatch()
    request = LaneRequest(scope, b"")
    the_hub = hub()
    stream = None
    try:
        token = pinned.set(await current_snapshot())
        try:
            counters, last_id = apis.stream_targets(request)
        finally:
            pinned.reset(token)
        stream = Stream(counters)
        await the_hub.join(stream)
        views = await lane.counter_values_get(items=[(c, "") for c in counters])
    except Exception as exc:
        if stream is not None:
            the_hub.leave(stream)
        response = error_response(exc, "rest")
        extra = [(k.lower().encode(), v.encode()) for k, v in response.items() if k.lower() != "content-type"]
        log_error_reply(response.status_code, response.reason_phrase, request.path)
        await send_json(send, response.status_code, response.content, extra)
        _record(scope, response.status_code, watch)
        return
    stream_open_record(delta=1)
    watcher = asyncio.ensure_future(_watch_disconnect(receive, stream))
    event_id = last_id
    sent: dict[int, int] = {}
    try:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        chunks = []
        for view in views:
            event_id += 1
            sent[view.counter.id] = view.value
            chunks.append(apis.stream_event(event_id, view.counter.name, view.value, degraded=view.degraded))
        await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
        stream_events_record(count=len(chunks))
        # Counted and timed as a request up to its first values (a stream's whole life is no latency).
        _record(scope, 200, watch)
        names = {c.id: c.name for c in counters}
        heartbeat = settings.COUNTER_STREAM_HEARTBEAT_SECONDS
        while not stream.closed:
            try:
                async with asyncio.timeout(heartbeat):
                    await stream.wake.wait()
            except TimeoutError:
                await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                continue
            stream.wake.clear()
            if stream.closed:
                break
            latest, stream.latest = stream.latest, {}
            chunks = []
            for counter_id, value in latest.items():
                if sent.get(counter_id) != value:
                    event_id += 1
                    sent[counter_id] = value
                    chunks.append(apis.stream_event(event_id, names[counter_id], value))
            if chunks:
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                stream_events_record(count=len(chunks))
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the client went away while we wrote
    finally:
        watcher.cancel()
        the_hub.leave(stream)
        stream_open_record(delta=-1)


def _record(scope, status: int, watch: Stopwatch) -> None:
    request_record(
        surface="rest",
        endpoint=_endpoint(serve_stream, scope["path"]),
        method=scope["method"],
        status=status,
        seconds=watch.seconds,
    )
