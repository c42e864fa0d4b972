"""Reads of counters, their values and API keys. Nothing here writes PostgreSQL."""

import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Max, Q, Sum
from django.db.models.functions import TruncHour
from django.utils.translation import gettext as _

from archive.models import PeriodArchive
from metrics.recorders import degraded_read_record

from . import clock, keyspace, periods, presence, split
from .config import DEFAULT_APP_SLUG, GLOBAL_APP_SLUG, CounterConfig, KeyConfig
from .config import cache as config_cache
from .errors import CounterNotFound, InvalidParameter
from .models import CounterValue, StatBucket, hash_api_key
from .redis_store import StoreUnavailable, redis_call
from .values import (
    VALUE_FIELDS,
    counter_check_subject,
    counter_opening_value,
    manual_resets_get,
    shard_values_read,
    value_hydrate,
)
from .write_through import store_reconcile_if_due


class ValueView:
    """A value as read. One is made per value of every read, so it is a plain slotted class: no
    frozen-dataclass setattr, and ``last_updated`` may be given as the value hash's milliseconds
    (an int, 0 for never), turned into a datetime only when asked for (a GET of ten names shows
    none of them)."""

    __slots__ = ("_updated", "counter", "degraded", "last_reset", "subject", "value", "window")

    def __init__(
        self,
        counter: CounterConfig,
        subject: str,
        value: int,
        last_updated: "datetime | int | None",
        window: periods.PeriodWindow,
        degraded: bool = False,  # True when Redis was unavailable and the value was read from PostgreSQL
        last_reset: datetime | None = None,  # the period's start, or a manual reset in the period after it
    ) -> None:
        self.counter, self.subject, self.value, self._updated = counter, subject, value, last_updated
        self.window, self.degraded, self.last_reset = window, degraded, last_reset

    @property
    def last_updated(self) -> datetime | None:
        updated = self._updated
        if updated.__class__ is int:
            updated = self._updated = clock.from_ms(updated) if updated else None
        return updated

    def __repr__(self) -> str:
        return f"ValueView({self.counter.name!r}, {self.subject!r}, {self.value}, {self.last_updated})"


def api_key_get(raw_key: str) -> KeyConfig | None:
    return config_cache.get().keys_by_hash.get(hash_api_key(raw_key))


def app_id_get(slug: str) -> int | None:
    return config_cache.get().apps_by_slug.get(slug)


def default_app_id() -> int | None:
    return app_id_get(DEFAULT_APP_SLUG)


def counter_get(*, app_id: int | None, name: str, now: datetime | None = None) -> CounterConfig:
    """A counter visible to an app: its own counter of that name, else the global one; live at
    ``now`` (default: this moment).

    An unknown name and another app's counter look the same (4004): an app cannot learn what
    other apps have.
    """
    snapshot = config_cache.get()
    counter = snapshot.counters.get((app_id, name)) if app_id is not None else None
    if counter is None:
        global_id = snapshot.apps_by_slug.get(GLOBAL_APP_SLUG)
        counter = snapshot.counters.get((global_id, name))
        if counter is not None and not counter.is_global:
            counter = None
    if counter is None or not counter.is_live(now or clock.now()):
        raise CounterNotFound(f"Counter {name!r} not found.")
    return counter


def _last_reset(window: periods.PeriodWindow, manual: datetime | None) -> datetime | None:
    if manual is None or (window.start is not None and manual < window.start):
        return window.start
    return manual


def _to_view(counter: CounterConfig, subject: str, window: periods.PeriodWindow, raw: list) -> ValueView:
    """A value hash's fields (``VALUE_FIELDS``) as a view; run per value of every read."""
    value, updated, reset_ms = raw
    last_reset = _last_reset(window, clock.from_ms(int(reset_ms))) if reset_ms else window.start
    return ValueView(counter, subject, int(value), int(updated) if updated else 0, window, False, last_reset)


def presence_view(counter: CounterConfig, subject: str, window: periods.PeriodWindow, result) -> ValueView:
    """A presence counter's value as read: the live leases counted at ``result.updated_at``, the read."""
    return ValueView(counter, subject, result.new_value, result.updated_at, window)


