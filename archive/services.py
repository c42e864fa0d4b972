"""Closing periods: archive them, log their automatic resets, trim Redis, enforce retention.

Periods roll over by themselves (the period is computed from the request time); this module
only records what closed. Every function is safe to run twice or concurrently: a Redis lock
avoids duplicate work, and unique constraints with upserts make a re-run overwrite, never double.
"""

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max, QuerySet

from counters import clock, keyspace, periods
from counters.config import CounterConfig
from counters.config import cache as config_cache
from counters.flush import counters_flush
from counters.models import CounterValue, FlushedBatch, StatBucket, UniqueMember
from counters.redis_store import (
    StoreUnavailable,
    acquire_lock,
    node_call,
    redis_call,
    release_lock,
    scripts,
    store_nodes,
)
from counters.values import counter_value_bounds

from .models import PeriodArchive, ResetLog
from .retention import retention_days_checked

logger = logging.getLogger(__name__)

ROW_CHUNK = 5000
TRIM_KEYS_PER_CALL = 500
SCAN_COUNT = 1000
# The flusher may be mid-run when the archive starts; wait this long for it at most.
FLUSH_ATTEMPTS = 100
FLUSH_RETRY_SECONDS = 0.05
# A recorded batch id only matters while its batch could still be in Redis (seconds, after a crash).
FLUSHED_BATCH_KEEP = timedelta(days=2)
AUTOMATIC_OPERATOR = "system:period-rollover"


@dataclass(slots=True)
class ArchiveStats:
    locked_out: bool = False
    flushed: bool = False
    periods: int = 0
    rows: int = 0
    resets_logged: int = 0
    keys_trimmed: int = 0
    trims_deferred: int = 0


@dataclass(slots=True)
class RetentionStats:
    retention_days: int = 0
    archives: int = 0
    values: int = 0
    members: int = 0
    buckets: int = 0
    batches: int = 0


def _retention_days() -> int:
    # Checked again here: settings can change after start-up (override_settings, a shell).
    return retention_days_checked(settings.COUNTER_ARCHIVE_RETENTION_DAYS, settings.COUNTER_ARCHIVE_MIN_RETENTION_DAYS)


def _periodic(counters: dict[int, CounterConfig]) -> list[CounterConfig]:
    return [c for _, c in sorted(counters.items()) if c.period != periods.NONE]


def _flush_all() -> bool:
    """Flush every pending delta; False if the flusher stayed busy (the next run catches up)."""
    for _ in range(FLUSH_ATTEMPTS):
        if not counters_flush().locked_out:
            return True
        time.sleep(FLUSH_RETRY_SECONDS)
    return False


_ARCHIVE_SQL = """
INSERT INTO archive_periodarchive
    (counter_id, subject, period, period_start, period_end, time_zone, final_value, peak, operations, archived_at)
SELECT cv.counter_id, cv.subject, cv.period, %(start)s, %(end)s, %(time_zone)s,
       cv.value, GREATEST(cv.peak, cv.value), cv.operations, %(now)s
FROM counters_countervalue cv WHERE cv.counter_id = %(counter)s AND cv.period = %(period)s
ON CONFLICT (counter_id, subject, period) DO UPDATE SET
    period_start = EXCLUDED.period_start, period_end = EXCLUDED.period_end, time_zone = EXCLUDED.time_zone,
    final_value = EXCLUDED.final_value, peak = EXCLUDED.peak, operations = EXCLUDED.operations
"""

# The partial unique constraint on automatic resets makes this insert-once.
_RESET_LOG_SQL = """
INSERT INTO archive_resetlog
    (counter_id, subject, period, kind, operator, reason, value_before, value_after, created_at)
SELECT cv.counter_id, cv.subject, cv.period, %(kind)s, %(operator)s, %(reason)s,
       cv.value, GREATEST(%(low)s, LEAST(%(high)s, {opening})), %(now)s
FROM counters_countervalue cv WHERE cv.counter_id = %(counter)s AND cv.period = %(period)s
ON CONFLICT DO NOTHING
"""

# The reset strategies of ``counters.values.counter_opening_value``, applied in SQL to every
# subject at once (float8 multiplies exactly as Python's float does; the strategy tests compare).
_OPENING_SQL = {
    "value": "%(reset_value)s::bigint",
    "keep": "cv.value",
    "ratio": "floor(cv.value::float8 * %(ratio)s::float8)::bigint",
    "difference": "cv.value - %(difference)s::bigint",
}


