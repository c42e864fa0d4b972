"""Access to the Redis counter store, behind a circuit breaker per Redis node.

Every Redis call of the service goes through ``redis_call``. After ``threshold`` consecutive
connection errors or timeouts the breaker opens: calls fail at once with ``StoreUnavailable``
(no request waits on a socket timeout) until ``reset_seconds`` have passed; then one call is let
through as a probe, and its success closes the breaker again.

The store is one Redis or, with ``REDIS_CLUSTER``, a Redis Cluster (docs/cluster.md). In a
cluster each primary has a breaker of its own: a call that names its key (``redis_call(fn,
key=...)``: every script, every read of one value) is guarded by the breaker of the node serving
that key's slot, so a down node makes only its own counters unavailable; calls on several keys
(``keys=[...]``: reads of many values, batch updates) by the breakers of all their nodes. Every
call also passes ``breaker``, the store-wide one, which opens on failures that no node can be
blamed for (and is the only breaker with one Redis).
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.cluster
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django_redis import get_redis_connection
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError
from redis.retry import Retry

from metrics.recorders import breaker_state_record, redis_round_trip_record

from . import keyspace

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A node that is down, a slot whose primary is failing over (CLUSTERDOWN: the node refused the
# command) or not served at all: the store cannot take the call right now.
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, ClusterDownError, SlotNotCoveredError)


class StoreUnavailable(Exception):
    """Redis cannot be used right now (down, timing out, or the breaker is open).

    ``maybe_applied`` is False when the command certainly never reached Redis (the breaker was
    open, or connecting failed); after a failure while sending or reading it may have run there.
    """

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


def _failed_while_connecting(exc: Exception) -> bool:
    # redis-py words every connect-phase failure "... connecting to ..." (refused, timeout, DNS).
    # A CLUSTERDOWN reply or an unserved slot: the command was refused, never run.
    if isinstance(exc, (ClusterDownError, SlotNotCoveredError)):
        return True
    return isinstance(exc, ConnectionRefusedError) or "connecting to" in str(exc).lower()


class CircuitBreaker:
    def __init__(self, *, threshold: int, reset_seconds: float, node: str | None = None) -> None:
        self.node = node
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def before_call(self) -> None:
        if self._opened_at is None:
            return
        with self._lock:
            if self._opened_at is None:
                return
            if self._probing or time.monotonic() - self._opened_at < self.reset_seconds:
                raise StoreUnavailable("circuit open")
            self._probing = True

    def record_success(self) -> None:
        if self._failures or self._opened_at is not None:
            with self._lock:
                if self._opened_at is not None:
                    logger.warning("redis is reachable again: circuit closed%s", self._where())
                    breaker_state_record(is_open=False, node=self.node)
                self._failures = 0
                self._opened_at = None
                self._probing = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or (self._opened_at is None and self._failures >= self.threshold):
                if self._opened_at is None:
                    logger.error("redis unreachable: circuit opened, the service is read-only%s", self._where())
                    breaker_state_record(is_open=True, node=self.node)
                self._opened_at = time.monotonic()
                self._probing = False

    def reset(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False
        breaker_state_record(is_open=False, node=self.node)

    def _where(self) -> str:
        return f" (node {self.node}: only its counters)" if self.node else ""


def _new_breaker(node: str | None = None) -> CircuitBreaker:
    return CircuitBreaker(
        threshold=getattr(settings, "REDIS_BREAKER_THRESHOLD", 3),
        reset_seconds=getattr(settings, "REDIS_BREAKER_RESET_SECONDS", 2.0),
        node=node,
    )


# The store-wide breaker: the only one with a single Redis; in a cluster every call passes it too,
# and it opens on failures no node can be blamed for. ``node_breakers`` holds a cluster's per-node
# breakers, by "host:port".
breaker = _new_breaker()
breaker_state_record(is_open=False)
node_breakers: dict[str, CircuitBreaker] = {}
_node_breakers_lock = threading.Lock()


def breaker_of_node(node: str) -> CircuitBreaker:
    found = node_breakers.get(node)
    if found is None:
        with _node_breakers_lock:
            found = node_breakers.setdefault(node, _new_breaker(node))
    return found


def breakers_reset() -> None:
    """Close every breaker (tests, and an operator's reset)."""
    breaker.reset()
    for each in list(node_breakers.values()):
        each.reset()


def cluster_mode() -> bool:
    return bool(getattr(settings, "REDIS_CLUSTER", False))


def seed_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes of a cluster's REDIS_URL: ``redis://host:port[,host:port...]`` (no database)."""
    rest = url.split("://", 1)[1] if "://" in url else url
    seeds = []
    for part in rest.split(","):
        part = part.strip().split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        if not part:
            continue
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ImproperlyConfigured(f"REDIS_URL: '{part}' is not host:port (REDIS_CLUSTER lists seed nodes)")
        seeds.append((host.strip("[]"), int(port)))
    if not seeds:
        raise ImproperlyConfigured("REDIS_URL names no seed node of the Redis Cluster")
    return seeds


# A cluster pipeline resends a command whose node failed or timed out to the node's successor: a
# script that did run (only its reply was lost) would then apply twice. Only redirections, which
# Redis sends instead of running the command (MOVED, ASK, TRYAGAIN), are followed; a failure is
# the call's failure, as with one Redis.
redis.cluster.ClusterPipeline.ERRORS_ALLOW_RETRY = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
)