def counter_values_get(*, items: list[tuple[CounterConfig, str]]) -> list[ValueView]:
    """Current values of several (counter, subject) pairs in one Redis round trip (hydrating misses).

    While Redis is unavailable the values come from PostgreSQL, marked ``degraded``.
    """
    for counter, subject in items:
        counter_check_subject(counter=counter, subject=subject)
    now = clock.now()
    windows = [periods.window_at(c.period, c.time_zone, now) for c, _ in items]
    try:
        store_reconcile_if_due()
        return _values_from_store(items, windows, now)
    except StoreUnavailable:
        degraded_read_record()
        return counter_values_from_database(items=items, windows=windows)


def counter_values_from_database(
    *, items: list[tuple[CounterConfig, str]], windows: list[periods.PeriodWindow]
) -> list[ValueView]:
    """Values as PostgreSQL has them, without touching Redis (one query).

    In reject mode this lags Redis by the deltas not flushed yet when Redis went away (about one
    flush interval); in write-through mode it also includes every update made during the outage.
    """
    wanted = Q()
    for (counter, subject), window in zip(items, windows, strict=True):
        wanted |= Q(counter_id=counter.id, subject=subject, period=window.key)
    rows = {
        (r["counter_id"], r["subject"], r["period"]): r
        for r in CounterValue.objects.filter(wanted).values("counter_id", "subject", "period", "value", "updated_at")
    }
    resets = manual_resets_get(items=[(c.id, s, w.key) for (c, s), w in zip(items, windows, strict=True)])
    views = []
    for (counter, subject), window in zip(items, windows, strict=True):
        row = rows.get((counter.id, subject, window.key))
        if row is None:
            value = counter_opening_value(counter=counter, subject=subject, period_key=window.key, use_store=False)
            updated = None
        else:
            value, updated = row["value"], row["updated_at"]
        last_reset = _last_reset(window, resets.get((counter.id, subject, window.key)))
        views.append(ValueView(counter, subject, value, updated, window, degraded=True, last_reset=last_reset))
    return views


def _values_from_store(
    items: list[tuple[CounterConfig, str]], windows: list[periods.PeriodWindow], now: datetime
) -> list[ValueView]:
    # One key per value, or each shard's of a split counter (docs/splitting.md).
    keys = [
        split.value_keys(c, w.key, s) if c.shards > 1 else [keyspace.value_key(c.id, w.key, s)]
        for (c, s), w in zip(items, windows, strict=True)
    ]

    def read(r):
        pipe = r.pipeline(transaction=False)
        for (counter, _subject), window, value_keys in zip(items, windows, keys, strict=True):
            if counter.is_presence:
                # Counted at the moment of the read, lapsed leases dropped first.
                presence.presence_read_pipeline(pipe=pipe, counter=counter, window=window, now=now)
                continue
            for key in value_keys:
                pipe.hmget(key, *VALUE_FIELDS)
        return pipe.execute(raise_on_error=False)

    replies = iter(redis_call(read, keys=[key for value_keys in keys for key in value_keys]))
    views = []
    for (counter, subject), window, value_keys in zip(items, windows, keys, strict=True):
        if counter.is_presence:
            result = presence.presence_read_reply(counter=counter, window=window, reply=next(replies), now=now)
            views.append(presence_view(counter, subject, window, result))
            continue
        raws = [next(replies) for _ in value_keys]
        for raw in raws:
            if isinstance(raw, Exception):
                raise raw
        if len(raws) > 1:
            raw = split.combine(raws)
            if raw[0] is None:
                raw = split.combine(shard_values_read(counter=counter, subject=subject, window=window))
        else:
            raw = raws[0]
            if raw[0] is None:
                value_hydrate(counter=counter, subject=subject, window=window)
                key = value_keys[0]
                raw = redis_call(lambda r, k=key: r.hmget(k, *VALUE_FIELDS), key=key)
        views.append(_to_view(counter, subject, window, raw))
    return views


def counter_value_get(*, counter: CounterConfig, subject: str = "") -> ValueView:
    return counter_values_get(items=[(counter, subject)])[0]