def _archive_period(counter: CounterConfig, key: str, stats: ArchiveStats) -> None:
    """Archive one closed period of a counter (every subject) and log its automatic resets."""
    window = periods.window_of_key(counter.period, counter.time_zone, key)
    low, high = counter_value_bounds(counter=counter)
    params = {
        "counter": counter.id,
        "period": key,
        "start": window.start,
        "end": window.end,
        "time_zone": counter.time_zone,
        "now": clock.now(),
        "kind": ResetLog.Kind.AUTOMATIC.value,
        "operator": AUTOMATIC_OPERATOR,
        "reason": f"{counter.period} period {key} closed at {window.end.isoformat()}",
        "low": low,
        "high": high,
        "reset_value": counter.reset_value,
        "ratio": counter.reset_ratio,
        "difference": counter.reset_difference,
    }
    opening = _OPENING_SQL.get(counter.reset_strategy, _OPENING_SQL["value"])
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_ARCHIVE_SQL, params)
        stats.rows += cursor.rowcount
        cursor.execute(_RESET_LOG_SQL.format(opening=opening), params)
        stats.resets_logged += cursor.rowcount
    stats.periods += 1


def _archive_counter(counter: CounterConfig, now: datetime, stats: ArchiveStats) -> None:
    current = periods.window_at(counter.period, counter.time_zone, now).key
    oldest_kept = periods.window_at(counter.period, counter.time_zone, now - timedelta(days=_retention_days())).key
    archived = PeriodArchive.objects.filter(counter_id=counter.id).aggregate(last=Max("period"))["last"]
    closed = CounterValue.objects.filter(counter_id=counter.id, period__lt=current, period__gte=oldest_kept)
    if archived:
        closed = closed.filter(period__gt=archived)
    # Oldest first: a run cut short leaves a watermark from which the next run continues.
    for key in sorted(set(closed.exclude(period="").values_list("period", flat=True).distinct())):
        _archive_period(counter, key, stats)


def _closed_key_groups(counters: dict[int, CounterConfig], now: datetime, cursor: int, node: str) -> tuple[int, dict]:
    """One SCAN page of one node's period-scoped keys, grouped by (unit, closed period) (``keyspace.unit``)."""
    next_cursor, raw_keys = node_call(
        lambda r: r.scan(cursor, match=keyspace.PERIOD_SCOPED_KEYS_PATTERN, count=SCAN_COUNT), node=node or None
    )
    current: dict[int, str] = {}
    groups: dict[tuple[int, str], list[str]] = {}
    for raw in raw_keys:
        key = raw.decode() if isinstance(raw, bytes) else raw
        parts = keyspace.period_scoped_key_parts(key)
        if parts is None:
            continue
        # A split counter's shard (docs/splitting.md) is trimmed like a counter, guarded by its own
        # pending hash and batches.
        unit, period = parts
        counter_id = keyspace.unit_parts(unit)[0]
        counter = counters.get(counter_id)
        if counter is None or period == "":
            continue
        if counter.period != periods.NONE:
            if counter_id not in current:
                current[counter_id] = periods.window_at(counter.period, counter.time_zone, now).key
            if period >= current[counter_id]:
                continue
        groups.setdefault((unit, period), []).append(key)
    return int(next_cursor), groups


def period_keys_trim(*, now: datetime | None = None) -> tuple[int, int]:
    """Delete the Redis keys of closed periods whose deltas are all in PostgreSQL.

    A period with deltas still pending (or a flush in flight) is left for the next run, decided
    atomically in Redis, so no delta is ever dropped. A late update of a trimmed period simply
    hydrates it again from PostgreSQL. Returns (keys deleted, periods deferred).
    """
    now = now or clock.now()
    counters = config_cache.get().counters_by_id
    deleted = deferred = 0
    # Node by node: a Redis Cluster node scans only its own keys (one Redis: one node).
    for node in store_nodes():
        cursor = 0
        while True:
            cursor, groups = _closed_key_groups(counters, now, cursor, node)
            for (unit, period), keys in groups.items():
                guard = [keyspace.pending_key(unit), keyspace.batches_key(unit)]
                for start in range(0, len(keys), TRIM_KEYS_PER_CALL):
                    chunk = keys[start : start + TRIM_KEYS_PER_CALL]
                    result = redis_call(
                        lambda r, c=chunk, g=guard, p=period: scripts.trim_period(keys=g + c, args=[p], client=r),
                        key=guard[0],
                    )
                    if result < 0:
                        deferred += 1
                        break
                    deleted += result
            if cursor == 0:
                break
    return deleted, deferred


