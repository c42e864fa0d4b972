"""Redis for the fast lane: every command issued during one turn of the event loop goes out as one
pipelined round trip (not a transaction: each script stays atomic on its own).

The circuit breaker is the one of ``counters.redis_store`` (shared with the threads of the same
process; in a Redis Cluster, each node's own): an open breaker fails a call at once; a connection
error or timeout fails every call of that round trip with ``StoreUnavailable`` and counts one
failure per failed call, so the breaker opens after as many failed requests as on the threaded
path, however they were coalesced. An error reply of one command (a script error, a wrong key
type) fails only the request that made it.

In a Redis Cluster (``REDIS_CLUSTER``) each primary has a coalescer of its own: the commands of one
loop turn go out as one round trip per node, each routed by its key's slot. A MOVED reply (the
command did not run there: failover, resharding) updates the slot map and sends the command once
more to the node it names; a node that fails refreshes the slot map off the event loop, so that a
replica that took over is used as soon as the cluster says so.
"""

import asyncio
import hashlib
import select

import hiredis
import redis
import redis.asyncio
from django.conf import settings
from redis._parsers.hiredis import NOT_ENOUGH_DATA

from metrics.recorders import redis_batch_record, redis_round_trip_record

from .. import keyspace
from ..redis_store import (
    CONNECTION_ERRORS,
    CircuitBreaker,
    StoreUnavailable,
    _failed_while_connecting,
    breaker,
    breaker_of_node,
    client,
    cluster_mode,
    node_credentials,
    slot_map_reading,
    topology_refresh_soon,
)

# At most this many commands, and arguments, per round trip: a burst larger than that is split.
# Redis answers a pipeline only once it has run all of it, so one huge round trip (many batch
# updates of 100) would make every request in it wait for all of it, up to the socket timeout.
MAX_PIPELINE = 512
MAX_PIPELINE_ARGS = 8192

SCRIPTS = {
    "update": keyspace.UPDATE_SCRIPT,
    "update_many": keyspace.UPDATE_MANY_SCRIPT,
    "presence": keyspace.PRESENCE_SCRIPT,
}
_SHA = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SCRIPTS.items()}


# A queued call: (command, its future, 0, None, its arguments); for ``call_many`` (commands, one
# future for all, how many, the commands packed already or None, their arguments); for
# ``call_packed`` (None, its future, 0, the command packed, its arguments).
_Queued = tuple[tuple | None, asyncio.Future, int, bytes | None, int]