def parse_names(raw: str, *, limit: int = 10) -> list[str]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        raise InvalidParameter("Give 1 to 10 counter names: ?names=a,b")
    if len(names) > limit:
        raise InvalidParameter(f"At most {limit} names per request ({len(names)} given).")
    return list(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    label: str
    value: int
    peak: int
    operations: int


def counter_config_get(*, counter_id: int) -> CounterConfig | None:
    """The config of a counter by id, reloading the snapshot once if it does not know the id yet."""
    counter = config_cache.get().counters_by_id.get(counter_id)
    if counter is None:
        config_cache.invalidate()
        counter = config_cache.get().counters_by_id.get(counter_id)
    return counter


def public_counters_get(*, app_id: int) -> list[CounterConfig]:
    """An app's public, live, not per-player counters, in name order (what a board shows)."""
    now = clock.now()
    return sorted(
        (
            c
            for c in config_cache.get().counters_by_id.values()
            if c.app_id == app_id and c.public and not c.is_user_scoped and c.is_live(now)
        ),
        key=lambda c: c.name,
    )


def counter_history_get(*, counter_id: int, limit: int) -> list[HistoryPoint]:
    """The last ``limit`` closed periods of a counter (not per player), oldest first."""
    rows = (
        PeriodArchive.objects.filter(counter_id=counter_id, subject="")
        .order_by("-period_start")
        .values_list("period", "final_value", "peak", "operations")[:limit]
    )
    return [HistoryPoint(*row) for row in reversed(rows)]


def counter_hourly_series_get(*, counter: CounterConfig, hours_without_period: int = 24) -> list[HistoryPoint]:
    """Per-hour activity of the current period (the last ``hours_without_period`` hours for counters
    without a period), from the per-minute stats the flusher writes: value at the end of each hour
    with activity, the hour's highest value and its number of operations. Labels are local hours."""
    now = clock.now()
    window = periods.window_at(counter.period, counter.time_zone, now)
    start = window.start if window.start is not None else now - timedelta(hours=hours_without_period)
    zone = zoneinfo.ZoneInfo(counter.time_zone)
    buckets = StatBucket.objects.filter(counter_id=counter.id, minute__gte=start, minute__lte=now)
    hourly = (
        buckets.annotate(hour=TruncHour("minute", tzinfo=zone))
        .values("hour")
        .annotate(operations=Sum("operations"), peak=Max("max_value"), last_minute=Max("minute"))
        .order_by("hour")
    )
    rows = list(hourly)
    last_values = dict(buckets.filter(minute__in=[r["last_minute"] for r in rows]).values_list("minute", "last_value"))
    points = []
    for row in rows:
        last = last_values.get(row["last_minute"])
        label = row["hour"].astimezone(zone).strftime("%m-%d %H:00")
        value = last if last is not None else (row["peak"] or 0)
        points.append(HistoryPoint(label, value, row["peak"] or value, row["operations"]))
    return points


def counter_type_of(counter: CounterConfig) -> str:
    """The cloud functions' ``counterType`` of a counter: its scope, or its period for periodic app counters."""
    if counter.scope != "app":
        return counter.scope
    return counter.period if counter.period in (periods.DAILY, periods.WEEKLY, periods.MONTHLY) else "app"


def counter_get_typed(*, app_id: int, counter_type: str, name: str) -> CounterConfig:
    """A counter by the cloud functions' ``(counterType, counterId)``.

    ``global`` names a counter of the global app; every other type a counter of the caller's app.
    ``app`` matches any app counter, ``daily`` / ``weekly`` / ``monthly`` only an app counter with that period,
    ``user`` a per-player counter. A type that does not match is "not found" (4004), like an
    unknown name: a (type, id) pair names a counter or nothing.
    """
    snapshot = config_cache.get()
    if counter_type == "global":
        counter = snapshot.counters.get((snapshot.apps_by_slug.get(GLOBAL_APP_SLUG), name))
        found = counter is not None and counter.is_global
    else:
        counter = snapshot.counters.get((app_id, name))
        found = counter is not None and (
            counter_type == counter.scope or (counter.scope == "app" and counter_type_of(counter) == counter_type)
        )
    if not found or not counter.is_live(clock.now()):
        message = _("Counter '%(name)s' of type %(type)s not found.") % {"name": name, "type": counter_type}
        raise CounterNotFound(message)
    return counter


def threshold_marks_get(*, counter: CounterConfig, subject: str, window: periods.PeriodWindow) -> dict[int, datetime]:
    """When each threshold of the counter was first crossed in the period (threshold id -> time)."""
    marks_key = keyspace.threshold_marks_key(counter.id, window.key, subject)
    raw = redis_call(lambda r: r.hgetall(marks_key), key=marks_key)
    return {int(k): clock.from_ms(int(v)) for k, v in raw.items()}


def app_time_zone_get(app_id: int) -> str:
    return config_cache.get().time_zones[app_id]
