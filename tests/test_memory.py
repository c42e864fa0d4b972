"""Nothing a long run leaves behind grows without bound: deleted counters' deltas and keys."""

import pytest

from counters import config, keyspace
from counters.flush import counters_flush, deleted_counters_purge
from counters.models import Counter, CounterValue
from counters.services import counter_update

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_counter_deleted_with_deltas_pending_does_not_break_the_flush(builtins, store):
    """Another process's snapshot still listed the counter: its batch is dropped, the rest applied."""
    temp = Counter.objects.create(app=builtins_app(), name="temp_event", period="daily")
    games = Counter.objects.get(name="total_games_played")
    snapshot = config.cache.get()
    counter_update(counter=snapshot.counters_by_id[temp.id], amount=3)
    counter_update(counter=snapshot.counters_by_id[games.id], amount=2)
    # Moved into a batch first, so the delete lands between the move and the apply.
    ids = [temp.id, games.id]
    temp.delete()

    stats = counters_flush(counter_ids=ids)

    assert stats.dropped == 1
    assert CounterValue.objects.get(counter=games).value == 2
    assert not store.smembers(keyspace.batches_key(temp.id))
    assert not store.smembers(keyspace.batches_key(games.id))
    # Nothing left over that would make every later flush fail again.
    assert counters_flush(counter_ids=ids).dropped == 0


def builtins_app():
    return Counter.objects.get(name="total_games_played").app


def counter_keys(store, counter_id: int) -> list[bytes]:
    return list(store.scan_iter(match=keyspace.counter_keys_pattern(counter_id)))


def test_a_deleted_counters_redis_keys_are_dropped_after_the_grace_period(builtins, store, settings):
    temp = Counter.objects.create(app=builtins_app(), name="temp_event", period="daily", unique_members=True)
    games = Counter.objects.get(name="total_games_played")
    snapshot = config.cache.get()
    counter_update(counter=snapshot.counters_by_id[temp.id], amount=1, user_id="u1")
    counter_update(counter=snapshot.counters_by_id[games.id], amount=1)
    temp_id = temp.id
    temp.delete()
    assert counter_keys(store, temp_id), "the update left value, member and pending keys"

    settings.COUNTER_DELETED_KEYS_GRACE_SECONDS = 120
    assert deleted_counters_purge() == 0
    assert counter_keys(store, temp_id), "a process may still write them within the grace period"

    settings.COUNTER_DELETED_KEYS_GRACE_SECONDS = 0
    assert deleted_counters_purge() > 0
    assert counter_keys(store, temp_id) == []
    assert counter_keys(store, games.id), "other counters keep their keys"
    assert store.zcard(keyspace.DELETED_COUNTERS_KEY) == 0
    assert deleted_counters_purge() == 0


def test_counter_ids_are_read_back_only_from_counter_keys():
    assert keyspace.counter_id_of_key(keyspace.value_key(63, "2026-01-01", "p1")) == 63
    assert keyspace.counter_id_of_key(keyspace.batch_key(7, "123-abc").encode()) == 7
    assert keyspace.counter_id_of_key(keyspace.CONFIG_GENERATION_KEY) is None
    assert keyspace.counter_id_of_key("cs:{cx}:pend") is None
