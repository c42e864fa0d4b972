"""Redis down: updates written straight to PostgreSQL, and the reconciliation of Redis afterwards."""

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Greatest

from . import clock, periods, split
from .config import CounterConfig
from .config import cache as config_cache
from .flush import BUCKETS_UPSERT_SQL, EVENTS_INSERT_SQL, operation_log_insert
from .models import CounterValue, ThresholdEvent, WrittenThroughValue
from .signals import threshold_crossed
from .values import UpdateResult, counter_opening_value, counter_out_of_limits, members_to_store, value_rebase

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


def counter_update_write_through(
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
                raise counter_out_of_limits(counter=counter, old=old, bound=low, below=True)
            if amount > 0 and new > high:
                if not counter.saturate or old >= high:
                    raise counter_out_of_limits(counter=counter, old=old, bound=high, below=False)
                new = high
            CounterValue.objects.filter(pk=row.pk).update(
                value=F("value") + (new - old),
                peak=Greatest(F("peak"), new),
                operations=F("operations") + 1,
                updated_at=now,
            )
            cursor.execute(_MARK_SQL, [counter.id, subject, window.key])
            last = None if counter.is_user_scoped else new
            cursor.execute(BUCKETS_UPSERT_SQL, [counter.id, [ms // 60000], [1], [new - old], [last], [last]])
            hits = [
                t.id
                for t in counter.thresholds
                if (t.direction == "up" and old < t.value <= new) or (t.direction == "down" and old > t.value >= new)
            ]
            if hits:
                n = len(hits)
                cursor.execute(EVENTS_INSERT_SQL, [counter.id, hits, [subject] * n, [window.key] * n, [ms] * n])
                recorded = cursor.fetchall()
                event_ids = [r[0] for r in recorded]
                if event_ids:
                    crossed = [r[1] for r in recorded]
                    transaction.on_commit(lambda: _announce_events(event_ids))
        if log:
            entry = f'{log},"old":{old},"new":{new}}}'.encode()
            operation_log_insert(counter_id=counter.id, lines=[entry])
    return _write_through_result(counter, subject, window, old, new, False, tuple(crossed), now)


def _announce_events(event_ids: list[int]) -> None:
    threshold_crossed.send(sender=counter_update_write_through, event_ids=event_ids)


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
        for shard in range(counter.shards):
            members_to_store(counter, window, shard)
    with transaction.atomic():
        row = (
            CounterValue.objects.select_for_update()
            .filter(counter_id=counter.id, subject=mark.subject, period=mark.period)
            .values_list("value", "operations", "version")
            .first()
        )
        if row is None:
            return True
        value, _, version = row
        if counter.shards > 1:
            # Written through onto the total: shard 0 takes it (split.shard_base).
            value, _, version = split.shard_base(
                counter_id=counter.id, subject=mark.subject, period=mark.period, shard=0, row=row
            )
        return value_rebase(
            counter_id=counter.id, period=mark.period, subject=mark.subject, value=value, version=version
        )


def store_reconcile_mark_due() -> None:
    """Remember that this process wrote through: reconcile before it next uses Redis."""
    _reconcile_due.set()


def store_reconcile_if_due() -> None:
    """In a process that saw Redis fail in write-through mode: reconcile before using Redis again."""
    if _reconcile_due.is_set() and store_reconcile().remaining == 0:
        _reconcile_due.clear()


# --- write-behind flush -------------------------------------------------------------------------