class Coalescer:
    """Commands queued by any number of requests, sent once per loop turn, each reply to its caller."""

    def __init__(self, client: redis.asyncio.Redis, guard: CircuitBreaker = breaker, on_failure=None) -> None:
        self.client = client
        self.breaker = guard
        self._on_failure = on_failure
        self._queue: list[_Queued] = []
        self._scheduled = False
        self._sending: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self._idle: list = []  # connections between round trips (``_connection``)
        # Observability for the tests and benchmarks: how many round trips carried how many commands.
        self.round_trips = 0
        self.commands = 0

    def call(self, *command) -> asyncio.Future:
        return self._queued(command, 0)

    def call_many(self, commands: tuple, packed: bytes | None = None) -> asyncio.Future:
        """Several commands of one request, in this loop turn's round trip, with one future: their
        replies in order, an error reply as its exception object (one future instead of one per
        command: a read of ten values, bench/README.md). ``packed``: the same commands already
        packed by hiredis (a caller that sends the same commands often keeps them packed)."""
        return self._queued(commands, len(commands), packed)

    def call_packed(self, packed: bytes, length: int) -> asyncio.Future:
        """One command packed already (``length`` arguments), for a caller that packs its own
        (``fastlane.plans.UpdatePlan.call``: only the moment changes from one call to the next)."""
        return self._queued(None, 0, packed, length)

    def _queued(self, command: tuple | None, many: int, packed: bytes | None = None, length: int = 0) -> asyncio.Future:
        """Queued for this loop turn's round trip, unless a breaker is open (``StoreUnavailable``)."""
        if self.breaker is not breaker:
            breaker.before_call()  # the store-wide one: open, the whole store is out
        self.breaker.before_call()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if command is not None:
            length = sum(map(len, command)) if many else len(command)
        self._queue.append((command, future, many, packed, length))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        batch: list[_Queued] = []
        size = count = 0
        for item in queue:
            _, _, many, _, length = item
            if batch and (count + (many or 1) > MAX_PIPELINE or size + length > MAX_PIPELINE_ARGS):
                self._start(batch)
                batch, size, count = [], 0, 0
            batch.append(item)
            size += length
            count += many or 1
        self._start(batch)

    def _start(self, batch: list[_Queued]) -> None:
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _connection(self):
        """An idle connection of this coalescer, or a new one of its client's pool settings.

        Kept here rather than in redis-py's pool, whose checkout and return (a lock, connection-count
        metrics, a readiness probe) cost more than the rest of a small round trip. A connection
        that Redis closed while idle (it died or restarted) is connected afresh: nothing was sent
        on it, so a refusal is then a clean "not applied" failure.
        """
        connection = self._idle.pop() if self._idle else self.client.connection_pool.make_connection()
        if connection.is_connected and _peer_closed(connection):
            await connection.disconnect(nowait=True)
        if not connection.is_connected:
            try:
                await connection.connect()
            except BaseException:
                self._idle.append(connection)
                raise
        return connection

    async def _send(self, batch: list[_Queued]) -> None:
        """Every command written at once (packed by hiredis), then each reply read and handed over in order.

        redis-py's own pipeline packs arguments in Python, which cost more than the rest of an
        increment's handling (bench/README.md); the replies are its parser's, unconverted. A reply
        read before a connection failure still reaches its request: that command did run.
        """
        self.round_trips += 1
        commands = sum(many or 1 for _, _, many, _, _ in batch)
        self.commands += commands
        redis_batch_record(size=commands)
        answered = 0
        sent = False
        try:
            connection = await self._connection()
            try:
                pack = hiredis.pack_command
                packed = b"".join(
                    p if p is not None else b"".join(map(pack, c)) if many else pack(c) for c, _, many, p, _ in batch
                )
                await connection.send_packed_command(packed, check_health=False)
                sent = True
                reader = connection._parser._reader
                for _, future, many, _, _ in batch:
                    if many:
                        replies = []
                        for _ in range(many):
                            reply = _buffered_reply(reader)
                            if reply is NOT_ENOUGH_DATA:
                                reply = await _read_reply(connection)
                            replies.append(reply)
                        answered += 1
                        if not future.done():
                            future.set_result(replies)
                        continue
                    reply = _buffered_reply(reader)
                    if reply is NOT_ENOUGH_DATA:
                        reply = await _read_reply(connection)
                    answered += 1
                    if future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            finally:
                self._idle.append(connection)
        except CONNECTION_ERRORS as exc:
            # Only a failure once the commands were written leaves their outcome unknown (a 504);
            # failing to connect or to write is a clean failure (write-through or a 503).
            error = StoreUnavailable(str(exc), maybe_applied=sent and not _failed_while_connecting(exc))
            redis_round_trip_record(ok=False)
            for _, future, _, _, _ in batch[answered:]:
                self.breaker.record_failure()
                if not future.done():
                    future.set_exception(error)
            if self._on_failure is not None:
                self._on_failure()
            return
        except BaseException as exc:
            for _, future, _, _, _ in batch[answered:]:
                if not future.done():
                    future.set_exception(exc)
            raise
        redis_round_trip_record(ok=True)
        self.breaker.record_success()


async def _read_reply(connection):
    """The next reply, read (and awaited, with its socket timeout) by the connection: one not
    buffered yet (``_buffered_reply``). An error reply comes back as its exception."""
    try:
        return await connection.read_response()
    except redis.exceptions.ResponseError as exc:
        return exc


def _buffered_reply(reader):
    """The next reply if hiredis already holds all of it, else ``NOT_ENOUGH_DATA``.

    ``connection.read_response`` does the same plus one asyncio timeout per reply, which cost more
    than the rest of reading ten values (bench/README.md): a round trip's replies mostly arrive
    together, so only a reply still on its way goes through it (and its socket timeout). Mirrors
    the parser's checks: a connection error reply (LOADING, ...) fails the round trip, an error
    reply (a script error, NOSCRIPT) goes to its own request.
    """
    reply = reader.gets()
    if isinstance(reply, redis.exceptions.ConnectionError):
        raise reply
    if isinstance(reply, list) and reply and isinstance(reply[0], redis.exceptions.ConnectionError):
        raise reply[0]
    return reply


def _peer_closed(connection) -> bool:
    """Whether the kernel already knows the other end closed this connection (or left bytes on it).

    Asked of the socket itself: the stream's own end-of-file flag waits for the event loop to have
    run the socket's callbacks, which a request handled in the same loop turn as the close precedes.
    """
    writer = getattr(connection, "_writer", None)
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(0))


