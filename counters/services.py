"""Updates and resets of counter values: one Redis round trip each, PostgreSQL through the flusher."""

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter

import redis
from django.conf import settings
from django.utils.translation import gettext

from archive.models import ResetLog
from metrics.recorders import redis_batch_record

from . import clock, keyspace, periods, split
from .config import CounterConfig
from .errors import (
    CounterError,
    CounterNotFound,
    IdempotencyConflict,
    InvalidParameter,
    OutOfLimits,
    RuleViolation,
    ServiceReadOnly,
)
from .idempotency import REPLAYED_HEADERS, Idempotency
from .presence import Lease, presence_login_op, presence_update
from .redis_store import StoreUnavailable, redis_call, scripts
from .values import (
    ResetResult,
    UpdateResult,
    counter_check_subject,
    counter_out_of_limits,
    counter_value_bounds,
    operation_log_prefix,
    shard_values_read,
    value_hydrate,
)
from .write_through import counter_update_write_through, store_reconcile_if_due, store_reconcile_mark_due


def _check_live(counter: CounterConfig, now: datetime) -> None:
    if not counter.is_live(now):
        raise CounterNotFound(
            gettext("Counter '%(name)s' expired at %(time)s.")
            % {"name": counter.name, "time": counter.expires_at.isoformat()}
        )


def _keyed_call(
    unit: keyspace.Unit, keys: list[str], args: list, idempotency: Idempotency | None, ms: int
) -> tuple[list[str], list]:
    """The update script's keys and arguments with the record of an Idempotency-Key appended (in
    the slot of ``unit``, the keys' counter or shard)."""
    if idempotency is None:
        return keys, args
    record = keyspace.idempotency_key(unit, idempotency.app_id, idempotency.key)
    return [*keys, record], [*args, idempotency.fingerprint, idempotency.ttl_ms, ms]


def _run_update(
    *,
    counter: CounterConfig,
    subject: str,
    window: periods.PeriodWindow,
    args: list,
    idempotency: Idempotency | None = None,
    ms: int = 0,
    shard: int = 0,
) -> list:
    unit = keyspace.unit(counter.id, shard)
    keys, args = _keyed_call(unit, keyspace.update_keys(unit, window.key, subject), args, idempotency, ms)
    for _ in range(3):
        result = redis_call(lambda r: scripts.update(keys=keys, args=args, client=r), key=keys[0])
        if result[0] != b"HYDRATE":
            return result
        value_hydrate(counter=counter, subject=subject, window=window, shard=shard)
    raise StoreUnavailable("value could not be hydrated")


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    """One update of a batch: ``amount`` is negative for a decrement."""

    counter: CounterConfig
    amount: int
    subject: str = ""
    user_id: str = ""
    metadata: dict | None = None
    idempotency: Idempotency | None = None


# Not frozen: one is made per update (see values.UpdateResult).
@dataclass(slots=True)
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
    # a split counter's shard this update goes to (split.shard_of); its keys are that shard's
    shard: int = 0

    @property
    def unit(self) -> keyspace.Unit:
        return keyspace.unit(self.counter.id, self.shard)


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
    shards: dict[int, int] | None = None,
) -> _PreparedUpdate:
    """Check an update and build the update script's keys and arguments (no I/O). ``shards``: a
    batch's choice of shard per split counter, filled in here (``split.shard_of``)."""
    if amount == 0 or abs(amount) > keyspace.MAX_SAFE_VALUE:
        raise InvalidParameter(
            gettext("The amount must be a non-zero integer of at most %(max)d.") % {"max": keyspace.MAX_SAFE_VALUE}
        )
    counter_check_subject(counter=counter, subject=subject)
    _check_live(counter, now)
    if counter.is_presence:
        raise RuleViolation(
            gettext("Counter '%(name)s' counts live leases: log players in and out one at a time.")
            % {"name": counter.name}
        )
    member = user_id if counter.unique_members else ""
    if counter.unique_members and not member:
        raise RuleViolation(
            gettext("Counter '%(name)s' counts each user once per period: a user_id is required.")
            % {"name": counter.name}
        )
    if member and amount < 0:
        raise RuleViolation(
            gettext("Counter '%(name)s' counts unique users: it cannot be decremented per user.")
            % {"name": counter.name}
        )
    window = window or periods.window_at(counter.period, counter.time_zone, now)
    low, high = counter_value_bounds(counter=counter, allow_negative=allow_negative)
    split.check_update(counter, amount=amount, low=low)
    chosen = None
    if shards is not None and counter.shards > 1:
        chosen = shards.get(counter.id)
        if chosen is None:
            chosen = shards[counter.id] = split.shard_of(counter)
    shard = split.shard_of(counter, member=member, idempotency=idempotency, chosen=chosen)
    keys = keyspace.update_keys(keyspace.unit(counter.id, shard), window.key, subject)
    return _update_at(
        counter=counter,
        amount=amount,
        subject=subject,
        user_id=user_id,
        actor=actor,
        metadata=metadata,
        window=window,
        keys=keys,
        bounds=(low, high),
        member=member,
        now=now,
        idempotency=idempotency,
        shard=shard,
    )


