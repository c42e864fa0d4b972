"""Every write of the counter service: updates, resets, hydration and the write-behind flush."""

import contextlib
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import itemgetter

import orjson
import redis
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Greatest
from django.utils.translation import gettext

from archive.models import ResetLog

from . import clock, keyspace, periods
from .config import CounterConfig
from .config import cache as config_cache
from .errors import (
    CounterError,
    CounterNotFound,
    IdempotencyConflict,
    InvalidParameter,
    OutOfLimits,
    ServiceReadOnly,
)
from .idempotency import REPLAYED_HEADERS, Idempotency
from .models import Counter, CounterValue, FlushedBatch, UniqueMember, WrittenThroughValue
from .redis_store import StoreUnavailable, acquire_lock, redis_call, release_lock, scripts

logger = logging.getLogger(__name__)

MEMBER_CHUNK = 5000


@dataclass(frozen=True, slots=True)
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


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def counter_check_subject(*, counter: CounterConfig, subject: str) -> None:
    if counter.is_user_scoped and not subject:
        raise InvalidParameter(
            gettext("Counter '%(name)s' is per player: a player id is required.") % {"name": counter.name}
        )
    if subject and not counter.is_user_scoped:
        raise InvalidParameter(
            gettext("Counter '%(name)s' is not per player: do not send a player id.") % {"name": counter.name}
        )


def _check_live(counter: CounterConfig, now: datetime) -> None:
    if counter.expires_at is not None and now >= counter.expires_at:
        raise CounterNotFound(
            gettext("Counter '%(name)s' expired at %(time)s.")
            % {"name": counter.name, "time": counter.expires_at.isoformat()}
        )


def _bounds(counter: CounterConfig, allow_negative: bool) -> tuple[int, int]:
    low = -keyspace.MAX_SAFE_VALUE if (counter.allow_negative or allow_negative) else counter.min_value
    high = keyspace.MAX_SAFE_VALUE if counter.max_value is None else min(counter.max_value, keyspace.MAX_SAFE_VALUE)
    return low, high


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
    low, high = _bounds(counter, False)
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
        hot = redis_call(lambda r: r.hget(keyspace.value_key(counter.id, previous, subject), "v"))
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

    for candidate, raw in zip(candidates, redis_call(read) if candidates else [], strict=True):
        if raw is not None:
            return candidate, int(raw)
    return durable


def counter_value_bounds(*, counter: CounterConfig) -> tuple[int, int]:
    """The lowest and highest value the counter may hold (what opening values are clamped to)."""
    return _bounds(counter, False)


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


def _members_to_store(counter: CounterConfig, window: periods.PeriodWindow) -> None:
    """Add the period's unique members from PostgreSQL to the Redis set (a union; safe to repeat)."""
    members_key = keyspace.members_key(counter.id, window.key)
    members = UniqueMember.objects.filter(counter_id=counter.id, period=window.key).values_list("member", flat=True)
    chunk: list[str] = []
    for member in members.iterator(chunk_size=MEMBER_CHUNK):
        chunk.append(member)
        if len(chunk) >= MEMBER_CHUNK:
            redis_call(lambda r, c=chunk: r.sadd(members_key, *c))
            chunk = []
    if chunk:
        redis_call(lambda r: r.sadd(members_key, *chunk))


def value_hydrate(*, counter: CounterConfig, subject: str, window: periods.PeriodWindow) -> None:
    """Load a value (and the period's unique members) from PostgreSQL into Redis."""
    row = (
        CounterValue.objects.filter(counter_id=counter.id, subject=subject, period=window.key)
        .values("value", "peak", "operations", "updated_at")
        .first()
    )
    if row is None:
        opening = counter_opening_value(counter=counter, subject=subject, period_key=window.key)
        if opening != 0:
            obj, _ = CounterValue.objects.get_or_create(
                counter_id=counter.id,
                subject=subject,
                period=window.key,
                defaults={"value": opening, "peak": opening, "updated_at": clock.now()},
            )
            row = {"value": obj.value, "peak": obj.peak, "operations": obj.operations, "updated_at": obj.updated_at}
        else:
            row = {"value": 0, "peak": 0, "operations": 0, "updated_at": None}
    if counter.unique_members:
        _members_to_store(counter, window)
    updated_ms = clock.to_ms(row["updated_at"]) if row["updated_at"] else 0
    reset_at = manual_resets_get(items=[(counter.id, subject, window.key)]).get((counter.id, subject, window.key))
    reset_ms = clock.to_ms(reset_at) if reset_at else ""
    redis_call(
        lambda r: scripts.hydrate(
            keys=[keyspace.value_key(counter.id, window.key, subject)],
            args=[row["value"], max(row["peak"], row["value"]), row["operations"], updated_ms, reset_ms],
            client=r,
        )
    )


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


def _keyed_call(
    counter: CounterConfig, keys: list[str], args: list, idempotency: Idempotency | None, ms: int
) -> tuple[list[str], list]:
    """The update script's keys and arguments with the record of an Idempotency-Key appended."""
    if idempotency is None:
        return keys, args
    record = keyspace.idempotency_key(counter.id, idempotency.app_id, idempotency.key)
    return [*keys, record], [*args, idempotency.fingerprint, idempotency.ttl_ms, ms]


