"""Nothing a long run leaves behind grows without bound: deleted counters' deltas and keys."""

import pytest

from counters import config, keyspace
from counters.models import Counter, CounterValue
from counters.services import counter_update, counters_flush

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
