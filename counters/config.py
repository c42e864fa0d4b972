"""In-process snapshot of counter configuration and API keys.

The request path never queries the database for config: the snapshot is reloaded when it is
older than ``COUNTER_CONFIG_CACHE_SECONDS`` or when another process bumped the config generation
in Redis (checked at most every ``COUNTER_CONFIG_CHECK_SECONDS``). Saving config in this process
drops the snapshot at once (see ``counters.receivers``).
"""

import dataclasses
import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.core.signals import setting_changed

from . import keyspace
from .models import ApiKey, App, Counter, Threshold
from .redis_store import redis_call

logger = logging.getLogger(__name__)

GLOBAL_APP_SLUG = "global"
_USER_SCOPE, _GLOBAL_SCOPE = Counter.Scope.USER.value, Counter.Scope.GLOBAL.value
_PRESENCE = Counter.Kind.PRESENCE.value
DEFAULT_APP_SLUG = "default"


@dataclass(frozen=True, slots=True)
class ThresholdConfig:
    id: int
    value: int
    direction: str
    level: str
    cooldown_seconds: int
    rearm: bool


@dataclass(frozen=True, slots=True)
class CounterConfig:
    id: int
    app_id: int
    app_slug: str
    name: str
    display_name: str
    description: str
    unit: str
    scope: str
    period: str
    time_zone: str
    reset_strategy: str
    reset_value: int
    reset_ratio: float
    reset_difference: int
    min_value: int
    max_value: int | None
    allow_negative: bool
    saturate: bool
    unique_members: bool
    public: bool
    log_operations: bool
    expires_at: datetime | None
    thresholds: tuple[ThresholdConfig, ...]
    kind: str
    lease_seconds: int
    presence_counts: str
    # > 1: a split counter (counters.split)
    shards: int = 1
    # Derived from kind and scope once, when the snapshot is built: these are read several times
    # per update of a batch and per value of a read (a slot costs a fraction of a property call).
    is_presence: bool = field(init=False, compare=False, repr=False)
    is_user_scoped: bool = field(init=False, compare=False, repr=False)
    is_global: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_presence", self.kind == _PRESENCE)
        object.__setattr__(self, "is_user_scoped", self.scope == _USER_SCOPE)
        object.__setattr__(self, "is_global", self.scope == _GLOBAL_SCOPE)

    def is_live(self, now: datetime) -> bool:
        """False from the moment a temporary counter expires: it is then "not found" everywhere."""
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class KeyConfig:
    id: int
    app_id: int
    app_slug: str
    prefix: str
    roles: frozenset[str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    apps_by_slug: dict[str, int]
    counters: dict[tuple[int, str], CounterConfig]
    counters_by_id: dict[int, CounterConfig]
    keys_by_hash: dict[str, KeyConfig]
    time_zones: dict[int, str]


def _load() -> Snapshot:
    apps = {app.id: app for app in App.objects.all()}
    thresholds: dict[int, list[ThresholdConfig]] = {}
    for t in Threshold.objects.filter(enabled=True).order_by("value"):
        thresholds.setdefault(t.counter_id, []).append(
            ThresholdConfig(t.id, t.value, t.direction, t.level, t.cooldown_seconds, t.rearm)
        )
    counters = {}
    derived = {"time_zone", "reset_ratio"}
    model_fields = {f.attname for f in Counter._meta.concrete_fields}
    copied = [f.name for f in dataclasses.fields(CounterConfig) if f.name in model_fields and f.name not in derived]
    for c in Counter.objects.all():
        app = apps[c.app_id]
        counters[(c.app_id, c.name)] = CounterConfig(
            **{name: getattr(c, name) for name in copied},
            app_slug=app.slug,
            time_zone=c.time_zone or app.effective_time_zone,
            reset_ratio=float(c.reset_ratio),
            thresholds=tuple(thresholds.get(c.id, ())),
        )
    keys = {
        k.key_hash: KeyConfig(k.id, k.app_id, apps[k.app_id].slug, k.prefix, frozenset(k.roles))
        for k in ApiKey.objects.filter(active=True)
    }
    return Snapshot(
        apps_by_slug={app.slug: app.id for app in apps.values()},
        counters=counters,
        counters_by_id={c.id: c for c in counters.values()},
        keys_by_hash=keys,
        time_zones={app.id: app.effective_time_zone for app in apps.values()},
    )


# The fast lane checks the snapshot without blocking its event loop, then pins it for the request:
# while pinned, ``get`` answers it at once (see counters.fastlane.snapshot).
pinned: ContextVar["Snapshot | None"] = ContextVar("pinned_config_snapshot", default=None)


# COUNTER_CONFIG_CACHE_SECONDS and COUNTER_CONFIG_CHECK_SECONDS, read once (and again when a test
# changes a setting): every request of the fast lane asks ``due``, and a settings attribute costs
# a lookup through Django's lazy object each time.
_ages = (0.0, 0.0)


def _ages_read(**_) -> None:
    global _ages
    _ages = (settings.COUNTER_CONFIG_CACHE_SECONDS, settings.COUNTER_CONFIG_CHECK_SECONDS)


_ages_read()
setting_changed.connect(_ages_read, dispatch_uid="counters.config.ages")


class ConfigCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._loaded_at = 0.0
        self._checked_at = 0.0
        self._generation: bytes | None = None

    def invalidate(self) -> None:
        self._snapshot = None

    def _remote_generation(self) -> bytes | None:
        try:
            return redis_call(lambda r: r.get(keyspace.CONFIG_GENERATION_KEY), key=keyspace.CONFIG_GENERATION_KEY)
        except Exception:  # Redis down: the TTL alone bounds staleness.
            return self._generation

    def due(self) -> tuple[Snapshot | None, str]:
        """The current snapshot and what it needs: "fresh", "check" (compare the generation in Redis)
        or "reload" (none yet, or older than the TTL). Does no I/O."""
        snapshot, monotonic = self._snapshot, time.monotonic()
        max_age, check_every = _ages
        if snapshot is None or monotonic - self._loaded_at >= max_age:
            return snapshot, "reload"
        if monotonic - self._checked_at < check_every:
            return snapshot, "fresh"
        return snapshot, "check"

    @property
    def generation(self) -> bytes | None:
        return self._generation

    def checked(self, generation: bytes | None) -> bool:
        """Record a generation check done by the caller; True if the snapshot is still current."""
        self._checked_at = time.monotonic()
        return generation == self._generation

    def reload(self, generation: bytes | None) -> Snapshot:
        """Load a new snapshot from PostgreSQL (blocking: the fast lane runs it off its event loop)."""
        with self._lock:
            snapshot = _load()
            self._snapshot, self._generation = snapshot, generation
            self._loaded_at = self._checked_at = time.monotonic()
            return snapshot

    def get(self) -> Snapshot:
        pinned_snapshot = pinned.get()
        if pinned_snapshot is not None:
            return pinned_snapshot
        monotonic = time.monotonic()
        snapshot = self._snapshot
        max_age, check_every = _ages
        if snapshot is not None and monotonic - self._loaded_at < max_age:
            if monotonic - self._checked_at < check_every:
                return snapshot
            self._checked_at = monotonic
            if self._remote_generation() == self._generation:
                return snapshot
        with self._lock:
            if self._snapshot is not None and self._snapshot is not snapshot:
                return self._snapshot
            generation = self._remote_generation()
            self._snapshot = _load()
            self._generation = generation
            self._loaded_at = self._checked_at = time.monotonic()
            return self._snapshot


cache = ConfigCache()


def bump_generation() -> None:
    """Tell every process that config changed (and drop this process's snapshot now)."""
    cache.invalidate()
    try:
        redis_call(lambda r: r.incr(keyspace.CONFIG_GENERATION_KEY), key=keyspace.CONFIG_GENERATION_KEY)
    except Exception:
        logger.warning("could not publish a config change to Redis; other processes see it within the cache TTL")