def _run_update(
    *,
    counter: CounterConfig,
    subject: str,
    window: periods.PeriodWindow,
    args: list,
    idempotency: Idempotency | None = None,
    ms: int = 0,
) -> list:
    keys, args = _keyed_call(counter, keyspace.update_keys(counter.id, window.key, subject), args, idempotency, ms)
    for _ in range(3):
        result = redis_call(lambda r: scripts.update(keys=keys, args=args, client=r))
        if result[0] != b"HYDRATE":
            return result
        value_hydrate(counter=counter, subject=subject, window=window)
    raise StoreUnavailable("value could not be hydrated")


def _log_prefix(*, actor: str, user_id: str, subject: str, period: str, ms: int, metadata: dict | None) -> str:
    entry = {"ts": ms, "actor": actor, "user_id": user_id, "subject": subject, "period": period}
    entry["metadata"] = metadata or {}
    return orjson.dumps(entry).decode()[:-1]


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    """One update of a batch: ``amount`` is negative for a decrement."""

    counter: CounterConfig
    amount: int
    subject: str = ""
    user_id: str = ""
    metadata: dict | None = None
    idempotency: Idempotency | None = None


@dataclass(frozen=True, slots=True)
class _PreparedUpdate:
    counter: CounterConfig
    subject: str
    window: periods.PeriodWindow
    keys: list[str]
    args: list
    low: int
    high: int
    member: str
    log: str
    idempotency: Idempotency | None = None