# Where the update script's arguments hold the moment of the update: ARGV[8] its time (ms) and
# ARGV[9] its minute; the rest depends on the update and its window only (and on the moment only
# through the log entry of a counter that logs its operations).
UPDATE_MOMENT_ARG = 7


def _update_at(
    *,
    counter: CounterConfig,
    amount: int,
    subject: str,
    user_id: str,
    actor: str,
    metadata: dict | None,
    window: periods.PeriodWindow,
    keys: list[str],
    bounds: tuple[int, int],
    member: str,
    now: datetime,
    idempotency: Idempotency | None = None,
    shard: int = 0,
) -> _PreparedUpdate:
    """The update script's arguments of an update checked by ``_prepare_update``, at ``now`` (also
    the fast lane's for an update it checked before: ``fastlane.plans.UpdatePlan``)."""
    ms = clock.to_ms(now)
    log = (
        operation_log_prefix(actor=actor, user_id=user_id, subject=subject, period=window.key, ms=ms, metadata=metadata)
        if counter.log_operations
        else ""
    )
    low, high = bounds
    args = ["add", amount, f"{window.key}|{subject}", member, low, high, int(counter.saturate), ms, ms // 60000]
    if counter.shards > 1:
        # A shard's buckets keep operations and deltas only (its own last value is no total), and
        # the flusher detects a split counter's thresholds from the totals (docs/splitting.md).
        args += [0, log]
    else:
        args += [int(not counter.is_user_scoped), log]
        for t in counter.thresholds:
            args += [t.id, t.value, t.direction, t.cooldown_seconds * 1000, int(t.rearm)]
    return _PreparedUpdate(counter, subject, window, keys, args, low, high, member, log, idempotency, shard)


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


def _update_result(prepared: _PreparedUpdate, result: list, now: datetime, others: int = 0) -> UpdateResult:
    """Read the update script's reply; a bounds refusal raises ``OutOfLimits``. ``others``: what a
    split counter's other shards hold (``split_others``): the script answered its shard's share."""
    counter = prepared.counter
    result, now, replayed = _replayed(result, now)
    status = result[0]
    old, new = int(result[1]) + others, int(result[2]) + others
    if status in (b"MIN", b"MAX"):
        below = status == b"MIN"
        refusal = counter_out_of_limits(
            counter=counter, old=old, bound=prepared.low if below else prepared.high, below=below
        )
        if replayed:
            refusal.headers = REPLAYED_HEADERS
        raise refusal
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
    if counter.is_presence:
        raise RuleViolation(
            gettext("Counter '%(name)s' counts live leases: it cannot be reset, players log out or lapse.")
            % {"name": counter.name}
        )
    split.check_reset(counter)
    target = counter.reset_value if value is None else value
    low, high = counter_value_bounds(counter=counter)
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

    On a presence counter an increment logs ``user_id`` in and a decrement logs them out
    (``counters.presence``); the amount must be 1 (an Idempotency-Key changes nothing there: a
    repeated login or logout has the same effect).
    """
    if counter.is_presence:
        return _presence_update(counter=counter, amount=amount, user_id=user_id, actor=actor, metadata=metadata)
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
            shard=prepared.shard,
        )
        others = split_others(prepared)
    except StoreUnavailable as exc:
        # A key is recorded in Redis only: without it a keyed write could apply twice, so it is
        # refused (503, not applied) rather than written through.
        if settings.COUNTER_REDIS_DOWN_WRITES != "write_through" or exc.maybe_applied or idempotency:
            raise
        store_reconcile_mark_due()
        return counter_update_write_through(
            counter=counter,
            amount=amount,
            subject=subject,
            member=prepared.member,
            window=prepared.window,
            now=now,
            bounds=(prepared.low, prepared.high),
            log=prepared.log,
        )
    return _update_result(prepared, result, now, others)


def split_others(prepared: _PreparedUpdate) -> int:
    """What the other shards of a split counter's value hold, read just after the update (0 for
    a counter that is not split): its shard's share plus this is the value the update left."""
    if prepared.counter.shards <= 1:
        return 0
    try:
        raws = shard_values_read(counter=prepared.counter, subject=prepared.subject, window=prepared.window)
    except StoreUnavailable as exc:
        raise split_read_failed(exc) from exc
    return split_others_of(prepared, raws)