def node_credentials(url: str | None = None) -> dict[str, str]:
    """``username``/``password`` of a cluster's REDIS_URL (given once, on its first seed), for every node."""
    first = urlsplit((url or settings.REDIS_URL).split(",", 1)[0])
    found = {"username": unquote(first.username or ""), "password": unquote(first.password or "")}
    return {name: value for name, value in found.items() if value}


def cluster_connect(url: str | None = None, *, cls: type = redis.cluster.RedisCluster) -> redis.cluster.RedisCluster:
    """A client of the Redis Cluster named by REDIS_URL; ImproperlyConfigured with the reason if no
    seed answers, or the cluster does not serve all 16384 slots."""
    url = url or settings.REDIS_URL
    seeds = seed_nodes(url)
    try:
        cluster = cls(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in seeds],
            # No retries: a script sent again after a timeout could apply twice (as with one Redis).
            retry=Retry(NoBackoff(), 0),
            require_full_coverage=True,
            socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
            max_connections=getattr(settings, "REDIS_MAX_CONNECTIONS", 64),
            **node_credentials(url),
        )
    except (RedisClusterException, redis.RedisError, OSError) as exc:
        raise ImproperlyConfigured(
            f"REDIS_CLUSTER: no usable Redis Cluster at the seed nodes {', '.join(f'{h}:{p}' for h, p in seeds)}: {exc}"
        ) from exc
    served = sum(1 for nodes in cluster.nodes_manager.slots_cache.values() if nodes)
    if served != redis.cluster.REDIS_CLUSTER_HASH_SLOTS:
        cluster.close()
        raise ImproperlyConfigured(
            f"REDIS_CLUSTER: the cluster serves {served} of {redis.cluster.REDIS_CLUSTER_HASH_SLOTS} slots; "
            "every slot needs a primary (redis-cli --cluster check)"
        )
    return cluster


_cluster: list[redis.cluster.RedisCluster] = []
_cluster_lock = threading.Lock()


def client() -> redis.Redis:
    if not cluster_mode():
        return get_redis_connection("default")
    if not _cluster:
        with _cluster_lock:
            if not _cluster:
                _cluster.append(cluster_connect())
    return _cluster[0]


def client_forget() -> None:
    """Drop the cluster client (tests that point the settings at another cluster)."""
    with _cluster_lock:
        while _cluster:
            _cluster.pop().close()
    scripts.forget()


def store_check() -> None:
    """Fail at start, with the reason, on a bad cluster configuration (unreachable seeds, slots not
    served): called by the web and worker entry points. One Redis is not checked (a Redis down at
    start is an outage, served read-only like any other)."""
    if cluster_mode():
        client()


def node_of_key(key: str | bytes) -> str:
    """The "host:port" of the primary serving ``key``'s slot."""
    cluster = client()
    return cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key)).name


@contextlib.contextmanager
def slot_map_reading():
    """Around a read of the cluster's slot map: a cluster that cannot say which node serves a key
    (no node answers, a slot without a primary) makes the store unavailable for the call."""
    try:
        yield
    except (RedisClusterException, redis.RedisError) as exc:
        raise StoreUnavailable(str(exc)) from exc


def _guards(keys: list) -> list[CircuitBreaker]:
    """The breakers a call on ``keys`` must pass: the store-wide one (open: the whole store is out),
    and in a cluster those of the nodes serving the keys."""
    if not keys or not cluster_mode():
        return [breaker]
    with slot_map_reading():
        nodes = {node_of_key(key) for key in keys}
    return [breaker, *(breaker_of_node(node) for node in sorted(nodes))]


def _failed_node(exc: Exception) -> str | None:
    """The node a cluster client's connection error came from (redis-py attaches its connection)."""
    where = getattr(exc, "connection", None)
    host, port = getattr(where, "host", None), getattr(where, "port", None)
    return f"{host}:{port}" if host and port else None


def redis_call(fn: Callable[[redis.Redis], T], *, key: str | bytes | None = None, keys: list | None = None) -> T:
    """``fn(client)`` behind the breakers of the store and, in a cluster, of the nodes serving ``key``
    (or ``keys``): a failure counts against the node it came from, so a down node makes only the
    calls on its own slots fail fast."""
    guards = _guards([key] if key is not None else list(keys or ()))
    for guard in guards:
        guard.before_call()
    try:
        result = fn(client())
    except CONNECTION_ERRORS as exc:
        redis_round_trip_record(ok=False)
        failed = _failed_node(exc) if cluster_mode() else None
        if failed:
            breaker_of_node(failed).record_failure()  # the client asks the cluster for its slot map again
        else:
            guards[-1].record_failure()
        raise StoreUnavailable(str(exc), maybe_applied=not _failed_while_connecting(exc)) from exc
    redis_round_trip_record(ok=True)
    for guard in guards:
        guard.record_success()
    return result