def _prepare_update(
    *,
    counter: CounterConfig,
    amount: int,
    subject: str,
    user_id: str,
    actor: str,
    metadata: dict | None,
    allow_negative: bool,
    now: datetime,
    window: periods.PeriodWindow | None = None,
    idempotency: Idempotency | None = None,
) -> _PreparedUpdate:
    """Check an update and build the update script's keys and arguments (no I/O)."""
    if amount == 0 or abs(amount) > keyspace.MAX_SAFE_VALUE:
        raise InvalidParameter(
            gettext("The amount must be a non-zero integer of at most %(max)d.") % {"max": keyspace.MAX_SAFE_VALUE}
        )
    counter_check_subject(counter=counter, subject=subject)
    _check_live(counter, now)
    member = user_id if counter.unique_members else ""
    if counter.unique_members and not member:
        raise InvalidParameter(
            gettext("Counter '%(name)s' counts each user once per period: a user_id is required.")
            % {"name": counter.name}
        )
    if member and amount < 0:
        raise InvalidParameter(
            gettext("Counter '%(name)s' counts unique users: it cannot be decremented per user.")
            % {"name": counter.name}
        )
    window = window or periods.window_at(counter.period, counter.time_zone, now)
    ms = clock.to_ms(now)
    low, high = _bounds(counter, allow_negative)
    log = (
        _log_prefix(actor=actor, user_id=user_id, subject=subject, period=window.key, ms=ms, metadata=metadata)
        if counter.log_operations
        else ""
    )
    args = ["add", amount, f"{window.key}|{subject}", member, low, high, int(counter.saturate), ms, ms // 60000]
    args += [int(not counter.is_user_scoped), log]
    for t in counter.thresholds:
        args += [t.id, t.value, t.direction, t.cooldown_seconds * 1000, int(t.rearm)]
    keys = keyspace.update_keys(counter.id, window.key, subject)
    return _PreparedUpdate(counter, subject, window, keys, args, low, high, member, log, idempotency)


def _replayed(result: list, now: datetime) -> tuple[list, datetime, bool]:
    """The reply to read and its time: a keyed call's recorded reply, or the call's own; a 409 if
    its key was used for another request."""
    status = result[0]
    if status == b"CONFLICT":
        raise IdempotencyConflict()
    if status == b"REPLAY":
        at, reply = keyspace.idempotency_record_parse(result[1])
        return reply, clock.from_ms(at), True
    return result, now, False


def _update_result(prepared: _PreparedUpdate, result: list, now: datetime) -> UpdateResult:
    """Read the update script's reply; a bounds refusal raises ``OutOfLimits``."""
    counter = prepared.counter
    result, now, replayed = _replayed(result, now)
    status = result[0]
    old, new = int(result[1]), int(result[2])
    headers = REPLAYED_HEADERS if replayed else None
    if status == b"MIN":
        raise OutOfLimits(
            gettext("Counter '%(name)s' is at %(old)d: going below %(low)d is not allowed.")
            % {"name": counter.name, "old": old, "low": prepared.low},
            headers=headers,
        )
    if status == b"MAX":
        raise OutOfLimits(
            gettext("Counter '%(name)s' is at %(old)d: going above %(high)d is not allowed.")
            % {"name": counter.name, "old": old, "high": prepared.high},
            headers=headers,
        )
    crossed: tuple[int, ...] = ()
    marks: dict[int, datetime] = {}
    if status == b"OK" and len(result) > 3:
        crossed = tuple(int(t) for t in result[3])
        flat = result[4]
        marks = {int(flat[i]): clock.from_ms(int(flat[i + 1])) for i in range(0, len(flat), 2)}
    return UpdateResult(
        counter=counter,
        subject=prepared.subject,
        window=prepared.window,
        old_value=old,
        new_value=new,
        duplicate=status == b"DUP",
        crossed=crossed,
        threshold_marks=marks,
        updated_at=now,
        replayed=replayed,
    )


def counter_reset_check(*, counter: CounterConfig, subject: str = "", value: int | None = None) -> int:
    """Validate a reset without changing anything; returns the value the counter would be set to."""
    counter_check_subject(counter=counter, subject=subject)
    target = counter.reset_value if value is None else value
    low, high = _bounds(counter, False)
    if not low <= target <= high:
        message = gettext("A reset value must lie between %(low)d and %(high)d.") % {"low": low, "high": high}
        raise OutOfLimits(f"{message} (counter {counter.name!r})")
    return target


def counter_update(
    *,
    counter: CounterConfig,
    amount: int,
    subject: str = "",
    user_id: str = "",
    actor: str = "",
    metadata: dict | None = None,
    allow_negative: bool = False,
    idempotency: Idempotency | None = None,
) -> UpdateResult:
    """Add ``amount`` (negative to decrement) to a counter in one Redis round trip.

    For unique-member counters ``user_id`` is counted once per period; a repeat changes nothing
    and reports the current value. Bounds are checked atomically: an update that would leave
    them changes nothing and raises ``OutOfLimits``. With an ``idempotency`` key the update is
    applied at most once per key: a repeat answers the first outcome (``replayed``), another
    request with the same key raises ``IdempotencyConflict``; both change nothing.
    """
    now = clock.now()
    prepared = _prepare_update(
        counter=counter,
        amount=amount,
        subject=subject,
        user_id=user_id,
        actor=actor,
        metadata=metadata,
        allow_negative=allow_negative,
        now=now,
        idempotency=idempotency,
    )
    try:
        store_reconcile_if_due()
        result = _run_update(
            counter=counter,
            subject=subject,
            window=prepared.window,
            args=prepared.args,
            idempotency=idempotency,
            ms=clock.to_ms(now),
        )
    except StoreUnavailable as exc:
        # A key is recorded in Redis only: without it a keyed write could apply twice, so it is
        # refused (503, not applied) rather than written through.
        if settings.COUNTER_REDIS_DOWN_WRITES != "write_through" or exc.maybe_applied or idempotency:
            raise
        _reconcile_due.set()
        return _update_write_through(
            counter=counter,
            amount=amount,
            subject=subject,
            member=prepared.member,
            window=prepared.window,
            now=now,
            bounds=(prepared.low, prepared.high),
            log=prepared.log,
        )
    return _update_result(prepared, result, now)


_OWN_KEYS, _OWN_ARGS = itemgetter(*keyspace.UPDATE_OWN_KEYS), itemgetter(*keyspace.UPDATE_OWN_ARGS)


def update_call(prepared: _PreparedUpdate) -> tuple[list[str], list]:
    """KEYS and ARGV of the ``UPDATE_SCRIPT`` call of one prepared update (with its Idempotency-Key)."""
    ms = prepared.args[7]
    return _keyed_call(prepared.counter, prepared.keys, prepared.args, prepared.idempotency, ms)


def update_many_call(group: list[_PreparedUpdate]) -> tuple[list[str], list]:
    """KEYS and ARGV of one ``UPDATE_MANY_SCRIPT`` call: updates of one counter and period, in order.

    With Idempotency-Keys each item's own keys and arguments end with its record and fingerprint
    (a placeholder key in the slot and '' for an item without a key).
    """
    first = group[0]
    keyed = any(item.idempotency for item in group)
    header = [len(first.keys), len(first.args), int(keyed), settings.COUNTER_IDEMPOTENCY_KEY_SECONDS * 1000]
    keys, args = list(first.keys), [*header, first.args[7], *first.args]
    for item in group:
        keys += _OWN_KEYS(item.keys)
        args += _OWN_ARGS(item.args)
        if keyed:
            idem = item.idempotency
            keys.append(keyspace.idempotency_key(item.counter.id, idem.app_id, idem.key) if idem else item.keys[0])
            args.append(idem.fingerprint if idem else "")
    return keys, args


def _run_update_pipeline(prepared: list[_PreparedUpdate]) -> list[list]:
    """Run every update, in order, in one round trip: one ``UPDATE_MANY_SCRIPT`` call per counter.

    Each item gets what ``UPDATE_SCRIPT`` would have answered. Only a value not yet hydrated (or a
    Redis that lost the script) costs another round trip: those items, which the script left
    untouched, run again in their order after hydration.
    """
    results: list = [None] * len(prepared)
    todo = list(range(len(prepared)))
    sha = scripts.update_many.sha

    def run(r, groups: list[list[int]]) -> list:
        pipe = r.pipeline(transaction=False)
        for group in groups:
            keys, args = update_many_call([prepared[i] for i in group])
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    for _ in range(3):
        # Updates of one counter and period share everything but UPDATE_OWN_KEYS/ARGS: the same
        # bounds, time and thresholds (one counter_update_many call).
        by_counter: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i in todo:
            by_counter[(prepared[i].counter.id, prepared[i].window.key)].append(i)
        groups = list(by_counter.values())
        retry, cold, noscript = [], {}, False
        for group, reply in zip(groups, redis_call(lambda r, g=groups: run(r, g)), strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                retry += group
                noscript = True
            elif isinstance(reply, Exception):
                raise reply
            else:
                for i, item_reply in zip(group, reply, strict=True):
                    if item_reply[0] == b"HYDRATE":
                        retry.append(i)
                        cold[prepared[i].keys[0]] = prepared[i]
                    else:
                        results[i] = item_reply
        if not retry:
            return results
        if noscript:
            redis_call(lambda r: r.script_load(keyspace.UPDATE_MANY_SCRIPT))
        for item in cold.values():
            value_hydrate(counter=item.counter, subject=item.subject, window=item.window)
        todo = sorted(retry)
    raise StoreUnavailable("values could not be hydrated")


def counter_update_many(
    *, updates: list[UpdateRequest], actor: str = "", allow_negative: bool = False
) -> list[UpdateResult | OutOfLimits]:
    """Apply many updates, in order, in one Redis round trip (game servers that aggregate events).

    Every item is checked before anything is applied: an invalid item raises and nothing
    changes. Bounds are per item, as for ``counter_update``: an item that would leave them
    changes nothing and comes back as an ``OutOfLimits`` in its place; the others apply.
    With Redis down a batch is refused (503) even in write-through mode: a partly written batch
    could not be told apart from an applied one.
    """
    now = clock.now()
    prepared = []
    windows: dict[int, periods.PeriodWindow] = {}  # one period computation per counter, not per item
    for index, update in enumerate(updates):
        counter = update.counter
        if counter.id not in windows:
            windows[counter.id] = periods.window_at(counter.period, counter.time_zone, now)
        try:
            prepared.append(
                _prepare_update(
                    counter=update.counter,
                    amount=update.amount,
                    subject=update.subject,
                    user_id=update.user_id,
                    actor=actor,
                    metadata=update.metadata,
                    allow_negative=allow_negative,
                    now=now,
                    window=windows[counter.id],
                    idempotency=update.idempotency,
                )
            )
        except CounterError as exc:
            raise type(exc)(f"updates[{index}]: {exc.message}") from exc
    store_reconcile_if_due()
    results: list[UpdateResult | OutOfLimits] = []
    for item, reply in zip(prepared, _run_update_pipeline(prepared), strict=True):
        try:
            results.append(_update_result(item, reply, now))
        except (OutOfLimits, IdempotencyConflict) as exc:
            results.append(exc)
    return results


def counter_reset(
    *,
    counter: CounterConfig,
    subject: str = "",
    value: int | None = None,
    reason: str = "",
    operator: str = "",
    idempotency: Idempotency | None = None,
) -> ResetResult:
    """Set the current period's value (default: the counter's reset value), keeping an audit record.

    The period's unique members stay counted, so a reset never lets a player count twice. A repeat
    with the same ``idempotency`` key answers the first reset and writes no second audit record.
    """
    target = counter_reset_check(counter=counter, subject=subject, value=value)
    now = clock.now()
    window = periods.window_at(counter.period, counter.time_zone, now)
    ms = clock.to_ms(now)
    store_reconcile_if_due()
    args = ["set", target, f"{window.key}|{subject}", "", "", "", 0, ms, ms // 60000]
    args += [int(not counter.is_user_scoped), ""]
    result = _run_update(counter=counter, subject=subject, window=window, args=args, idempotency=idempotency, ms=ms)
    result, now, replayed = _replayed(result, now)
    old = int(result[1])
    if replayed:
        return ResetResult(counter, subject, old, int(result[2]), now, reason, operator, replayed=True)
    # What lastResetTime / last_reset show; a Redis that misses it gets it back on hydration.
    with contextlib.suppress(StoreUnavailable):
        value_key = keyspace.value_key(counter.id, window.key, subject)
        redis_call(lambda r: r.hset(value_key, keyspace.LAST_RESET_FIELD, ms))
    ResetLog.objects.create(
        counter_id=counter.id,
        subject=subject,
        period=window.key,
        kind=ResetLog.Kind.MANUAL,
        operator=operator,
        reason=reason,
        value_before=old,
        value_after=target,
    )
    return ResetResult(counter, subject, old, target, now, reason, operator)


@dataclass(frozen=True, slots=True)
class ResetRequest:
    counter: CounterConfig
    subject: str = ""
    value: int | None = None


@dataclass(frozen=True, slots=True)
class BatchResetOutcome:
    request: ResetRequest
    result: ResetResult | None
    error: CounterError | None


def counters_reset_batch(*, requests: list[ResetRequest], reason: str, operator: str) -> list[BatchResetOutcome]:
    """Reset several counters with one reason. Every request is validated before any is applied.

    Once validated, each reset stands alone: if the store fails midway, the outcome says which
    counters were reset and which were not.
    """
    if not reason.strip():
        raise InvalidParameter("A batch reset needs a reason.")
    seen = set()
    for request in requests:
        identity = (request.counter.id, request.subject)
        if identity in seen:
            raise InvalidParameter(f"Counter {request.counter.name!r} appears twice in the batch.")
        seen.add(identity)
        counter_reset_check(counter=request.counter, subject=request.subject, value=request.value)
    outcomes = []
    for item in requests:
        try:
            result = counter_reset(
                counter=item.counter, subject=item.subject, value=item.value, reason=reason, operator=operator
            )
        except StoreUnavailable:
            outcomes.append(BatchResetOutcome(item, None, ServiceReadOnly()))
        except CounterError as error:
            outcomes.append(BatchResetOutcome(item, None, error))
        else:
            outcomes.append(BatchResetOutcome(item, result, None))
    return outcomes


# --- Redis down: write-through and reconciliation -------------------------------------------------

# Set in a process that saw Redis fail in write-through mode: before it uses Redis again it
# corrects the values written straight to PostgreSQL meanwhile (see store_reconcile).
_reconcile_due = threading.Event()
RECONCILE_BATCH = 500

_MARK_SQL = """
INSERT INTO counters_writtenthroughvalue (counter_id, subject, period, writes) VALUES (%s, %s, %s, 1)
ON CONFLICT (counter_id, subject, period) DO UPDATE SET writes = counters_writtenthroughvalue.writes + 1
"""

_MEMBER_INSERT_SQL = """
INSERT INTO counters_uniquemember (counter_id, period, member) VALUES (%s, %s, %s)
ON CONFLICT DO NOTHING RETURNING id
"""


def _locked_value_row(counter: CounterConfig, subject: str, window: periods.PeriodWindow) -> CounterValue:
    """The PostgreSQL row of a value, created with its opening value if missing, locked FOR UPDATE."""
    rows = CounterValue.objects.select_for_update().filter(counter_id=counter.id, subject=subject, period=window.key)
    row = rows.first()
    if row is None:
        opening = counter_opening_value(counter=counter, subject=subject, period_key=window.key, use_store=False)
        CounterValue.objects.bulk_create(
            [CounterValue(counter_id=counter.id, subject=subject, period=window.key, value=opening, peak=opening)],
            ignore_conflicts=True,
        )
        row = rows.get()
    return row


def _update_write_through(
    *,
    counter: CounterConfig,
    amount: int,
    subject: str,
    member: str,
    window: periods.PeriodWindow,
    now: datetime,
    bounds: tuple[int, int],
    log: str,
) -> UpdateResult:
    """The update of ``counter_update`` done in PostgreSQL, for when Redis is down.

    The value's row is locked for the transaction, so concurrent updates apply one after the
    other: exact, with the same dedup, bounds and threshold rules as the Lua script.
    """
    low, high = bounds
    ms = clock.to_ms(now)
    crossed: list[int] = []
    with transaction.atomic():
        row = _locked_value_row(counter, subject, window)
        old = row.value
        with connection.cursor() as cursor:
            if member:
                cursor.execute(_MEMBER_INSERT_SQL, [counter.id, window.key, member])
                if cursor.fetchone() is None:
                    return _write_through_result(counter, subject, window, old, old, True, (), now)
            new = old + amount
            if amount < 0 and new < low:
                raise OutOfLimits(f"Counter {counter.name!r} is at {old}: going below {low} is not allowed.")
            if amount > 0 and new > high:
                if not counter.saturate or old >= high:
                    raise OutOfLimits(f"Counter {counter.name!r} is at {old}: going above {high} is not allowed.")
                new = high
            CounterValue.objects.filter(pk=row.pk).update(
                value=F("value") + (new - old),
                peak=Greatest(F("peak"), new),
                operations=F("operations") + 1,
                updated_at=now,
            )
            cursor.execute(_MARK_SQL, [counter.id, subject, window.key])
            last = None if counter.is_user_scoped else new
            cursor.execute(_BUCKETS_SQL, [counter.id, [ms // 60000], [1], [new - old], [last], [last]])
            hits = [
                t.id
                for t in counter.thresholds
                if (t.direction == "up" and old < t.value <= new) or (t.direction == "down" and old > t.value >= new)
            ]
            if hits:
                n = len(hits)
                cursor.execute(_EVENTS_SQL, [counter.id, hits, [subject] * n, [window.key] * n, [ms] * n])
                recorded = cursor.fetchall()
                event_ids = [r[0] for r in recorded]
                if event_ids:
                    crossed = [r[1] for r in recorded]
                    transaction.on_commit(lambda: _announce_events(event_ids))
        if log:
            entry = f'{log},"old":{old},"new":{new}}}'.encode()
            _insert_operation_log(counter.id, [entry])
    return _write_through_result(counter, subject, window, old, new, False, tuple(crossed), now)


def _announce_events(event_ids: list[int]) -> None:
    from .signals import threshold_crossed

    threshold_crossed.send(sender=counter_update, event_ids=event_ids)


def _write_through_result(
    counter: CounterConfig,
    subject: str,
    window: periods.PeriodWindow,
    old: int,
    new: int,
    duplicate: bool,
    crossed: tuple[int, ...],
    now: datetime,
) -> UpdateResult:
    from .models import ThresholdEvent

    marks = {}
    if counter.thresholds:
        events = ThresholdEvent.objects.filter(counter_id=counter.id, subject=subject, period=window.key)
        marks = dict(events.values_list("threshold_id", "triggered_at"))
    return UpdateResult(counter, subject, window, old, new, duplicate, crossed, marks, now)


@dataclass(slots=True)
class ReconcileStats:
    corrected: int = 0
    remaining: int = 0


def store_reconcile(*, rounds: int = 20, pause_seconds: float = 0.05) -> ReconcileStats:
    """Make Redis agree with PostgreSQL for every value written through while Redis was down.

    For each marked value, with its PostgreSQL row locked (no flush or write-through can change
    it meanwhile): add the period's members from PostgreSQL to the Redis set (a union: members
    only ever join), then set the Redis value to the PostgreSQL value plus its unflushed delta.
    Idempotent; a value with a flush batch in flight is retried after a pause. The mark is
    dropped only if no write-through came in since it was read.
    """
    stats = ReconcileStats()
    snapshot = config_cache.get()
    marks = list(WrittenThroughValue.objects.order_by("id")[:RECONCILE_BATCH])
    if not marks:
        return stats
    for _ in range(rounds):
        if not marks:
            break
        busy = []
        for mark in marks:
            counter = snapshot.counters_by_id.get(mark.counter_id)
            if counter is None or _reconcile_one(counter, mark):
                WrittenThroughValue.objects.filter(pk=mark.pk, writes=mark.writes).delete()
                stats.corrected += 1
            else:
                busy.append(mark)
        marks = busy
        if marks:
            time.sleep(pause_seconds)
    stats.remaining = WrittenThroughValue.objects.count()
    return stats


def _reconcile_one(counter: CounterConfig, mark: WrittenThroughValue) -> bool:
    if counter.unique_members:
        window = periods.PeriodWindow(mark.period, None, None)
        _members_to_store(counter, window)
    with transaction.atomic():
        row = (
            CounterValue.objects.select_for_update()
            .filter(counter_id=counter.id, subject=mark.subject, period=mark.period)
            .values_list("value", flat=True)
            .first()
        )
        if row is None:
            return True
        keys = [
            keyspace.value_key(counter.id, mark.period, mark.subject),
            keyspace.pending_key(counter.id),
            keyspace.batches_key(counter.id),
        ]
        field = keyspace.pending_delta_field(mark.period, mark.subject)
        return bool(redis_call(lambda r: scripts.reconcile(keys=keys, args=[row, field], client=r)))


def store_reconcile_if_due() -> None:
    """In a process that saw Redis fail in write-through mode: reconcile before using Redis again."""
    if _reconcile_due.is_set() and store_reconcile().remaining == 0:
        _reconcile_due.clear()


# --- write-behind flush -------------------------------------------------------------------------


@dataclass(slots=True)
class FlushStats:
    locked_out: bool = False
    batches: int = 0
    skipped: int = 0
    values: int = 0
    members: int = 0
    operations: int = 0
    dropped: int = 0


def _crash_point(name: str) -> None:
    """Fault injection for the crash tests: die here, as a kill -9 would, when asked to."""
    if os.environ.get("COUNTER_TEST_CRASH_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _new_batch_id() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


_VALUES_UPSERT = """
INSERT INTO counters_countervalue (counter_id, subject, period, value, peak, operations, updated_at)
SELECT %s, x.s, x.p, x.d, x.pk, x.o, to_timestamp(x.t / 1000.0)
FROM {source} AS x(s, p, d, pk, o, t)
ON CONFLICT (counter_id, subject, period) DO UPDATE SET
    value = counters_countervalue.value + EXCLUDED.value,
    peak = GREATEST(counters_countervalue.peak, EXCLUDED.peak),
    operations = counters_countervalue.operations + EXCLUDED.operations,
    updated_at = GREATEST(counters_countervalue.updated_at, EXCLUDED.updated_at)
"""
_VALUES_SQL = _VALUES_UPSERT.format(
    source="unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])"
)

_MEMBERS_INSERT = """
INSERT INTO counters_uniquemember (counter_id, period, member)
SELECT %s, x.p, x.m FROM {source} AS x(p, m)
ON CONFLICT DO NOTHING
"""
_MEMBERS_SQL = _MEMBERS_INSERT.format(source="unnest(%s::text[], %s::text[])")

# Large batches go through COPY into session-local tables instead of array parameters: quoting
# every array element costs the client more than PostgreSQL's whole upsert (bench/flush_bench.py).
# Below this many rows the three extra round trips cost more than they save.
COPY_MIN_ROWS = 1000
_COPY_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS counters_flush_values
    (s text, p text, d bigint, pk bigint, o bigint, t bigint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS counters_flush_members (p text, m text) ON COMMIT DELETE ROWS;
TRUNCATE counters_flush_values, counters_flush_members
"""
_VALUES_FROM_COPY_SQL = _VALUES_UPSERT.format(source="counters_flush_values")
_MEMBERS_FROM_COPY_SQL = _MEMBERS_INSERT.format(source="counters_flush_members")

_BUCKETS_SQL = """
INSERT INTO counters_statbucket (counter_id, minute, operations, delta, last_value, max_value)
SELECT %s, to_timestamp(x.m * 60), x.o, x.d, x.v, x.mx
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) AS x(m, o, d, v, mx)
ON CONFLICT (counter_id, minute) DO UPDATE SET
    operations = counters_statbucket.operations + EXCLUDED.operations,
    delta = counters_statbucket.delta + EXCLUDED.delta,
    last_value = COALESCE(EXCLUDED.last_value, counters_statbucket.last_value),
    max_value = GREATEST(counters_statbucket.max_value, EXCLUDED.max_value)
"""

_EVENTS_SQL = """
INSERT INTO counters_thresholdevent (threshold_id, counter_id, subject, period, triggered_at)
SELECT x.t, %s, x.s, x.p, to_timestamp(x.ms / 1000.0)
FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::bigint[]) AS x(t, s, p, ms)
JOIN counters_threshold th ON th.id = x.t
-- Once per period (unless re-arming) and the cooldown are also kept here: a Redis that lost its
-- marks (wiped, restored) cannot record a repeat, and writes through PostgreSQL follow the rules.
WHERE (th.rearm OR NOT EXISTS (
    SELECT 1 FROM counters_thresholdevent e WHERE e.threshold_id = x.t AND e.subject = x.s AND e.period = x.p
))
AND (th.cooldown_seconds = 0 OR NOT EXISTS (
    SELECT 1 FROM counters_thresholdevent e WHERE e.threshold_id = x.t AND e.subject = x.s
    AND e.triggered_at > to_timestamp(x.ms / 1000.0) - th.cooldown_seconds * interval '1 second'
))
ON CONFLICT DO NOTHING
RETURNING id, threshold_id
"""


@dataclass(slots=True)
class _Batch:
    values: dict[tuple[str, str], list[int]]
    members: list[tuple[str, str]]
    buckets: dict[int, list]
    events: list[tuple[int, str, str, int]]
    log: list[bytes]


def _parse_batch(fields: dict[bytes, bytes], log: list[bytes]) -> _Batch:
    values: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    buckets: dict[int, list] = defaultdict(lambda: [0, 0, None, None])
    members: list[tuple[str, str]] = []
    events: list[tuple[int, str, str, int]] = []
    slots = {"d": 0, "o": 1, "p": 2, "t": 3}
    bucket_slots = {"bo": 0, "bd": 1, "bv": 2, "bm": 3}
    for raw_field, raw_value in fields.items():
        kind, _, rest = raw_field.decode().partition("|")
        slot = slots.get(kind)
        if slot is not None:
            period, _, subject = rest.partition("|")
            values[(period, subject)][slot] = int(raw_value)
        elif kind in bucket_slots:
            buckets[int(rest)][bucket_slots[kind]] = int(raw_value)
        elif kind == "u":
            period, _subject, member = rest.split("|", 2)
            members.append((period, member))
        elif kind == "e":
            period, subject, threshold_id, _fired_ms = rest.split("|", 3)
            events.append((int(threshold_id), subject, period, int(raw_value)))
    return _Batch(values, members, buckets, events, log)


def _apply_batch(counter_id: int, batch_id: str, batch: _Batch, stats: FlushStats) -> list[int]:
    """Apply one batch in one transaction; returns the new threshold event ids (empty if skipped)."""
    event_ids: list[int] = []
    with transaction.atomic():
        _, created = FlushedBatch.objects.get_or_create(id=batch_id, defaults={"counter_id": counter_id})
        if not created:
            stats.skipped += 1
            return event_ids
        with connection.cursor() as cursor:
            if len(batch.values) + len(batch.members) >= COPY_MIN_ROWS:
                _copy_values_and_members(cursor, counter_id, batch)
            else:
                _insert_values_and_members(cursor, counter_id, batch)
            if batch.buckets:
                minutes = sorted(batch.buckets)
                cols = list(zip(*(batch.buckets[m] for m in minutes), strict=True))
                cursor.execute(_BUCKETS_SQL, [counter_id, minutes, *map(list, cols)])
            if batch.events:
                cursor.execute(_EVENTS_SQL, [counter_id, *map(list, zip(*batch.events, strict=True))])
                event_ids = [row[0] for row in cursor.fetchall()]
        if batch.log:
            _insert_operation_log(counter_id, batch.log)
        _crash_point("before_commit")
    stats.batches += 1
    stats.values += len(batch.values)
    stats.members += len(batch.members)
    stats.operations += sum(v[1] for v in batch.values.values())
    return event_ids


def _insert_values_and_members(cursor, counter_id: int, batch: _Batch) -> None:
    if batch.values:
        keys = list(batch.values)
        rows = [batch.values[k] for k in keys]
        columns = [[k[1] for k in keys], [k[0] for k in keys], *([r[i] for r in rows] for i in (0, 2, 1, 3))]
        cursor.execute(_VALUES_SQL, [counter_id, *columns])
    if batch.members:
        cursor.execute(_MEMBERS_SQL, [counter_id, [m[0] for m in batch.members], [m[1] for m in batch.members]])


def _copy_values_and_members(cursor, counter_id: int, batch: _Batch) -> None:
    # Emptied first, not only at commit: inside an outer transaction (tests) batches share them.
    cursor.execute(_COPY_TABLES)
    with cursor.cursor.copy("COPY counters_flush_values FROM STDIN") as copy:
        for (period, subject), (delta, operations, peak, updated) in batch.values.items():
            copy.write_row((subject, period, delta, peak, operations, updated))
    with cursor.cursor.copy("COPY counters_flush_members FROM STDIN") as copy:
        for row in batch.members:
            copy.write_row(row)
    if batch.values:
        cursor.execute(_VALUES_FROM_COPY_SQL, [counter_id])
    if batch.members:
        cursor.execute(_MEMBERS_FROM_COPY_SQL, [counter_id])


def _insert_operation_log(counter_id: int, lines: list[bytes]) -> None:
    from .models import OperationLog

    entries = []
    for line in lines:
        item = orjson.loads(line)
        entries.append(
            OperationLog(
                counter_id=counter_id,
                subject=item["subject"],
                period=item["period"],
                actor=item["actor"],
                user_id=item["user_id"],
                old_value=item["old"],
                new_value=item["new"],
                metadata=item["metadata"],
                created_at=clock.from_ms(item["ts"]),
            )
        )
    OperationLog.objects.bulk_create(entries, batch_size=2000)


def counter_store_forget(*, counter_id: int) -> None:
    """Queue a deleted counter's Redis keys for ``deleted_counters_purge``."""
    # Redis down: the keys stay behind (unused, as the counter is gone), like after a failed purge.
    with contextlib.suppress(StoreUnavailable):
        redis_call(lambda r: r.zadd(keyspace.DELETED_COUNTERS_KEY, {str(counter_id): clock.to_ms(clock.now())}))


def deleted_counters_purge() -> int:
    """Drop every Redis key of the counters deleted at least the grace period ago; returns how many.

    Without this each deleted counter (a rotated temporary event, say) would leave its value
    hashes, member sets and last pending deltas in Redis for good. One SCAN pass serves every
    counter that is due.
    """
    due_ms = clock.to_ms(clock.now()) - int(settings.COUNTER_DELETED_KEYS_GRACE_SECONDS * 1000)
    queued = redis_call(lambda r: r.zrangebyscore(keyspace.DELETED_COUNTERS_KEY, "-inf", due_ms))
    if not queued:
        return 0
    queued_ids = {int(raw) for raw in queued}
    due = queued_ids - set(Counter.objects.filter(id__in=queued_ids).values_list("id", flat=True))

    def sweep(r) -> int:
        dropped, doomed = 0, []
        for key in r.scan_iter(match=keyspace.ALL_COUNTER_KEYS_PATTERN, count=1000):
            if keyspace.counter_id_of_key(key) in due:
                doomed.append(key)
            if len(doomed) >= 500:
                dropped += r.unlink(*doomed)
                doomed = []
        if doomed:
            dropped += r.unlink(*doomed)
        return dropped

    dropped = redis_call(sweep) if due else 0
    redis_call(lambda r: r.zrem(keyspace.DELETED_COUNTERS_KEY, *queued))
    return dropped


def counters_flush(*, counter_ids: list[int] | None = None) -> FlushStats:
    """Move every counter's pending deltas to PostgreSQL, each exactly once.

    Pending data is first renamed into a batch with an id (atomically, in Redis); the batch is
    applied in one transaction that also records its id; only then is it deleted. A batch left
    behind by a crash is picked up on the next run and applied only if its id is not recorded.
    """
    stats = FlushStats()
    token = uuid.uuid4().hex
    # The lock only saves duplicate work: exactly-once comes from the batch ids. A short TTL lets
    # a restarted flusher take over soon after one that was killed while holding it.
    if not acquire_lock("flush", ttl_seconds=settings.COUNTER_FLUSH_LOCK_SECONDS, token=token):
        stats.locked_out = True
        return stats
    try:
        ids = counter_ids if counter_ids is not None else sorted(config_cache.get().counters_by_id)

        def move_and_list(r):
            pipe = r.pipeline(transaction=False)
            for cid in ids:
                batch_id = _new_batch_id()
                keys = [
                    keyspace.pending_key(cid),
                    keyspace.oplog_key(cid),
                    keyspace.batches_key(cid),
                    keyspace.batch_key(cid, batch_id),
                    keyspace.batch_log_key(cid, batch_id),
                ]
                scripts.move_pending(keys=keys, args=[batch_id], client=pipe)
            for cid in ids:
                pipe.smembers(keyspace.batches_key(cid))
            return pipe.execute()[len(ids) :]

        outstanding = [
            (cid, _decode(b)) for cid, members in zip(ids, redis_call(move_and_list), strict=True) for b in members
        ]
        outstanding.sort(key=lambda item: item[1])
        for cid, batch_id in outstanding:
            fields, log = redis_call(
                lambda r, c=cid, b=batch_id: (
                    r.pipeline(transaction=False)
                    .hgetall(keyspace.batch_key(c, b))
                    .lrange(keyspace.batch_log_key(c, b), 0, -1)
                    .execute()
                )
            )
            try:
                event_ids = _apply_batch(cid, batch_id, _parse_batch(fields, log), stats)
            except IntegrityError:
                if Counter.objects.filter(id=cid).exists():
                    raise
                # The counter was deleted (with its rows) after these deltas were written: they
                # belong nowhere, and keeping the batch would fail every flush after this one.
                stats.dropped += 1
                event_ids = []
            _crash_point("after_commit")
            redis_call(
                lambda r, c=cid, b=batch_id: scripts.drop_batch(
                    keys=[keyspace.batches_key(c), keyspace.batch_key(c, b), keyspace.batch_log_key(c, b)],
                    args=[b],
                    client=r,
                )
            )
            if event_ids:
                from .signals import threshold_crossed

                threshold_crossed.send(sender=counters_flush, event_ids=event_ids)
    finally:
        with contextlib.suppress(StoreUnavailable):
            release_lock("flush", token=token)
    return stats


def operation_log_trim(*, batch_size: int = 10_000) -> int:
    """Delete operation-log entries older than COUNTER_OPERATION_LOG_RETENTION_DAYS, in bounded batches."""
    from .models import OperationLog

    cutoff = clock.now() - timedelta(days=settings.COUNTER_OPERATION_LOG_RETENTION_DAYS)
    deleted = 0
    while True:
        ids = list(OperationLog.objects.filter(created_at__lt=cutoff).values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        deleted += OperationLog.objects.filter(id__in=ids).delete()[0]
        logger.info("operation log: %d entries older than %s deleted so far", deleted, cutoff.isoformat())
    return deleted
