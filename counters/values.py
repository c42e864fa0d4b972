"""Values and hydration: result types, bounds, opening values, and loading a value into Redis."""

import math
from dataclasses import dataclass
from datetime import datetime

import orjson
from django.db.models import Q
from django.utils.translation import gettext

from archive.models import ResetLog

from . import clock, keyspace, periods, split
from .config import CounterConfig
from .errors import OutOfLimits, RuleViolation
from .models import CounterValue, UniqueMember
from .redis_store import redis_call, scripts

MEMBER_CHUNK = 5000


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and one of these is
# made per update (frozen=True made its construction 6 times slower, bench/README.md).
@dataclass(slots=True)
class UpdateResult:
    counter: CounterConfig
    subject: str
    window: periods.PeriodWindow
    old_value: int
    new_value: int
    duplicate: bool
    crossed: tuple[int, ...]
    threshold_marks: dict[int, datetime]
    updated_at: datetime
    # Answered from the record of its Idempotency-Key: the first request's outcome, nothing changed.
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class ResetResult:
    counter: CounterConfig
    subject: str
    old_value: int
    new_value: int
    reset_at: datetime
    reason: str
    operator: str
    replayed: bool = False


def counter_check_subject(*, counter: CounterConfig, subject: str) -> None:
    if counter.is_user_scoped and not subject:
        raise RuleViolation(
            gettext("Counter '%(name)s' is per player: a player id is required.") % {"name": counter.name}
        )
    if subject and not counter.is_user_scoped:
        raise RuleViolation(
            gettext("Counter '%(name)s' is not per player: do not send a player id.") % {"name": counter.name}
        )


def counter_value_bounds(*, counter: CounterConfig, allow_negative: bool = False) -> tuple[int, int]:
    """The lowest and highest value the counter may hold (what opening values are clamped to).

    ``allow_negative`` lifts the lower bound for one update (a cloud-function caller allowed to manage counters).
    """
    low = -keyspace.MAX_SAFE_VALUE if (counter.allow_negative or allow_negative) else counter.min_value
    high = keyspace.MAX_SAFE_VALUE if counter.max_value is None else min(counter.max_value, keyspace.MAX_SAFE_VALUE)
    return low, high


def counter_out_of_limits(*, counter: CounterConfig, old: int, bound: int, below: bool) -> OutOfLimits:
    """The refusal of an update that would leave the bounds (Redis and write-through paths alike)."""
    if below:
        message = gettext("Counter '%(name)s' is at %(old)d: going below %(low)d is not allowed.")
        return OutOfLimits(message % {"name": counter.name, "old": old, "low": bound})
    message = gettext("Counter '%(name)s' is at %(old)d: going above %(high)d is not allowed.")
    return OutOfLimits(message % {"name": counter.name, "old": old, "high": bound})


def _apply_strategy(counter: CounterConfig, previous: int) -> int:
    strategy = counter.reset_strategy
    if strategy == "keep":
        value = previous
    elif strategy == "ratio":
        value = math.floor(previous * counter.reset_ratio)
    elif strategy == "difference":
        value = previous - counter.reset_difference
    else:
        value = counter.reset_value
    low, high = counter_value_bounds(counter=counter)
    return max(low, min(high, value))


# How many closed periods back the opening value looks for a value still in Redis (not yet trimmed).
OPENING_LOOKBACK_PERIODS = 400


