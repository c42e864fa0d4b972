"""Server-sent events (GET /api/v1/stream?names=a,b), served live by the web process's event loop.

Every change of a value is published by the Lua script that made it on its counter's shard
channel (``keyspace.stream_channel``, ``SPUBLISH``): the update path makes no extra round trip.
Each worker process has one ``Hub``: one Redis connection subscribed to the channels of the
counters its open streams watch (a channel nobody watches any more is unsubscribed at once) --
in a Redis Cluster one connection per primary owning a watched channel's slot, closed when none of
its channels is watched -- and it fans the messages out to the local streams, at most one value
per counter per ``COUNTER_STREAM_MIN_INTERVAL_MS`` (leading and trailing edge: the last value
always follows). A split counter (docs/splitting.md) has a channel per shard, each publishing its
shard's share: the hub watches them all, and a message is only the news that the counter changed:
the total is read (throttled alike) and that is what the streams get.

A stream first sends the current values (the exact read of GET /api/v1/counters, after its
subscription is confirmed, so no change in between is missed), then each change; every event has
an id, and a client that reconnects with ``Last-Event-ID`` gets the current values again, its ids
continuing from there. An idle stream gets a comment line every
``COUNTER_STREAM_HEARTBEAT_SECONDS``. A client that goes away leaves nothing behind: its stream's
watcher task ends, and the hub unsubscribes the channels only it watched. When the hub loses Redis
(the connection drops, or a PING after a quiet heartbeat interval goes unanswered for another) every
stream watching a channel on that connection ends (the client reconnects; while Redis is down it
is refused with 503, and the board polls); in a cluster the same holds for a channel whose node
answers MOVED or unsubscribes it (its slot moved), and the streams on other nodes go on. On
shutdown (SIGTERM) every stream ends so the worker can exit.
"""

import asyncio
import contextlib
import logging
import ssl
from urllib.parse import unquote, urlsplit

import hiredis
import redis
from django.conf import settings
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from metrics.recorders import (
    Stopwatch,
    request_record,
    stream_channels_record,
    stream_events_record,
    stream_open_record,
)

from .. import apis, clock, keyspace, periods, split
from ..api_errors import error_response
from ..config import CounterConfig, pinned
from ..redis_store import StoreUnavailable, client, cluster_mode, node_credentials, topology_refresh_soon
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


def _channels_of(counter: CounterConfig) -> list[bytes]:
    """The channels a counter's changes are published on: one, or one per shard of a split counter."""
    return [keyspace.stream_channel(unit).encode() for unit in split.units(counter)]


class _Watch:
    """The hub's state of one counter: who watches it, its channels, its current period, and its throttle."""

    __slots__ = (
        "channels",
        "config",
        "emitted",
        "handle",
        "last_emit",
        "pending",
        "period_end",
        "period_key",
        "reads",
        "streams",
    )

    def __init__(self, config: CounterConfig) -> None:
        self.config = config
        self.channels = _channels_of(config)
        self.streams: set[Stream] = set()
        self.last_emit = float("-inf")
        self.pending: int | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.period_key = ""
        self.period_end = None
        # a split counter's total reads: how many started, and the latest one whose value was sent
        self.reads = 0
        self.emitted = 0

    def current_period(self) -> str:
        now = clock.now()
        if not self.period_key or (self.period_end is not None and now >= self.period_end):
            window = periods.window_at(self.config.period, self.config.time_zone, now)
            self.period_key, self.period_end = window.key, window.end
        return self.period_key


class _Link:
    """One subscriber connection: to the single Redis, or in a cluster to one primary (``name`` is
    its "host:port"), and the channels subscribed on it."""

    __slots__ = ("channels", "host", "name", "port", "task", "unsubscribing", "writer")

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.channels: set[bytes] = set()
        # Our own SUNSUBSCRIBEs not confirmed yet, per channel: any other ``sunsubscribe`` is the
        # node's (the slot left it) and ends the streams watching that channel.
        self.unsubscribing: dict[bytes, int] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None


