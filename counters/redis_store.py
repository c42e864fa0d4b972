"""Access to the Redis counter store, behind a circuit breaker.

Every Redis call of the service goes through ``redis_call``. After ``threshold`` consecutive
connection errors or timeouts the breaker opens: calls fail at once with ``StoreUnavailable``
(no request waits on a socket timeout) until ``reset_seconds`` have passed; then one call is let
through as a probe, and its success closes the breaker again.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from django.conf import settings
from django_redis import get_redis_connection

from metrics.recorders import breaker_state_record, redis_round_trip_record

from . import keyspace

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


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
    return isinstance(exc, ConnectionRefusedError) or "connecting to" in str(exc).lower()


class CircuitBreaker:
    def __init__(self, *, threshold: int, reset_seconds: float) -> None:
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
                    logger.warning("redis is reachable again: circuit closed")
                    breaker_state_record(is_open=False)
                self._failures = 0
                self._opened_at = None
                self._probing = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or (self._opened_at is None and self._failures >= self.threshold):
                if self._opened_at is None:
                    logger.error("redis unreachable: circuit opened, the service is read-only")
                    breaker_state_record(is_open=True)
                self._opened_at = time.monotonic()
                self._probing = False

    def reset(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False
        breaker_state_record(is_open=False)


breaker = CircuitBreaker(
    threshold=getattr(settings, "REDIS_BREAKER_THRESHOLD", 3),
    reset_seconds=getattr(settings, "REDIS_BREAKER_RESET_SECONDS", 2.0),
)
breaker_state_record(is_open=False)


def client() -> redis.Redis:
    return get_redis_connection("default")


def redis_call(fn: Callable[[redis.Redis], T]) -> T:
    breaker.before_call()
    try:
        result = fn(client())
    except CONNECTION_ERRORS as exc:
        redis_round_trip_record(ok=False)
        breaker.record_failure()
        raise StoreUnavailable(str(exc), maybe_applied=not _failed_while_connecting(exc)) from exc
    redis_round_trip_record(ok=True)
    breaker.record_success()
    return result


class _Scripts:
    """Lua scripts, registered once per process; redis-py sends EVALSHA and loads on NOSCRIPT."""

    def __init__(self) -> None:
        self._scripts: dict[str, object] = {}

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
    return bool(redis_call(lambda r: r.set(keyspace.lock_key(name), token, nx=True, px=int(ttl_seconds * 1000))))


_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def release_lock(name: str, *, token: str) -> None:
    redis_call(lambda r: r.eval(_RELEASE, 1, keyspace.lock_key(name), token))