def _latest_closed_value(
    counter: CounterConfig, subject: str, period_key: str, use_store: bool
) -> tuple[str, int] | None:
    """The most recent period before ``period_key`` that has a value, and that value.

    Redis holds the exact value (PostgreSQL plus pending deltas) of every period the archive task
    has not trimmed yet, so it wins over PostgreSQL for any period at least as recent as
    PostgreSQL's latest row. Without the store (Redis down) PostgreSQL alone answers.
    """
    previous = periods.previous_key(counter.period, period_key)
    if use_store:
        previous_key = keyspace.value_key(counter.id, previous, subject)
        hot = redis_call(lambda r: r.hget(previous_key, "v"), key=previous_key)
        if hot is not None:
            return previous, int(hot)
    durable = (
        CounterValue.objects.filter(counter_id=counter.id, subject=subject, period__lt=period_key)
        .exclude(period="")
        .order_by("-period")
        .values_list("period", "value")
        .first()
    )
    if not use_store:
        return durable
    # Without a durable row, a value can only be in Redis if the flusher has been down: look back less.
    limit = OPENING_LOOKBACK_PERIODS if durable is not None else OPENING_LOOKBACK_PERIODS // 8
    candidates = []
    key = periods.previous_key(counter.period, previous)
    while len(candidates) < limit and (durable is None or key >= durable[0]):
        candidates.append(key)
        key = periods.previous_key(counter.period, key)

    def read(r):
        pipe = r.pipeline(transaction=False)
        for candidate in candidates:
            pipe.hget(keyspace.value_key(counter.id, candidate, subject), "v")
        return pipe.execute()

    # Every candidate is a value of the same counter: one slot, one node.
    slot_key = keyspace.value_key(counter.id, period_key, subject)
    for candidate, raw in zip(candidates, redis_call(read, key=slot_key) if candidates else [], strict=True):
        if raw is not None:
            return candidate, int(raw)
    return durable


def counter_opening_value(*, counter: CounterConfig, subject: str, period_key: str, use_store: bool = True) -> int:
    """The value a period opens with, following the counter's reset strategy.

    It depends only on the values of earlier periods, never on whether the archive task has
    run: an idle period in between opened by the strategy too. With ``use_store=False`` (Redis
    down) earlier periods are read from PostgreSQL only.
    """
    if counter.period == periods.NONE:
        return 0
    if counter.reset_strategy == "value":
        return _apply_strategy(counter, 0)
    latest = _latest_closed_value(counter, subject, period_key, use_store)
    if latest is None:
        return _apply_strategy(counter, 0)
    key, value = latest
    for _ in range(10_000):
        key = periods.next_key(counter.period, key)
        if key >= period_key:
            break
        value = _apply_strategy(counter, value)
    return _apply_strategy(counter, value)


def members_to_store(counter: CounterConfig, window: periods.PeriodWindow, shard: int = 0) -> None:
    """Add the period's unique members from PostgreSQL to the Redis set (a union; safe to repeat).

    A split counter's shard gets the members it counts (``split.shard_of``)."""
    members_key = keyspace.members_key(keyspace.unit(counter.id, shard), window.key)
    members = UniqueMember.objects.filter(counter_id=counter.id, period=window.key).values_list("member", flat=True)
    chunk: list[str] = []
    for member in members.iterator(chunk_size=MEMBER_CHUNK):
        if counter.shards > 1 and not split.member_in_shard(counter, member, shard):
            continue
        chunk.append(member)
        if len(chunk) >= MEMBER_CHUNK:
            redis_call(lambda r, c=chunk: r.sadd(members_key, *c), key=members_key)
            chunk = []
    if chunk:
        redis_call(lambda r: r.sadd(members_key, *chunk), key=members_key)


def value_hydrate(*, counter: CounterConfig, subject: str, window: periods.PeriodWindow, shard: int = 0) -> None:
    """Load a value (and the period's unique members) from PostgreSQL into Redis; of a split
    counter, one shard's share of it (``split.shard_base``)."""
    rows = CounterValue.objects.filter(counter_id=counter.id, subject=subject, period=window.key)
    fields = ["value", "peak", "operations", "updated_at", "version"]
    if counter.shards > 1 and shard == 0:
        # One statement, one snapshot: a shard's flush changes its row and the total together.
        rows, fields = split.with_shard_sums(rows), [*fields, *split.SUM_FIELDS]
    row = rows.values(*fields).first()
    if row is None:
        # Every shard of a split counter makes the row, so the opening value is always in it (shard
        # 0's share: split.shard_base) whichever shard is hydrated first.
        opening = counter_opening_value(counter=counter, subject=subject, period_key=window.key)
        if opening != 0:
            obj, _ = CounterValue.objects.get_or_create(
                counter_id=counter.id,
                subject=subject,
                period=window.key,
                defaults={"value": opening, "peak": opening, "updated_at": clock.now()},
            )
            row = {"value": obj.value, "peak": obj.peak, "operations": obj.operations, "updated_at": obj.updated_at}
            row["version"] = obj.version
    if row is None:
        row = {"value": 0, "peak": 0, "operations": 0, "updated_at": None, "version": 0}
    if counter.shards > 1:
        if shard:
            base = split.shard_base(counter_id=counter.id, subject=subject, period=window.key, shard=shard, row=None)
            row = {"value": base[0], "peak": base[0], "operations": base[1], "updated_at": None, "version": base[2]}
        else:
            value = row["value"] - (row.get("shards_value") or 0)
            row = {**row, "value": value, "peak": value, "operations": row["operations"] - (row.get("shards_ops") or 0)}
    if counter.unique_members:
        members_to_store(counter, window, shard)
    updated_ms = clock.to_ms(row["updated_at"]) if row["updated_at"] else 0
    reset_ms = ""
    if shard == 0:
        reset_at = manual_resets_get(items=[(counter.id, subject, window.key)]).get((counter.id, subject, window.key))
        reset_ms = clock.to_ms(reset_at) if reset_at else ""
    value_key = keyspace.value_key(keyspace.unit(counter.id, shard), window.key, subject)
    redis_call(
        lambda r: scripts.hydrate(
            keys=[value_key],
            args=[
                row["value"],
                max(row["peak"], row["value"]),
                row["operations"],
                updated_ms,
                row["version"],
                reset_ms,
            ],
            client=r,
        ),
        key=value_key,
    )


