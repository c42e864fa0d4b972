"""Large flush batches go through COPY (``COPY_MIN_ROWS``): as exact as the small ones, crash included."""

import signal

import pytest

from counters import keyspace
from counters.config import cache
from counters.flush import COPY_MIN_ROWS, counters_flush
from counters.models import App, Counter, CounterValue, UniqueMember
from counters.services import UpdateRequest, counter_update_many

from .test_core_durability import flush_in_subprocess

SUBJECTS = COPY_MIN_ROWS + 200
MEMBERS = 300


def fill(tag: str, amount: int) -> tuple[int, int]:
    """Pending deltas for SUBJECTS players and MEMBERS new daily active users; returns both counter ids."""
    app = App.objects.get(slug="default")
    Counter.objects.get_or_create(app=app, name="player_score", defaults={"scope": "user"})
    cache.invalidate()
    snapshot = cache.get()
    score, dau = snapshot.counters[(app.id, "player_score")], snapshot.counters[(app.id, "daily_active_users")]
    updates = [UpdateRequest(score, amount, f"p{i}") for i in range(SUBJECTS)]
    updates += [UpdateRequest(dau, 1, "", f"{tag}{i}") for i in range(MEMBERS)]
    for start in range(0, len(updates), 500):
        counter_update_many(updates=updates[start : start + 500])
    return score.id, dau.id


def stored(score_id: int) -> dict[str, int]:
    return dict(CounterValue.objects.filter(counter_id=score_id).values_list("subject", "value"))


@pytest.mark.django_db
def test_large_batches_are_exact_and_add_to_what_postgresql_has(builtins):
    score_id, dau_id = fill("a", 2)
    counters_flush()
    assert stored(score_id) == {f"p{i}": 2 for i in range(SUBJECTS)}
    assert UniqueMember.objects.filter(counter_id=dau_id).count() == MEMBERS

    # Inside the test's transaction both flushes share the session's COPY tables: the second
    # batch must not carry the first one's rows again.
    fill("b", 5)
    stats = counters_flush()
    assert stats.values == SUBJECTS + 1 and stats.members == MEMBERS
    assert stored(score_id) == {f"p{i}": 7 for i in range(SUBJECTS)}
    assert CounterValue.objects.get(counter_id=dau_id).value == 2 * MEMBERS
    assert UniqueMember.objects.filter(counter_id=dau_id).count() == 2 * MEMBERS


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("crash_point", ["before_commit", "after_commit"])
def test_a_flusher_killed_in_a_large_batch_applies_it_exactly_once(builtins, store, crash_point):
    score_id, dau_id = fill("a", 3)
    crashed = flush_in_subprocess(COUNTER_TEST_CRASH_POINT=crash_point, COUNTER_FLUSH_LOCK_SECONDS="1")
    assert crashed.returncode == -signal.SIGKILL
    assert len(store.smembers(keyspace.batches_key(score_id))) == 1
    # The crash hits the first batch (of either counter): applied whole or not at all.
    applied = (len(stored(score_id)), UniqueMember.objects.filter(counter_id=dau_id).count())
    assert applied in ([(SUBJECTS, 0), (0, MEMBERS)] if crash_point == "after_commit" else [(0, 0)])

    store.delete(keyspace.lock_key("flush"))  # the killed flusher's lock; its expiry is not under test here
    counters_flush()
    assert stored(score_id) == {f"p{i}": 3 for i in range(SUBJECTS)}
    assert UniqueMember.objects.filter(counter_id=dau_id).count() == MEMBERS
    assert store.smembers(keyspace.batches_key(score_id)) == set()