class LaneStore:
    """One per event loop (a gunicorn worker has one): its connection pool and coalescer.

    No retries on the connections: a script sent again after a timeout could apply twice.
    """

    def __init__(self) -> None:
        self.cluster = cluster_mode()
        self._nodes: dict[str, Coalescer] = {}
        # The values being loaded from PostgreSQL, by (counter id, subject, period, shard): their
        # loads, shared by the requests that wait for them (fastlane.services._hydrate).
        self.hydrating: dict[tuple, asyncio.Future] = {}
        if self.cluster:
            self.coalescer = None
            return
        pool = redis.asyncio.ConnectionPool.from_url(
            settings.REDIS_URL,
            socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
            max_connections=None,
        )
        self.client = redis.asyncio.Redis(connection_pool=pool)
        self.coalescer = Coalescer(self.client)

    def command(self, *command):
        """Queue one command with a key (EVALSHA: its first key) for this loop turn's round trip."""
        if not self.cluster:
            return self.coalescer.call(*command)
        # A task, so that it is queued in this loop turn like a command to one Redis.
        return asyncio.ensure_future(self._routed(command[3] if command[0] == "EVALSHA" else command[1], command))

    def commands(self, commands: list[tuple] | tuple, packed: bytes | None = None):
        """Several commands of one request in this loop turn's round trip, awaited together: their
        replies in order, an error reply as its exception (``Coalescer.call_many``; in a cluster each
        is routed to its node). ``packed``: the same commands as ``hiredis.pack_command`` packs them."""
        if not self.cluster:
            return self.coalescer.call_many(tuple(commands), packed)
        return asyncio.gather(*(self.command(*command) for command in commands), return_exceptions=True)

    @property
    def round_trips(self) -> int:
        return sum(c.round_trips for c in ([self.coalescer] if self.coalescer else self._nodes.values()))

    def _node_coalescer(self, key) -> Coalescer:
        cluster = client()  # the slot map is the threaded path's (in memory: no I/O once connected)
        node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key))
        coalescer = self._nodes.get(node.name)
        if coalescer is None:
            connection = redis.asyncio.Redis(
                host=node.host,
                port=node.port,
                socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
                socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
                max_connections=None,
                **node_credentials(),
            )
            coalescer = self._nodes[node.name] = Coalescer(
                connection, breaker_of_node(node.name), topology_refresh_soon
            )
        return coalescer

    async def _routed(self, key, command):
        for _ in range(3):
            with slot_map_reading():
                coalescer = self._node_coalescer(key)
            try:
                return await coalescer.call(*command)
            except redis.exceptions.MovedError as exc:
                # Not run there: the slot has another primary now (failover, resharding).
                client().nodes_manager.move_slot(exc)
            except (
                redis.exceptions.AskError,
                redis.exceptions.TryAgainError,
                redis.exceptions.ClusterDownError,
            ) as exc:
                # A slot being migrated, or a cluster failing over: nothing ran; refused cleanly.
                raise StoreUnavailable(f"cluster unavailable for this key: {exc}") from exc
        raise StoreUnavailable("slot keeps moving")

    def packed(self, packed: bytes, length: int) -> asyncio.Future:
        """A command packed already (``Coalescer.call_packed``), for this loop turn's round trip; one
        Redis only (a cluster routes each command by its key: ``command``)."""
        return self.coalescer.call_packed(packed, length)

    def script_now(self, name: str, keys: list, args: list) -> asyncio.Future:
        """EVALSHA of one of ``SCRIPTS``, queued at once like ``command`` (so it shares the round trip
        of commands queued after it in the same step); a Redis without the script answers
        ``NoScriptError``, which ``script`` then handles."""
        return self.command(*_script_command(name, keys, args))

    async def script(self, name: str, keys: list, args: list):
        """EVALSHA of one of ``SCRIPTS``; loads it once if Redis does not know it (a restarted Redis,
        or in a cluster the replica that took over)."""
        try:
            return await self.script_now(name, keys, args)
        except redis.exceptions.NoScriptError:
            if self.cluster:
                await self._routed(keys[0], ("SCRIPT", "LOAD", SCRIPTS[name]))
            else:
                await self.command("SCRIPT", "LOAD", SCRIPTS[name])
            return await self.script_now(name, keys, args)


def script_packed_around(name: str, keys: list, args: list, at: int, last: int = 0) -> tuple[bytes, bytes, int]:
    """The EVALSHA of ``script_now(name, keys, args)`` packed as hiredis packs it, without its two
    arguments ``args[at:at + 2]`` nor its ``last`` ones: ``(head, tail, length)``. ``head +
    packed_moment(ms) + tail + packed_arguments(args[-last:])`` is the same call with ``ms`` and its
    minute in their place, ``length`` arguments long."""
    command = _script_command(name, keys, args)
    cut = 3 + len(keys) + at
    head = b"*%d\r\n" % len(command) + packed_arguments(command[:cut])
    return head, packed_arguments(command[cut + 2 : len(command) - last]), len(command)


def _script_command(name: str, keys: list, args: list) -> tuple:
    return ("EVALSHA", _SHA[name], len(keys), *keys, *args)


def packed_arguments(arguments) -> bytes:
    """Arguments as they follow a packed command's count line (``*3\r\n``), as hiredis packs them."""
    packed = hiredis.pack_command(tuple(arguments))
    return packed[packed.index(b"\r\n") + 2 :]


def packed_moment(ms: int) -> bytes:
    """A moment (ms) and its minute, as ``hiredis.pack_command`` packs two arguments."""
    text, minute = b"%d" % ms, b"%d" % (ms // 60000)
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(text), text, len(minute), minute)


_stores: dict[int, LaneStore] = {}


def lane_store() -> LaneStore:
    """The store of the running event loop (created on first use, inside the worker process)."""
    loop_id = id(asyncio.get_running_loop())
    store = _stores.get(loop_id)
    if store is None:
        _stores.clear()
        store = _stores[loop_id] = LaneStore()
    return store