VALUE_FIELDS = ("v", "upd", keyspace.LAST_RESET_FIELD)


def shard_values_read(*, counter: CounterConfig, subject: str, window: periods.PeriodWindow) -> list[list]:
    """``VALUE_FIELDS`` of each shard of a split counter's value (shard 0 first), hydrating a shard
    that is not in Redis (``split.combine`` sums them)."""
    keys = split.value_keys(counter, window.key, subject)

    def read(r):
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, *VALUE_FIELDS)
        return pipe.execute()

    raws = redis_call(read, keys=keys)
    for shard, key in enumerate(keys):
        if raws[shard][0] is None:
            value_hydrate(counter=counter, subject=subject, window=window, shard=shard)
            raws[shard] = redis_call(lambda r, k=key: r.hmget(k, *VALUE_FIELDS), key=key)
    return raws


def manual_resets_get(*, items: list[tuple[int, str, str]]) -> dict[tuple[int, str, str], datetime]:
    """The time of the last manual reset of each ``(counter id, subject, period)`` that had one (one query)."""
    if not items:
        return {}
    wanted = Q()
    for counter_id, subject, period in items:
        wanted |= Q(counter_id=counter_id, subject=subject, period=period)
    rows = (
        ResetLog.objects.filter(wanted, kind=ResetLog.Kind.MANUAL)
        .order_by("counter_id", "subject", "period", "-created_at")
        .distinct("counter_id", "subject", "period")
        .values_list("counter_id", "subject", "period", "created_at")
    )
    return {(c, s, p): at for c, s, p, at in rows}


def value_rebase(*, counter_id: keyspace.Unit, period: str, subject: str, value: int, version: int) -> bool:
    """Make a value's Redis copy continue from PostgreSQL's row (``value`` at ``version``); of a
    split counter's shard (``counter_id`` its unit), from the shard's base (``split.shard_base``).

    Redis keeps what it has not moved to a flush batch yet on top of PostgreSQL's value. The
    caller holds the row's lock (``SELECT ... FOR UPDATE``), so no flush changes the row meanwhile.
    False while a flush batch of the counter is in flight (PostgreSQL may or may not hold it yet):
    try again after it.
    """
    keys = [
        keyspace.value_key(counter_id, period, subject),
        keyspace.batches_key(counter_id),
        keyspace.pending_key(counter_id),
    ]
    args = [value, version, keyspace.value_field(period, subject)]
    return bool(redis_call(lambda r: scripts.rebase(keys=keys, args=args, client=r), key=keys[0]))


def operation_log_prefix(*, actor: str, user_id: str, subject: str, period: str, ms: int, metadata: dict | None) -> str:
    """An operation-log entry without its closing brace: the update script appends old and new."""
    entry = {"ts": ms, "actor": actor, "user_id": user_id, "subject": subject, "period": period}
    entry["metadata"] = metadata or {}
    return orjson.dumps(entry).decode()[:-1]
