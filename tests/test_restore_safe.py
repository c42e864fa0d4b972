"""Restore-safe flushing: a Redis restored from an older snapshot never makes PostgreSQL apply a delta twice.

A private redis-server is snapshotted (``SAVE``) while deltas are pending, the flusher writes them,
more updates come and are flushed, then the server is killed and restarted from the old dump: the
restored pending deltas come back. PostgreSQL must not count them again, and the service must
continue from what PostgreSQL holds. Per-minute statistics and the operation log must not double
either.
"""

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from django.db.models import Sum
from django.test import override_settings
from django_redis import get_redis_connection

from counters import config, keyspace
from counters.flush import counters_flush
from counters.models import CounterValue, OperationLog, StatBucket, UniqueMember
from counters.redis_store import breaker
from counters.selectors import counter_value_get
from counters.services import counter_update

pytestmark = pytest.mark.django_db


def restart_from(server, dump: Path) -> None:
    """kill -9 the redis-server, put ``dump`` in its place and start it again (it loads the dump)."""
    server.kill()
    shutil.copy(dump, Path(server.dir) / "dump.rdb")
    server.start()
    get_redis_connection("default").connection_pool.disconnect()
    breaker.reset()


def snapshot(server) -> Path:
    client = redis.Redis.from_url(server.url)
    client.save()
    saved = Path(server.dir) / "snapshot.rdb"
    shutil.copy(Path(server.dir) / "dump.rdb", saved)
    return saved


def live_value(counter) -> int:
    return counter_value_get(counter=counter).value


def durable(counter) -> CounterValue:
    return CounterValue.objects.get(counter_id=counter.id)