def split_read_failed(exc: Exception) -> StoreUnavailable:
    """The updates ran, the read of their split counters' other shards failed: the outcome the
    caller sees is unknown (never written through a second time)."""
    return StoreUnavailable(f"applied, but the other shards could not be read: {exc}", maybe_applied=True)


def split_others_of(prepared: _PreparedUpdate, raws: list) -> int:
    """``split_others`` from the shards' ``VALUE_FIELDS`` as read."""
    return sum(int(raw[0]) for shard, raw in enumerate(raws) if shard != prepared.shard)


_OWN_KEYS, _OWN_ARGS = itemgetter(*keyspace.UPDATE_OWN_KEYS), itemgetter(*keyspace.UPDATE_OWN_ARGS)


def update_call(prepared: _PreparedUpdate) -> tuple[list[str], list]:
    """KEYS and ARGV of the ``UPDATE_SCRIPT`` call of one prepared update (with its Idempotency-Key)."""
    ms = prepared.args[UPDATE_MOMENT_ARG]
    return _keyed_call(prepared.unit, prepared.keys, prepared.args, prepared.idempotency, ms)


def update_many_call(group: list[_PreparedUpdate]) -> tuple[list[str], list]:
    """KEYS and ARGV of one ``UPDATE_MANY_SCRIPT`` call: updates of one counter and period, in order.

    With Idempotency-Keys each item's own keys and arguments end with its record and fingerprint
    (a placeholder key in the slot and '' for an item without a key).
    """
    first = group[0]
    keyed = any(item.idempotency for item in group)
    header = [len(first.keys), len(first.args), int(keyed), settings.COUNTER_IDEMPOTENCY_KEY_SECONDS * 1000]
    keys, args = list(first.keys), [*header, first.args[UPDATE_MOMENT_ARG], *first.args]
    for item in group:
        keys += _OWN_KEYS(item.keys)
        args += _OWN_ARGS(item.args)
        if keyed:
            idem = item.idempotency
            keys.append(keyspace.idempotency_key(item.unit, idem.app_id, idem.key) if idem else item.keys[0])
            args.append(idem.fingerprint if idem else "")
    return keys, args


def _presence_update(*, counter: CounterConfig, amount: int, user_id: str, actor: str, metadata: dict | None):
    op = presence_login_op(counter=counter, amount=amount)
    return presence_update(counter=counter, op=op, leases=[Lease(user_id)], actor=actor, metadata=metadata).update


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
        by_counter: dict[tuple[keyspace.Unit, str], list[int]] = defaultdict(list)
        for i in todo:
            by_counter[(prepared[i].unit, prepared[i].window.key)].append(i)
        groups = list(by_counter.values())
        retry, cold, noscript = [], {}, False
        firsts = [prepared[g[0]].keys[0] for g in groups]
        for group, reply in zip(groups, redis_call(lambda r, g=groups: run(r, g), keys=firsts), strict=True):
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
            value_hydrate(counter=item.counter, subject=item.subject, window=item.window, shard=item.shard)
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
    shards: dict[int, int] = {}
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
                    shards=shards,
                )
            )
        except CounterError as exc:
            raise type(exc)(f"updates[{index}]: {exc.message}") from exc
    store_reconcile_if_due()
    redis_batch_record(size=len(prepared))
    results: list[UpdateResult | OutOfLimits] = []
    replies = _run_update_pipeline(prepared)
    split_values = {(item.counter.id, item.subject): item for item in prepared if item.counter.shards > 1}
    try:
        shares = {
            value: shard_values_read(counter=item.counter, subject=item.subject, window=item.window)
            for value, item in split_values.items()
        }
    except StoreUnavailable as exc:
        raise split_read_failed(exc) from exc
    for item, reply in zip(prepared, replies, strict=True):
        raws = shares.get((item.counter.id, item.subject))
        others = split_others_of(item, raws) if raws else 0
        try:
            results.append(_update_result(item, reply, now, others))
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
        redis_call(lambda r: r.hset(value_key, keyspace.LAST_RESET_FIELD, ms), key=value_key)
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
            raise RuleViolation(f"Counter {request.counter.name!r} appears twice in the batch.")
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