def store_nodes() -> list[str]:
    """The primaries of the store, by "host:port" (one Redis: a single unnamed node, "")."""
    if not cluster_mode():
        return [""]
    with slot_map_reading():
        return sorted(node.name for node in client().get_primaries())


def nodes_of_keys(keys: list[str]) -> dict[str, list[int]]:
    """Positions of ``keys`` grouped by the node serving each (one Redis: all in node "")."""
    groups: dict[str, list[int]] = {}
    if not cluster_mode():
        return {"": list(range(len(keys)))} if keys else {}
    with slot_map_reading():
        for i, key in enumerate(keys):
            groups.setdefault(node_of_key(key), []).append(i)
    return groups


def node_call(fn: Callable[[redis.Redis], T], *, node: str | None = None, key: str | bytes | None = None) -> T:
    """``fn`` with a plain client of one node (``node``, or the node serving ``key``), behind its breaker.

    For work that goes node by node (the flusher, the archive): pipelines on a plain client load
    their scripts where they run (after a failover the new primary has none), and a down node
    fails only its own share. One Redis: the same as ``redis_call``.
    """
    if not cluster_mode():
        return redis_call(fn)
    with slot_map_reading():
        node = node or node_of_key(key)
    guards = [breaker, breaker_of_node(node)]
    for guard in guards:
        guard.before_call()
    try:
        cluster = client()
        target = cluster.get_node(node_name=node)
        if target is None:
            raise redis.ConnectionError(f"node {node} is no longer in the cluster")
        result = fn(cluster.get_redis_connection(target))
    except redis.exceptions.MovedError as exc:
        # The slot moved (failover, resharding) since the client last asked: nothing ran there.
        _topology_refresh()
        raise StoreUnavailable(f"slot moved: {exc}") from exc
    except CONNECTION_ERRORS as exc:
        redis_round_trip_record(ok=False)
        guards[-1].record_failure()
        _topology_refresh()
        raise StoreUnavailable(str(exc), maybe_applied=not _failed_while_connecting(exc)) from exc
    redis_round_trip_record(ok=True)
    for guard in guards:
        guard.record_success()
    return result


def _topology_refresh() -> None:
    """Ask the cluster again which node serves which slot (after a node failed: a replica may take over)."""
    with contextlib.suppress(RedisClusterException, redis.RedisError, OSError):
        client().nodes_manager.initialize()


_topology_refreshing = threading.Lock()


def topology_refresh_soon() -> None:
    """``_topology_refresh`` from the event loop (the fast lane, the stream hub), on a thread since it
    may wait on sockets; one at a time per process, as every caller refreshes the same client."""
    if not _topology_refreshing.acquire(blocking=False):
        return

    def refresh() -> None:
        try:
            _topology_refresh()
        finally:
            _topology_refreshing.release()

    asyncio.get_running_loop().run_in_executor(None, refresh)


class _Scripts:
    """Lua scripts, registered once per process; redis-py sends EVALSHA and loads on NOSCRIPT."""

    def __init__(self) -> None:
        self._scripts: dict[str, object] = {}

    def forget(self) -> None:
        self._scripts.clear()

    def _get(self, name: str, source: str):
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = client().register_script(source)
        return script

    @property
    def update(self):
        return self._get("update", keyspace.UPDATE_SCRIPT)

    @property
    def update_many(self):
        return self._get("update_many", keyspace.UPDATE_MANY_SCRIPT)

    @property
    def presence(self):
        return self._get("presence", keyspace.PRESENCE_SCRIPT)

    @property
    def hydrate(self):
        return self._get("hydrate", keyspace.HYDRATE_SCRIPT)

    @property
    def move_pending(self):
        return self._get("move_pending", keyspace.MOVE_PENDING_SCRIPT)

    @property
    def derive(self):
        return self._get("derive", keyspace.DERIVE_SCRIPT)

    @property
    def rebase(self):
        return self._get("rebase", keyspace.REBASE_SCRIPT)

    @property
    def drop_batch(self):
        return self._get("drop_batch", keyspace.DROP_BATCH_SCRIPT)

    @property
    def trim_period(self):
        return self._get("trim_period", keyspace.TRIM_PERIOD_SCRIPT)


scripts = _Scripts()


def acquire_lock(name: str, *, ttl_seconds: float, token: str) -> bool:
    key = keyspace.lock_key(name)
    return bool(redis_call(lambda r: r.set(key, token, nx=True, px=int(ttl_seconds * 1000)), key=key))


_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def release_lock(name: str, *, token: str) -> None:
    key = keyspace.lock_key(name)
    redis_call(lambda r: r.eval(_RELEASE, 1, key, token), key=key)
