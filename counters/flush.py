"""The write-behind flush (Redis pending deltas into PostgreSQL, each exactly once) and the clean-ups after it."""

import contextlib
import logging
import os
import signal
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import orjson
from django.conf import settings
from django.db import IntegrityError, connection, transaction

from . import clock, keyspace, split
from .config import cache as config_cache
from .models import Counter, CounterValue, FlushedBatch, OperationLog
from .redis_store import (
    StoreUnavailable,
    acquire_lock,
    cluster_mode,
    node_call,
    nodes_of_keys,
    redis_call,
    release_lock,
    scripts,
)
from .signals import threshold_crossed
from .values import value_rebase

logger = logging.getLogger(__name__)


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class FlushStats:
    locked_out: bool = False
    batches: int = 0
    skipped: int = 0
    values: int = 0
    members: int = 0
    operations: int = 0
    dropped: int = 0
    refused: int = 0
    rebased: int = 0
    nodes_down: int = 0


def _crash_point(name: str) -> None:
    """Fault injection for tests: die here, as a kill -9 would, when COUNTER_TEST_CRASH_POINT names this point.

    Only the crash tests set the variable, in a flusher subprocess (tests/test_core_durability.py,
    tests/test_flush_copy.py, tests/test_reliability_shutdown.py); in production it is never set and
    this is one dictionary lookup. The points, in the order a flush passes them, each a moment where
    a crash must still leave every delta applied exactly once:

    - ``after_move``: pending deltas moved into batches, nothing applied yet;
    - ``before_commit``: a batch written in the transaction, not committed (it rolls back);
    - ``after_commit``: committed with its batch id, the batch not yet dropped from Redis (a re-run
      finds the id recorded and only drops it);
    - ``after_drop``: the batch dropped, its threshold events not yet handed to the alerts (the
      alerts sweep delivers them).
    """
    if os.environ.get("COUNTER_TEST_CRASH_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _new_batch_id() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


# A value's row carries the version of the last move applied to it; a move is applied only on top
# of the version it was taken from (its version - 1). A Redis restored from an older snapshot
# moves what the snapshot held from an older version: refused, never applied twice.
_VALUES_UPSERT = """
INSERT INTO counters_countervalue (counter_id, subject, period, value, peak, operations, updated_at, version)
SELECT %s, x.s, x.p, x.d, x.pk, x.o, to_timestamp(x.t / 1000.0), x.v
FROM {source} AS x(s, p, d, pk, o, t, v)
ON CONFLICT (counter_id, subject, period) DO UPDATE SET
    value = counters_countervalue.value + EXCLUDED.value,
    peak = GREATEST(counters_countervalue.peak, EXCLUDED.peak),
    operations = counters_countervalue.operations + EXCLUDED.operations,
    updated_at = GREATEST(counters_countervalue.updated_at, EXCLUDED.updated_at),
    version = EXCLUDED.version
WHERE counters_countervalue.version = EXCLUDED.version - 1
"""
_VALUES_SOURCE = "unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])"
_VALUES_SQL = _VALUES_UPSERT.format(source=_VALUES_SOURCE)

# Deltas that a flusher from before versions moved into a batch (an upgrade with a batch in flight).
_LEGACY_VALUES_SQL = """
INSERT INTO counters_countervalue (counter_id, subject, period, value, peak, operations, updated_at, version)
SELECT %s, x.s, x.p, x.d, x.pk, x.o, to_timestamp(x.t / 1000.0), 0
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) AS x(s, p, d, pk, o, t)
ON CONFLICT (counter_id, subject, period) DO UPDATE SET
    value = counters_countervalue.value + EXCLUDED.value,
    peak = GREATEST(counters_countervalue.peak, EXCLUDED.peak),
    operations = counters_countervalue.operations + EXCLUDED.operations,
    updated_at = GREATEST(counters_countervalue.updated_at, EXCLUDED.updated_at)
"""

# A split counter's value (docs/splitting.md): each shard's move is added to the value's one row;
# shard 0's is guarded by the row's version, shard k's by its CounterValueShard row's, written in
# the same statement. The peak is the highest total a flush wrote; RETURNING gives each new total
# (for the thresholds, detected here from the totals).
_SPLIT_ROWS = (
    "unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) AS x(s, p, d, o, t, v)"
)
_SPLIT_TOTAL_SET = """
    value = counters_countervalue.value + EXCLUDED.value,
    peak = GREATEST(counters_countervalue.peak, counters_countervalue.value + EXCLUDED.value),
    operations = counters_countervalue.operations + EXCLUDED.operations,
    updated_at = GREATEST(counters_countervalue.updated_at, EXCLUDED.updated_at)"""
_SPLIT_SHARD0_SQL = f"""
INSERT INTO counters_countervalue (counter_id, subject, period, value, peak, operations, updated_at, version)
SELECT %s, x.s, x.p, x.d, x.d, x.o, to_timestamp(x.t / 1000.0), x.v FROM {_SPLIT_ROWS}
ON CONFLICT (counter_id, subject, period) DO UPDATE SET {_SPLIT_TOTAL_SET},
    version = EXCLUDED.version
WHERE counters_countervalue.version = EXCLUDED.version - 1
RETURNING subject, period, value
"""
_SPLIT_SHARD_SQL = f"""
WITH x AS (SELECT * FROM {_SPLIT_ROWS}),
taken AS (
    INSERT INTO counters_countervalueshard (counter_id, subject, period, shard, value, operations, version)
    SELECT %s, x.s, x.p, %s, x.d, x.o, x.v FROM x
    ON CONFLICT (counter_id, subject, period, shard) DO UPDATE SET
        value = counters_countervalueshard.value + EXCLUDED.value,
        operations = counters_countervalueshard.operations + EXCLUDED.operations,
        version = EXCLUDED.version
    WHERE counters_countervalueshard.version = EXCLUDED.version - 1
    RETURNING subject, period
)
INSERT INTO counters_countervalue (counter_id, subject, period, value, peak, operations, updated_at, version)
SELECT %s, x.s, x.p, x.d, x.d, x.o, to_timestamp(x.t / 1000.0), 0
FROM x JOIN taken ON taken.subject = x.s AND taken.period = x.p
ON CONFLICT (counter_id, subject, period) DO UPDATE SET {_SPLIT_TOTAL_SET}
RETURNING subject, period, value
"""

_MEMBERS_INSERT = """
INSERT INTO counters_uniquemember (counter_id, period, member)
SELECT %s, x.p, x.m FROM {source} AS x(p, m)
ON CONFLICT DO NOTHING
"""
_MEMBERS_SQL = _MEMBERS_INSERT.format(source="unnest(%s::text[], %s::text[])")

# Large batches go through COPY into session-local tables instead of array parameters: quoting
# every array element costs the client more than PostgreSQL's whole upsert (bench/flush_bench.py).
# Below this many rows the three extra round trips cost more than they save. The rows are sent as
# the derivation wrote them (numbers separated by tabs instead of spaces, the field split at its
# '|'), so no Python object is made per column: a row has 5, 8 or 10 numbers (``DERIVE_SCRIPT``),
# the columns it lacks are empty (NULL), and so are an empty period and subject (read back as '').
COPY_MIN_ROWS = 1000
_COPY_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS counters_flush_rows (p text, s text, d bigint, o bigint, pk bigint, t bigint,
    v bigint, m bigint, so bigint, sd bigint, sl bigint, sm bigint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS counters_flush_new_members (p text, s text, m text) ON COMMIT DELETE ROWS;
TRUNCATE counters_flush_rows, counters_flush_new_members
"""
_COPY_ROWS = "COPY counters_flush_rows FROM STDIN (NULL '')"
_COPY_MEMBERS = "COPY counters_flush_new_members FROM STDIN"
_ROW_PAD = {4: b"\t" * 5, 7: b"\t" * 2, 9: b""}  # by the spaces in a row: tabs up to the 12th column
_VALUES_FROM_COPY_SQL = _VALUES_UPSERT.format(
    source="(SELECT coalesce(s, ''), coalesce(p, ''), d, pk, o, t, v FROM counters_flush_rows)"
)
_MEMBERS_FROM_COPY_SQL = _MEMBERS_INSERT.format(source="(SELECT p, m FROM counters_flush_new_members)")

BUCKETS_UPSERT_SQL = """
INSERT INTO counters_statbucket (counter_id, minute, operations, delta, last_value, max_value)
SELECT %s, to_timestamp(x.m * 60), x.o, x.d, x.v, x.mx
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) AS x(m, o, d, v, mx)
ON CONFLICT (counter_id, minute) DO UPDATE SET
    operations = counters_statbucket.operations + EXCLUDED.operations,
    delta = counters_statbucket.delta + EXCLUDED.delta,
    last_value = COALESCE(EXCLUDED.last_value, counters_statbucket.last_value),
    max_value = GREATEST(counters_statbucket.max_value, EXCLUDED.max_value)
"""

EVENTS_INSERT_SQL = """
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
    # derived rows, as DERIVE_SCRIPT wrote them: (b"<period>|<subject>", b"delta ops peak updated version ...")
    values: list[tuple[bytes, bytes]]
    # closed minutes' shares of values: (period, subject, minute, operations, delta, last, max); the
    # open minute's shares are in the rows (``_row_shares``, or PostgreSQL sums them: ``_copied_shares``)
    shares: list[tuple[str, str, int, int, int, int | None, int | None]]
    # new unique members: b"<period>|<subject>|<member>"
    members: list[bytes]
    events: list[tuple[int, str, str, int]]
    log: list[bytes]
    # moved by a flusher from before versions: (period, subject) -> [delta, ops, peak, ms]; minute -> bucket
    legacy_values: dict[tuple[str, str], list[int]]
    legacy_buckets: dict[int, list]


_LEGACY_VALUE_SLOTS = {"d": 0, "o": 1, "p": 2, "t": 3}
_LEGACY_BUCKET_SLOTS = {"bo": 0, "bd": 1, "bv": 2, "bm": 3}


def _value_key(field: bytes) -> tuple[str, str]:
    """``(period, subject)`` of a derived row's field (``<period>|<subject>``)."""
    period, _, subject = field.decode().partition("|")
    return period, subject


def _parse_batch(fields: dict[bytes, bytes], derived: list[bytes], log: list[bytes]) -> _Batch:
    """What a batch holds: ``fields`` (its hash; its change marks are skipped, their rows are in
    ``derived``, DERIVE_SCRIPT's reply: field, row, ...). The rows stay bytes: large batches hand
    them to COPY as they are."""
    batch = _Batch([], [], [], [], log, defaultdict(lambda: [0, 0, 0, 0]), defaultdict(lambda: [0, 0, None, None]))
    shares = batch.shares
    values = [(f[2:], raw) for f, raw in fields.items() if f[:2] == b"c|" and raw != b"1"]  # derived by an earlier run
    values += zip([f[2:] for f in derived[::2]], derived[1::2], strict=True)
    batch.values = values
    batch.members = [f[2:] for f in fields if f[:2] == b"u|"]
    for raw_field, raw_value in fields.items():
        kind = raw_field[:2]
        if kind == b"u|" or kind == b"c|":
            continue
        if kind == b"b|":
            minute, period, subject = raw_field[2:].decode().split("|", 2)
            numbers = list(map(int, raw_value.split()))
            last, top = (numbers[2], numbers[3]) if len(numbers) == 4 else (None, None)
            shares.append((period, subject, int(minute), numbers[0], numbers[1], last, top))
        else:
            _parse_rare(batch, raw_field.decode(), raw_value)
    return batch


def _row_shares(
    values: list[tuple[bytes, bytes]], refused: set[tuple[str, str]]
) -> tuple[int, list[tuple[str, str, int, int, int, int | None, int | None]]]:
    """The operations and the open minute's shares (as in ``_Batch.shares``) of the rows not refused."""
    operations, shares = 0, []
    for field, raw in values:
        parts = raw.split()
        if len(parts) <= 5 and not refused:
            operations += int(parts[1])
            continue
        period, subject = _value_key(field)
        if (period, subject) in refused:
            continue
        operations += int(parts[1])
        if len(parts) > 5:
            last, top = (int(parts[8]), int(parts[9])) if len(parts) == 10 else (None, None)
            shares.append((period, subject, int(parts[5]), int(parts[6]), int(parts[7]), last, top))
    return operations, shares


# What ``_row_shares`` reads, summed by PostgreSQL from the copied rows (one share per minute: the
# last value of the latest period that keeps one). The group of rows without a share adds only
# operations.
_COPIED_SHARES_SQL = """
SELECT m, sum(o)::bigint, sum(so)::bigint, sum(sd)::bigint, max(coalesce(p, '')) FILTER (WHERE sl IS NOT NULL),
    (array_agg(sl ORDER BY coalesce(p, '') DESC) FILTER (WHERE sl IS NOT NULL))[1], max(sm)
FROM counters_flush_rows GROUP BY m
"""


def _copied_shares(cursor) -> tuple[int, list[tuple[str, str, int, int, int, int | None, int | None]]]:
    """``_row_shares`` of every copied row."""
    cursor.execute(_COPIED_SHARES_SQL)
    operations, shares = 0, []
    for minute, ops, share_ops, delta, period, last, top in cursor.fetchall():
        operations += ops
        if minute is not None:
            shares.append((period or "", "", minute, share_ops, delta, last, top))
    return operations, shares


def _parse_rare(batch: _Batch, field: str, raw_value: bytes) -> None:
    kind, _, rest = field.partition("|")
    if kind == "e":
        period, subject, threshold_id, _fired_ms = rest.split("|", 3)
        batch.events.append((int(threshold_id), subject, period, int(raw_value)))
    elif kind in _LEGACY_VALUE_SLOTS:
        period, _, subject = rest.partition("|")
        batch.legacy_values[(period, subject)][_LEGACY_VALUE_SLOTS[kind]] = int(raw_value)
    elif kind in _LEGACY_BUCKET_SLOTS:
        batch.legacy_buckets[int(rest)][_LEGACY_BUCKET_SLOTS[kind]] = int(raw_value)


def _buckets(batch: _Batch, row_shares: list, refused: set[tuple[str, str]]) -> dict[int, list]:
    """Per-minute buckets [ops, delta, last, max] of the shares of the values PostgreSQL took."""
    buckets = batch.legacy_buckets
    latest: dict[int, str] = {}
    for period, subject, minute, operations, delta, last, top in batch.shares + row_shares:
        if (period, subject) in refused:
            continue
        bucket = buckets[minute]
        bucket[0] += operations
        bucket[1] += delta
        if last is not None:
            # Two values of a counter without subjects share a minute only across a period
            # boundary: the new period's value is the counter's level at the end of the minute.
            if period >= latest.get(minute, period):
                bucket[2], latest[minute] = last, period
            bucket[3] = top if bucket[3] is None else max(bucket[3], top)
    return buckets


@dataclass(slots=True)
class _Applied:
    event_ids: list[int]
    # values whose Redis copy was not at PostgreSQL's version: their move was refused
    refused: set[tuple[str, str]]


class _NotAllApplied(Exception):
    pass


def _apply_batch(unit: keyspace.Unit, batch_id: str, batch: _Batch, stats: FlushStats) -> _Applied:
    """Apply one batch of a counter, or of a split counter's shard, in one transaction (nothing if
    its id is recorded already)."""
    counter_id, shard = keyspace.unit_parts(unit)
    counter = config_cache.get().counters_by_id.get(counter_id)
    split_counter = shard > 0 or (counter is not None and counter.shards > 1)
    applied = _Applied([], set())
    with transaction.atomic():
        # Hold the counter's row for this transaction: a deletion (which locks the row first, see
        # receivers.counter_deleting) then waits for this flush and removes its rows too, and a flush
        # that comes after a deletion finds the row gone instead of failing the deletion at its commit.
        if not Counter.objects.filter(id=counter_id).select_for_update(no_key=True).values_list("id"):
            raise IntegrityError(f"counter {counter_id} was deleted")
        _, created = FlushedBatch.objects.get_or_create(id=batch_id, defaults={"counter_id": counter_id})
        if not created:
            stats.skipped += 1
            return applied
        with connection.cursor() as cursor:
            copy = not split_counter and len(batch.values) + len(batch.members) >= COPY_MIN_ROWS
            if copy:
                _copy_values_and_members(cursor, batch)
            if split_counter:
                applied.refused, totals = _upsert_split_values(cursor, counter_id, shard, batch)
                if counter is not None and counter.thresholds:
                    batch.events += _split_crossings(counter, batch, totals)
            else:
                applied.refused = _upsert_values(cursor, counter_id, batch, copy)
            if copy and not applied.refused:
                operations, row_shares = _copied_shares(cursor)
            else:
                operations, row_shares = _row_shares(batch.values, applied.refused)
            if batch.members:
                if copy:
                    cursor.execute(_MEMBERS_FROM_COPY_SQL, [counter_id])
                else:
                    split = [m.decode().split("|", 2) for m in batch.members]
                    cursor.execute(_MEMBERS_SQL, [counter_id, [m[0] for m in split], [m[2] for m in split]])
            if batch.legacy_values:
                keys = list(batch.legacy_values)
                rows = [batch.legacy_values[k] for k in keys]
                columns = [[k[1] for k in keys], [k[0] for k in keys], *([r[i] for r in rows] for i in (0, 2, 1, 3))]
                cursor.execute(_LEGACY_VALUES_SQL, [counter_id, *columns])
            buckets = _buckets(batch, row_shares, applied.refused)
            if buckets:
                minutes = sorted(buckets)
                cols = list(zip(*(buckets[m] for m in minutes), strict=True))
                cursor.execute(BUCKETS_UPSERT_SQL, [counter_id, minutes, *map(list, cols)])
            if batch.events:
                cursor.execute(EVENTS_INSERT_SQL, [counter_id, *map(list, zip(*batch.events, strict=True))])
                applied.event_ids = [row[0] for row in cursor.fetchall()]
        log = batch.log
        if applied.refused:
            log = [line for line in log if _log_value(line) not in applied.refused]
        if log:
            operation_log_insert(counter_id=counter_id, lines=log)
        _crash_point("before_commit")
    stats.batches += 1
    stats.values += len(batch.values) - len(applied.refused) + len(batch.legacy_values)
    stats.refused += len(applied.refused)
    stats.members += len(batch.members)
    stats.operations += operations
    stats.operations += sum(v[1] for v in batch.legacy_values.values())
    return applied


def _log_value(line: bytes) -> tuple[str, str]:
    item = orjson.loads(line)
    return item["period"], item["subject"]


def _upsert_values(cursor, counter_id: int, batch: _Batch, copy: bool) -> set[tuple[str, str]]:
    """Apply the batch's value rows; returns those refused (PostgreSQL's row at another version)."""
    if not batch.values:
        return set()
    if copy:
        sql, params = _VALUES_FROM_COPY_SQL, [counter_id]
    else:
        # delta, peak, operations, updated, version
        sql, params = _VALUES_SQL, [counter_id, *_row_columns(batch, (0, 2, 1, 3, 4))[1]]
    try:
        # Every row applies unless Redis lost its place (a restore): then undo and find which.
        with transaction.atomic():
            cursor.execute(sql, params)
            if cursor.rowcount != len(batch.values):
                raise _NotAllApplied
    except _NotAllApplied:
        cursor.execute(sql + " RETURNING subject, period", params)
        taken = {(period, subject) for subject, period in cursor.fetchall()}
        return {_value_key(field) for field, _ in batch.values} - taken
    return set()


def _row_columns(batch: _Batch, numbers: tuple[int, ...]) -> tuple[list[tuple[str, str]], list[list]]:
    """The batch's rows as array parameters: ``(period, subject)`` of each, and the columns subject,
    period, then the row's numbers at ``numbers`` (positions in DERIVE_SCRIPT's row)."""
    keys = [_value_key(field) for field, _ in batch.values]
    rows = [list(map(int, raw.split()[:5])) for _, raw in batch.values]
    return keys, [[k[1] for k in keys], [k[0] for k in keys], *([r[i] for r in rows] for i in numbers)]


def _upsert_split_values(cursor, counter_id: int, shard: int, batch: _Batch) -> tuple[set, list]:
    """Add a split counter's shard's rows to the values' totals (``_SPLIT_SHARD0_SQL`` /
    ``_SPLIT_SHARD_SQL``); returns the rows refused (as ``_upsert_values``) and, of the others,
    ``(period, subject, new total)``."""
    if not batch.values:
        return set(), []
    keys, columns = _row_columns(batch, (0, 1, 3, 4))  # delta, operations, updated, version
    if shard:
        cursor.execute(_SPLIT_SHARD_SQL, [*columns, counter_id, shard, counter_id])
    else:
        cursor.execute(_SPLIT_SHARD0_SQL, [counter_id, *columns])
    totals = [(period, subject, total) for subject, period, total in cursor.fetchall()]
    return set(keys) - {(period, subject) for period, subject, _ in totals}, totals


def _split_crossings(counter, batch: _Batch, totals: list) -> list[tuple[int, str, str, int]]:
    """The thresholds a split counter's totals crossed in this flush, as ``_Batch.events``: from
    the total before the shard's delta to the total after it (PostgreSQL's rules then keep each
    once per period, or its re-arming and cooldown: ``EVENTS_INSERT_SQL``)."""
    moved = {_value_key(field): raw.split() for field, raw in batch.values}
    events = []
    for period, subject, new in totals:
        row = moved[(period, subject)]
        old, ms = new - int(row[0]), int(row[3])
        for t in counter.thresholds:
            up = t.direction == "up"
            if (up and old < t.value <= new) or (not up and old > t.value >= new):
                events.append((t.id, subject, period, ms))
    return events


def _copy_data(lines: list[bytes], tabs: int) -> bytes | None:
    """COPY text data of ``lines`` if each has exactly ``tabs`` tabs and needs no escaping, else None."""
    data = b"\n".join(lines) + b"\n"
    clean = b"\\" not in data and b"\r" not in data
    if clean and data.count(b"\t") == tabs * len(lines) and data.count(b"\n") == len(lines):
        return data
    return None


def _copy_values_and_members(cursor, batch: _Batch) -> None:
    # Emptied first, not only at commit: inside an outer transaction (tests) batches share them.
    cursor.execute(_COPY_TABLES)
    pad, values = _ROW_PAD, batch.values
    try:
        rows = [f.replace(b"|", b"\t", 1) + b"\t" + r.replace(b" ", b"\t") + pad[r.count(b" ")] for f, r in values]
        data = _copy_data(rows, 11)
    except KeyError:  # a row of another shape: not one of DERIVE_SCRIPT's
        data = None
    if data is not None:
        with cursor.cursor.copy(_COPY_ROWS) as copy:
            copy.write(data)
    else:  # a subject with a tab, a backslash, a line break...: psycopg escapes it
        with cursor.cursor.copy("COPY counters_flush_rows FROM STDIN") as copy:
            for field, raw in batch.values:
                numbers = raw.decode().split()
                copy.write_row([*_value_key(field), *numbers, *[None] * (10 - len(numbers))])
    data = _copy_data([m.replace(b"|", b"\t", 2) for m in batch.members], 2)
    with cursor.cursor.copy(_COPY_MEMBERS) as copy:
        if data is not None:
            copy.write(data)
        else:
            for member in batch.members:
                copy.write_row(member.decode().split("|", 2))


def operation_log_insert(*, counter_id: int, lines: list[bytes]) -> None:
    """Record operation-log lines (the update script's JSON entries) in PostgreSQL."""
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

    Pending data is first renamed into a batch with an id (atomically, in Redis), then each
    changed value's delta is derived from its value hash into the batch; the batch is applied in
    one transaction that also records its id; only then is it deleted. A batch left behind by a
    crash is picked up on the next run and applied only if its id is not recorded.

    Each value's delta also carries the version it was taken from, and PostgreSQL applies it only
    on top of that version. A Redis restored from an older snapshot (or an AOF that lost its last
    second) moves deltas from a version PostgreSQL has passed: they are refused, never applied a
    second time, and that value's Redis copy is rebased on PostgreSQL's row.
    """
    stats = FlushStats()
    token = uuid.uuid4().hex
    # The lock only saves duplicate work: exactly-once comes from the batch ids. A short TTL lets
    # a restarted flusher take over soon after one that was killed while holding it.
    try:
        locked = acquire_lock("flush", ttl_seconds=settings.COUNTER_FLUSH_LOCK_SECONDS, token=token)
    except StoreUnavailable:
        if not cluster_mode():
            raise
        # In a Redis Cluster the lock's node may be the one that is down: flush the other nodes'
        # counters without it (it only saves duplicate work).
        logger.warning("flush: the lock's redis node is unavailable; flushing without the lock")
        locked = True
    if not locked:
        stats.locked_out = True
        return stats
    try:
        counters = config_cache.get().counters_by_id
        counter_ids = counter_ids if counter_ids is not None else sorted(counters)
        # A split counter's shards each move their own batch (docs/splitting.md).
        ids = [u for cid in counter_ids for u in (split.units(counters[cid]) if cid in counters else [cid])]
        # Batch ids in counter order, whichever node a counter lives on: batches apply in that order.
        batch_ids = {cid: _new_batch_id() for cid in ids}

        def move_and_list(r, ids):
            pipe = r.pipeline(transaction=False)
            for cid in ids:
                batch_id = batch_ids[cid]
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

        # Node by node (one Redis: one node): in a Redis Cluster a node that is down holds back
        # only its own counters' deltas, which wait there for a later run.
        outstanding = []
        for node, positions in nodes_of_keys([keyspace.pending_key(cid) for cid in ids]).items():
            node_ids = [ids[i] for i in positions]
            try:
                moved = node_call(lambda r, n=node_ids: move_and_list(r, n), node=node or None)
            except StoreUnavailable:
                if not node:
                    raise
                stats.nodes_down += 1
                logger.warning("flush: redis node %s unavailable; its counters wait for a later run", node)
                continue
            outstanding += [(cid, _decode(b)) for cid, members in zip(node_ids, moved, strict=True) for b in members]
        outstanding.sort(key=lambda item: item[1])
        _crash_point("after_move")
        # The next batch is read, derived (Redis) and parsed while this one is applied (PostgreSQL).
        # Reading and deriving a moved batch is safe at any time: a batch is applied only after its own.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush-read") as reader:
            upcoming = reader.submit(_read_batch, *outstanding[0]) if outstanding else None
            for index, (cid, batch_id) in enumerate(outstanding):
                current = upcoming
                if index + 1 < len(outstanding):
                    upcoming = reader.submit(_read_batch, *outstanding[index + 1])
                try:
                    _flush_batch(cid, batch_id, current.result(), stats)
                except StoreUnavailable:
                    if not cluster_mode():
                        raise
                    # Its node went away mid-run: the batch stays in Redis and a later run applies
                    # it (its id makes that exactly once); the other nodes' counters go on.
                    stats.nodes_down += 1
                    logger.warning("flush: counter %s's redis node unavailable; batch %s waits", cid, batch_id)
    finally:
        with contextlib.suppress(StoreUnavailable):
            release_lock("flush", token=token)
    return stats


def _read_batch(cid: keyspace.Unit, batch_id: str) -> _Batch:
    """A moved batch: its hash, its changed values' derived rows (``_derive``) and its operation log."""
    fields, log = redis_call(
        lambda r: (
            r.pipeline(transaction=False)
            .hgetall(keyspace.batch_key(cid, batch_id))
            .lrange(keyspace.batch_log_key(cid, batch_id), 0, -1)
            .execute()
        ),
        key=keyspace.batch_key(cid, batch_id),
    )
    marks = [field for field, raw in fields.items() if raw == b"1" and field[:2] == b"c|"]
    return _parse_batch(fields, _derive(cid, batch_id, marks) if marks else [], log)


def _flush_batch(cid: keyspace.Unit, batch_id: str, batch: _Batch, stats: FlushStats) -> None:
    """Apply one read batch (of a counter or a split counter's shard), then drop it from Redis and
    hand on what it caused."""
    try:
        applied = _apply_batch(cid, batch_id, batch, stats)
    except IntegrityError:
        if Counter.objects.filter(id=keyspace.unit_parts(cid)[0]).exists():
            raise
        # The counter was deleted (with its rows) after these deltas were written: they
        # belong nowhere, and keeping the batch would fail every flush after this one.
        stats.dropped += 1
        applied = _Applied([], set())
    _crash_point("after_commit")
    redis_call(
        lambda r: scripts.drop_batch(
            keys=[keyspace.batches_key(cid), keyspace.batch_key(cid, batch_id), keyspace.batch_log_key(cid, batch_id)],
            args=[batch_id],
            client=r,
        ),
        key=keyspace.batches_key(cid),
    )
    _crash_point("after_drop")
    if applied.refused:
        stats.rebased += _rebase_refused(cid, applied.refused)
    if applied.event_ids:
        threshold_crossed.send(sender=counters_flush, event_ids=applied.event_ids)


# Values derived per script call: each call holds Redis for about this many value hashes.
DERIVE_CHUNK = 500


def _derive(counter_id: keyspace.Unit, batch_id: str, marks: list[bytes]) -> list[bytes]:
    """Derive the rows of a batch's changed values (DERIVE_SCRIPT): field, row, field, row, ..."""
    batch = keyspace.batch_key(counter_id, batch_id)

    def derive(r):
        pipe = r.pipeline(transaction=False)
        for start in range(0, len(marks), DERIVE_CHUNK):
            chunk = marks[start : start + DERIVE_CHUNK]
            keys = [batch, *(keyspace.value_key_of_mark(counter_id, mark) for mark in chunk)]
            scripts.derive(keys=keys, args=chunk, client=pipe)
        return pipe.execute()

    replies = node_call(derive, key=batch)
    return replies[0] if len(replies) == 1 else [item for reply in replies for item in reply]


def _rebase_refused(unit: keyspace.Unit, refused: set[tuple[str, str]]) -> int:
    """Rebase on PostgreSQL the Redis copies whose move was refused; returns how many."""
    rebased = 0
    counter_id, shard = keyspace.unit_parts(unit)
    for period, subject in sorted(refused):
        with transaction.atomic():
            row = (
                CounterValue.objects.select_for_update()
                .filter(counter_id=counter_id, subject=subject, period=period)
                .values_list("value", "operations", "version")
                .first()
            )
            # A split counter's shard continues from its share (the whole row if not split).
            base = split.shard_base(counter_id=counter_id, subject=subject, period=period, shard=shard, row=row)
            if base is not None and value_rebase(
                counter_id=unit, period=period, subject=subject, value=base[0], version=base[2]
            ):
                rebased += 1
            else:
                # Another batch of the counter is in flight: it is refused too, and rebases then.
                logger.warning("flush: value %s|%s of counter %s not rebased yet", period, subject, counter_id)
    if rebased:
        logger.warning(
            "flush: %d values of counter %s were behind PostgreSQL (Redis restored from an older state?): "
            "their moved deltas were refused and Redis now continues from PostgreSQL",
            rebased,
            counter_id,
        )
    return rebased


def operation_log_trim(*, batch_size: int = 10_000) -> int:
    """Delete operation-log entries older than COUNTER_OPERATION_LOG_RETENTION_DAYS, in bounded batches."""
    cutoff = clock.now() - timedelta(days=settings.COUNTER_OPERATION_LOG_RETENTION_DAYS)
    deleted = 0
    while True:
        ids = list(OperationLog.objects.filter(created_at__lt=cutoff).values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        deleted += OperationLog.objects.filter(id__in=ids).delete()[0]
        logger.info("operation log: %d entries older than %s deleted so far", deleted, cutoff.isoformat())
    return deleted