def period_archive_closed() -> ArchiveStats:
    """Flush, archive every closed period not archived yet (catching up missed runs), trim Redis."""
    stats = ArchiveStats()
    token = uuid.uuid4().hex
    if not acquire_lock("archive", ttl_seconds=settings.COUNTER_ARCHIVE_LOCK_SECONDS, token=token):
        stats.locked_out = True
        return stats
    try:
        stats.flushed = _flush_all()
        if not stats.flushed:
            logger.warning("archive: the flusher stayed busy; closed periods are archived on the next run")
            return stats
        now = clock.now()
        for counter in _periodic(config_cache.get().counters_by_id):
            _archive_counter(counter, now, stats)
        stats.keys_trimmed, stats.trims_deferred = period_keys_trim(now=now)
        # Every boundary up to ``now`` is archived: /metrics measures the archive lag from here.
        redis_call(lambda r: r.set(keyspace.ARCHIVE_DONE_KEY, clock.to_ms(now)))
        logger.info(
            "archive: %d periods (%d values) archived, %d automatic resets logged, %d redis keys trimmed, %d deferred",
            stats.periods,
            stats.rows,
            stats.resets_logged,
            stats.keys_trimmed,
            stats.trims_deferred,
        )
        return stats
    finally:
        with contextlib.suppress(StoreUnavailable):
            release_lock("archive", token=token)


def _delete_in_chunks(queryset: QuerySet, what: str) -> int:
    total = 0
    while True:
        ids = list(queryset.order_by().values_list("pk", flat=True)[:ROW_CHUNK])
        if not ids:
            return total
        deleted, _ = queryset.model.objects.filter(pk__in=ids).delete()
        total += deleted
        logger.info("retention: %d %s deleted so far", total, what)


_CLOSED_VALUES_SQL = """
DELETE FROM counters_countervalue cv
WHERE cv.id IN (
    SELECT old.id FROM counters_countervalue old
    WHERE old.counter_id = %s AND old.period <> '' AND old.period < %s
      AND (%s OR EXISTS (
          SELECT 1 FROM counters_countervalue newer
          WHERE newer.counter_id = old.counter_id AND newer.subject = old.subject AND newer.period > old.period
      ))
    LIMIT %s
)
"""


def _delete_closed_values(counter: CounterConfig, before_key: str) -> int:
    # A strategy that carries the value over (keep, ratio, difference) needs each subject's
    # latest row, however old, to open its next period: that row stays.
    drop_latest = counter.reset_strategy == "value"
    total = 0
    while True:
        with connection.cursor() as cursor:
            cursor.execute(_CLOSED_VALUES_SQL, [counter.id, before_key, drop_latest, ROW_CHUNK])
            deleted = cursor.rowcount
        if not deleted:
            return total
        total += deleted
        logger.info("retention: %s: %d closed-period values deleted so far", counter.name, total)


def archive_retention_enforce() -> RetentionStats:
    """Delete archives and closed-period rows older than the retention (at least 7 days)."""
    stats = RetentionStats(retention_days=_retention_days())
    now = clock.now()
    cutoff = now - timedelta(days=stats.retention_days)
    logger.info("retention: deleting what ended before %s (%d days)", cutoff.isoformat(), stats.retention_days)
    stats.archives = _delete_in_chunks(PeriodArchive.objects.filter(period_end__lte=cutoff), "archived periods")
    for counter in _periodic(config_cache.get().counters_by_id):
        # Periods that started before the one holding the cutoff ended at or before it.
        before_key = periods.window_at(counter.period, counter.time_zone, cutoff).key
        stats.values += _delete_closed_values(counter, before_key)
        stats.members += _delete_in_chunks(
            UniqueMember.objects.filter(counter_id=counter.id, period__lt=before_key).exclude(period=""),
            f"{counter.name} unique members",
        )
    stats.buckets = _delete_in_chunks(StatBucket.objects.filter(minute__lt=cutoff), "per-minute stats buckets")
    stats.batches = _delete_in_chunks(
        FlushedBatch.objects.filter(applied_at__lt=now - FLUSHED_BATCH_KEEP), "flushed batch ids"
    )
    logger.info(
        "retention: done: %d archives, %d values, %d members, %d buckets, %d batch ids deleted",
        stats.archives,
        stats.values,
        stats.members,
        stats.buckets,
        stats.batches,
    )
    return stats