class Hub:
    """The subscriber connections of one worker process (one Redis: one connection; a Redis Cluster:
    one per primary owning a watched channel's slot), fanning the published changes out to its streams."""

    def __init__(self) -> None:
        self.watches: dict[int, _Watch] = {}
        self.channels: dict[bytes, int] = {}  # channel -> counter id (several channels of a split counter)
        self.confirming: dict[bytes, asyncio.Future] = {}
        self.streams: set[Stream] = set()
        self.links: dict[str, _Link] = {}  # "" (one Redis) or a primary's "host:port"
        self.link_of: dict[bytes, _Link] = {}  # channel -> the connection it is subscribed on
        self.closing = False
        self.cluster = cluster_mode()
        self._lock = asyncio.Lock()
        self.interval = settings.COUNTER_STREAM_MIN_INTERVAL_MS / 1000
        self._reading: set[asyncio.Task] = set()  # strong references to the split counters' total reads

    # --- streams join and leave -----------------------------------------------------------

    async def join(self, stream: Stream) -> None:
        """Watch the stream's counters; returns once every new channel's subscription is confirmed."""
        if self.closing:
            raise StoreUnavailable("the server is shutting down")
        waits = []
        async with self._lock:
            # Where each new channel goes, and every connection needed open, before anything is
            # registered: a node that cannot be reached refuses the stream and leaves nothing.
            placed: dict[int, list[tuple[bytes, _Link]]] = {}
            try:
                for counter in stream.counters:
                    if counter.id not in self.watches:
                        placed[counter.id] = []
                        for channel in _channels_of(counter):
                            link = self._link_for(channel)
                            await self._connect(link)
                            placed[counter.id].append((channel, link))
            except StoreUnavailable:
                for link in list(self.links.values()):
                    if not link.channels:
                        self._disconnect(link)
                raise
            new: dict[_Link, list[bytes]] = {}
            for counter in stream.counters:
                watch = self.watches.get(counter.id)
                if watch is None:
                    watch = self.watches[counter.id] = _Watch(counter)
                    for channel, link in placed[counter.id]:
                        self.channels[channel] = counter.id
                        self.link_of[channel] = link
                        link.channels.add(channel)
                        self.confirming[channel] = asyncio.get_running_loop().create_future()
                        new.setdefault(link, []).append(channel)
                watch.config = counter
                watch.streams.add(stream)
                waits += [self.confirming[channel] for channel in watch.channels if channel in self.confirming]
            self.streams.add(stream)
            for link, channels in new.items():
                if self.links.get(link.name) is link and link.writer is not None:
                    self._subscribe(link, "SSUBSCRIBE", channels)
                else:  # lost (or closed by a leave) while another node was being connected
                    self._end_channels(channels, ConnectionError(f"stream hub lost {link.host}:{link.port}"))
            if new:
                stream_channels_record(count=len(self.channels))
        try:
            async with asyncio.timeout(settings.REDIS_SOCKET_TIMEOUT):
                await asyncio.gather(*(asyncio.shield(w) for w in waits))
        except (TimeoutError, ConnectionError) as exc:
            self.leave(stream)
            raise StoreUnavailable(f"stream subscription failed: {exc!r}") from exc

    def leave(self, stream: Stream) -> None:
        """Stop feeding ``stream``; unsubscribe the channels nobody watches any more, and close a
        connection left with no channel (no await: it runs in the ``finally`` of a cancelled stream too)."""
        self.streams.discard(stream)
        gone: dict[_Link, list[bytes]] = {}
        for counter in stream.counters:
            watch = self.watches.get(counter.id)
            if watch is None or stream not in watch.streams:
                continue
            watch.streams.discard(stream)
            if not watch.streams:
                for link, channel in self._forget(counter.id):
                    gone.setdefault(link, []).append(channel)
        if not gone:
            return
        stream_channels_record(count=len(self.channels))
        self._unsubscribe(gone)

    def _unsubscribe(self, gone: dict["_Link", list[bytes]]) -> None:
        """SUNSUBSCRIBE channels nobody watches any more, on the connections still up; a connection
        left with no channel is closed."""
        for link, channels in gone.items():
            if self.links.get(link.name) is not link:
                continue
            if not link.channels:
                self._disconnect(link)
            else:
                with contextlib.suppress(ConnectionError, OSError):
                    self._subscribe(link, "SUNSUBSCRIBE", channels)
                    for channel in channels:
                        link.unsubscribing[channel] = link.unsubscribing.get(channel, 0) + 1

    def _forget(self, counter_id: int, error: Exception | None = None) -> list[tuple["_Link", bytes]]:
        """Drop a counter's watch and its channels' bookkeeping; answers each channel with the
        connection it was on. ``error`` fails the subscriptions of its channels still unconfirmed."""
        watch = self.watches.pop(counter_id, None)
        if watch is None:
            return []
        if watch.handle is not None:
            watch.handle.cancel()
        placed = []
        for channel in watch.channels:
            self.channels.pop(channel, None)
            future = self.confirming.pop(channel, None)
            if error is not None and future is not None and not future.done():
                future.set_exception(ConnectionError(str(error)))
            link = self.link_of.pop(channel, None)
            if link is not None:
                link.channels.discard(channel)
                placed.append((link, channel))
        return placed

    def close_all(self) -> None:
        """Shutdown: end every stream (each one's handler finishes its reply) and refuse new ones."""
        self.closing = True
        for stream in list(self.streams):
            stream.close()

    # --- the subscriber connections -------------------------------------------------------

    def _link_for(self, channel: bytes) -> _Link:
        """The connection a channel is subscribed on: the one Redis, or the primary owning its slot
        (the slot map of the cluster client the threaded path and the fast lane use)."""
        if not self.cluster:
            url = urlsplit(settings.REDIS_URL)
            host, port, name = url.hostname or "127.0.0.1", url.port or 6379, ""
        else:
            try:
                cluster = client()
                node = cluster.nodes_manager.get_node_from_slot(key_slot(channel))
            except (RedisClusterException, redis.RedisError, OSError) as exc:
                raise StoreUnavailable(f"stream hub: no node for {channel.decode()}: {exc}") from exc
            host, port, name = node.host, int(node.port), node.name
        link = self.links.get(name)
        if link is None:
            link = self.links[name] = _Link(name, host, port)
        return link

    async def _connect(self, link: _Link) -> None:
        if link.writer is not None:
            return
        url = urlsplit(settings.REDIS_URL.split(",", 1)[0])
        context = ssl.create_default_context() if url.scheme == "rediss" and not self.cluster else None
        try:
            async with asyncio.timeout(settings.REDIS_CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(link.host, link.port, ssl=context)
        except (OSError, TimeoutError) as exc:
            if not link.channels:
                self._disconnect(link)
            self._refresh()
            raise StoreUnavailable(f"stream hub cannot connect to {link.host}:{link.port}: {exc!r}") from exc
        link.writer = writer
        if self.cluster:
            credentials = node_credentials()
            auth = tuple(credentials[k] for k in ("username", "password") if k in credentials)
        elif url.password:
            auth = (unquote(url.username), unquote(url.password)) if url.username else (unquote(url.password),)
        else:
            auth = ()
        if auth:
            writer.write(hiredis.pack_command(("AUTH", *auth)))
        link.task = asyncio.ensure_future(self._read(link, reader, writer))

    def _subscribe(self, link: _Link, verb: str, channels: list[bytes]) -> None:
        # A cluster node refuses channels of several slots in one command (CROSSSLOT): one each.
        if self.cluster:
            for channel in channels:
                self._send(link, verb, channel)
        else:
            self._send(link, verb, *channels)

    @staticmethod
    def _send(link: _Link, *command) -> None:
        if link.writer is None:
            raise ConnectionError("stream hub not connected")
        link.writer.write(hiredis.pack_command(command))

    def _disconnect(self, link: _Link) -> None:
        if self.links.get(link.name) is link:
            del self.links[link.name]
        writer, task = link.writer, link.task
        link.writer = link.task = None
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _refresh(self) -> None:
        """In a cluster, after a node failed or redirected: ask for the slot map again, on a thread."""
        if self.cluster:
            topology_refresh_soon()

    async def _read(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
                    self._send(link, "PING")
                    pinged = True
                    continue
                pinged = False
                if not data:
                    raise ConnectionError("Redis closed the stream hub's connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    self._handle(link, reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if link.writer is writer:
                where = f"{link.host}:{link.port}"
                logger.warning("stream hub lost Redis %s (%r): ending the streams on its channels", where, exc)
                self._lost(link, exc)

    def _lost(self, link: _Link, exc: Exception) -> None:
        """A connection failed: the streams watching its channels end (each client reconnects and is
        answered afresh); the other connections' streams go on."""
        self._end_channels(list(link.channels), exc)
        self._disconnect(link)
        self._refresh()

    def _end_channels(self, channels: list[bytes], exc: Exception) -> None:
        """End every stream that watches one of ``channels`` (their other channels are left when
        their handlers finish); those channels are forgotten without a SUNSUBSCRIBE."""
        ended: set[Stream] = set()
        others: dict[_Link, list[bytes]] = {}  # a split counter's channels on other connections
        for channel in channels:
            future = self.confirming.get(channel)
            if future is not None and not future.done():
                future.set_exception(ConnectionError(str(exc)))
            counter_id = self.channels.get(channel)
            watch = self.watches.get(counter_id) if counter_id is not None else None
            if watch is not None:
                ended.update(watch.streams)
            if counter_id is not None:
                for link, other in self._forget(counter_id, exc):
                    if other not in channels:
                        others.setdefault(link, []).append(other)
            else:
                self.confirming.pop(channel, None)
        for stream in ended:
            stream.close()
        stream_channels_record(count=len(self.channels))
        self._unsubscribe(others)

    def _handle(self, link: _Link, reply) -> None:
        if isinstance(reply, hiredis.ReplyError):
            moved = str(reply).split()
            if self.cluster and len(moved) >= 2 and moved[0] in ("MOVED", "ASK") and moved[1].isdigit():
                # The node does not serve that slot (any more): the channels of that slot here end
                # their streams; the slot map is asked for again, and a reconnecting client subscribes
                # on the node that owns it now.
                slot = int(moved[1])
                lost = [c for c in link.channels if key_slot(c) == slot]
                logger.warning("stream hub: %s answered %s: ending the streams of that slot", link.name, reply)
                self._end_channels(lost, ConnectionError(str(reply)))
                if not link.channels:
                    self._disconnect(link)
                self._refresh()
                return
            raise ConnectionError(f"Redis refused the stream hub: {reply}")
        if not isinstance(reply, list) or len(reply) < 3:
            return  # AUTH's OK, PING's pong
        kind, channel = reply[0], reply[1]
        if kind == b"smessage":
            counter_id = self.channels.get(channel)
            if counter_id is not None and self.link_of.get(channel) is link:
                self._message(counter_id, reply[2])
        elif kind == b"ssubscribe":
            future = self.confirming.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == b"sunsubscribe":
            pending = link.unsubscribing.get(channel, 0)
            if pending:
                if pending == 1:
                    del link.unsubscribing[channel]
                else:
                    link.unsubscribing[channel] = pending - 1
            elif channel in link.channels:
                # Not ours: the node unsubscribed it (its slot moved to another node).
                logger.warning("stream hub: %s unsubscribed %s: ending its streams", link.name, channel.decode())
                self._end_channels([channel], ConnectionError("the channel's slot moved"))
                if not link.channels:
                    self._disconnect(link)
                self._refresh()

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

    def _emit(self, watch: _Watch, value: int) -> None:
        if len(watch.channels) > 1:  # a split counter: ``value`` is one shard's share, the total is read
            task = asyncio.ensure_future(self._emit_total(watch))
            self._reading.add(task)
            task.add_done_callback(self._reading.discard)
            return
        for stream in watch.streams:
            stream.offer(watch.config.id, value)

    async def _emit_total(self, watch: _Watch) -> None:
        """A split counter's total, read as GET reads it, to its streams; a read that finishes after
        a later one is dropped (its value is older)."""
        watch.reads += 1
        read = watch.reads
        try:
            views = await lane.counter_values_get(items=[(watch.config, "")])
        except Exception as exc:  # its streams keep the last total; the next change reads again
            logger.warning("stream hub: the total of %s could not be read: %r", watch.config.name, exc)
            return
        if read > watch.emitted and self.watches.get(watch.config.id) is watch:
            watch.emitted = read
            for stream in watch.streams:
                stream.offer(watch.config.id, views[0].value)


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