@pytest.fixture
def private_store(private_redis, settings):
    caches = {"default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    with override_settings(CACHES=caches):
        get_redis_connection("default").connection_pool.disconnect()
        yield private_redis


def test_a_restored_snapshot_never_makes_postgresql_count_twice(builtins, make_counter, private_store, time_machine):
    time_machine.move_to(datetime(2026, 5, 4, 10, 0, 5, tzinfo=UTC), tick=False)
    kills = make_counter("boss_kills", log_operations=True)
    dau = config.cache.get().counters[(kills.app_id, "daily_active_users")]

    def bump(times: int) -> None:
        for _ in range(times):
            counter_update(counter=kills, amount=1, actor="test")

    bump(30)
    counters_flush()
    bump(20)
    for player in ("ann", "bob"):
        counter_update(counter=dau, amount=1, user_id=player)
    old_dump = snapshot(private_store)  # 50 acknowledged, 20 of them pending; 2 members pending

    counters_flush()
    assert durable(kills).value == 50
    time_machine.move_to(datetime(2026, 5, 4, 10, 1, 5, tzinfo=UTC), tick=False)
    bump(10)
    counter_update(counter=dau, amount=1, user_id="cid")
    counters_flush()
    assert durable(kills).value == 60

    restart_from(private_store, old_dump)
    assert live_value(kills) == 50  # Redis is back at the snapshot: 20 pending again, 10 forgotten
    stats = counters_flush()

    # PostgreSQL kept every acknowledged update once, and Redis continues from it.
    assert durable(kills).value == 60
    assert live_value(kills) == 60
    assert stats.refused == 2 and stats.rebased == 2
    assert durable(dau).value == 3
    assert set(UniqueMember.objects.filter(counter_id=dau.id).values_list("member", flat=True)) == {"ann", "bob", "cid"}
    counters_flush()
    assert durable(kills).value == 60

    bump(5)
    counters_flush()
    assert durable(kills).value == live_value(kills) == 65

    # Statistics and the operation log hold every acknowledged update once.
    kills_ops = StatBucket.objects.filter(counter_id=kills.id).aggregate(ops=Sum("operations"), delta=Sum("delta"))
    assert kills_ops == {"ops": 65, "delta": 65}
    assert durable(kills).operations == 65
    assert OperationLog.objects.filter(counter_id=kills.id).count() == 65
    news = sorted(OperationLog.objects.filter(counter_id=kills.id).values_list("new_value", flat=True))
    assert news == list(range(1, 66))

    # A Redis that later comes back empty hydrates from PostgreSQL: no phantom updates.
    redis.Redis.from_url(private_store.url).flushall()
    assert live_value(kills) == 65
    counter_update(counter=kills, amount=1)
    assert live_value(kills) == 66
    counters_flush()
    assert durable(kills).value == 66


def test_updates_after_the_restore_are_counted_once_and_postgresql_never_over_counts(
    builtins, make_counter, private_store
):
    """Between the restore and the next flush, new updates land on the restored state."""
    kills = make_counter("boss_kills")
    for _ in range(10):
        counter_update(counter=kills, amount=1)
    old_dump = snapshot(private_store)
    counters_flush()
    for _ in range(4):
        counter_update(counter=kills, amount=1)
    counters_flush()
    assert durable(kills).value == 14

    restart_from(private_store, old_dump)
    for _ in range(3):
        counter_update(counter=kills, amount=1)
    counters_flush()
    # 17 acknowledged. The 3 updates made on the restored state went into the move that
    # PostgreSQL refused (it cannot tell them from the restored pending deltas): lost, not doubled.
    assert durable(kills).value == 14
    assert live_value(kills) == 14
    counter_update(counter=kills, amount=1)
    counters_flush()
    assert durable(kills).value == live_value(kills) == 15


def test_an_aof_that_kept_everything_flushes_normally(builtins, make_counter, private_store):
    """A restart that lost nothing (the snapshot is the latest state) applies the pending deltas once."""
    kills = make_counter("boss_kills")
    for _ in range(7):
        counter_update(counter=kills, amount=1)
    counters_flush()
    for _ in range(5):
        counter_update(counter=kills, amount=1)
    latest = snapshot(private_store)
    restart_from(private_store, latest)
    stats = counters_flush()
    assert durable(kills).value == live_value(kills) == 12
    assert stats.refused == 0


def test_statistics_stay_per_minute_when_the_flusher_lags(builtins, make_counter, time_machine):
    """Shares of each minute are closed by the update that opens the next one, not by the flush."""
    kills = make_counter("boss_kills")
    start = datetime(2026, 5, 4, 10, 0, 30, tzinfo=UTC)
    for minute, times in enumerate((2, 3, 1)):
        time_machine.move_to(start + timedelta(minutes=minute), tick=False)
        for _ in range(times):
            counter_update(counter=kills, amount=2)
    counters_flush()
    buckets = StatBucket.objects.filter(counter_id=kills.id).order_by("minute")
    got = [(b.minute.minute, b.operations, b.delta, b.last_value, b.max_value) for b in buckets]
    assert got == [(0, 2, 4, 4, 4), (1, 3, 6, 10, 10), (2, 1, 2, 12, 12)]


def test_values_and_batches_from_before_versions_are_flushed_once(builtins, make_counter, store, time_machine):
    """An upgrade: Redis holds a value hydrated by the old script, its old pending fields and an old batch."""
    time_machine.move_to(datetime(2026, 5, 4, 10, 0, 5, tzinfo=UTC), tick=False)
    kills = make_counter("boss_kills")
    CounterValue.objects.create(counter_id=kills.id, value=10, peak=10, operations=10)
    ms, minute = 1777888805000, 1777888805000 // 60000
    # PostgreSQL 10 + an old batch in flight 3 + old pending 5 == Redis 18.
    store.hset(keyspace.value_key(kills.id, "", ""), mapping={"v": 18, "peak": 18, "ops": 18, "upd": ms})
    old_fields = {"d||": 5, "o||": 5, "p||": 18, "t||": ms, f"bo|{minute}": 5, f"bd|{minute}": 5}
    store.hset(keyspace.pending_key(kills.id), mapping=old_fields)
    batch_id = "00000000000000000001-oldbatch0000"
    in_flight = {"d||": 3, "o||": 3, "p||": 13, "t||": ms, f"bo|{minute}": 3, f"bd|{minute}": 3}
    store.hset(keyspace.batch_key(kills.id, batch_id), mapping=in_flight)
    store.sadd(keyspace.batches_key(kills.id), batch_id)

    assert counter_update(counter=kills, amount=1).new_value == 19
    counters_flush()
    assert durable(kills).value == live_value(kills) == 19
    assert durable(kills).operations == 19
    assert StatBucket.objects.get(counter_id=kills.id).operations == 9
    counter_update(counter=kills, amount=1)
    counters_flush()
    assert durable(kills).value == live_value(kills) == 20
