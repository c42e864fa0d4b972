"""Large flush batches go through COPY (``COPY_MIN_ROWS``): as exact as the small ones, crash included."""

import signal

import pytest

from counters import keyspace
from counters.config import cache
from counters.flush import COPY_MIN_ROWS, counters_flush
from counters.models import App, Counter, CounterValue, UniqueMember
from counters.services import UpdateRequest, counter_update_many

from .test_core_durability import flush_in_subprocess

pytestmark = pytest.mark.usefixtures("daily_far_from_midnight")

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


@pytest.mark.django_db
@pytest.mark.parametrize("copy_min_rows", [1, 10**9], ids=["copy", "arrays"])
def test_statistics_and_operations_are_the_same_through_copy_and_arrays(
    builtins, make_counter, time_machine, monkeypatch, copy_min_rows
):
    """The open minute's shares are summed by PostgreSQL from the copied rows, by Python otherwise."""
    from datetime import UTC, datetime, timedelta

    from django.db.models import Sum

    from counters import flush
    from counters.models import StatBucket

    monkeypatch.setattr(flush, "COPY_MIN_ROWS", copy_min_rows)
    kills = make_counter("boss_kills")  # no subjects: its buckets keep the last and highest value
    score = make_counter("player_score", scope="user")
    start = datetime(2026, 5, 4, 10, 0, 30, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    updates = [UpdateRequest(kills, 1) for _ in range(3)] + [UpdateRequest(score, 2, f"p{i}") for i in range(10)]
    counter_update_many(updates=updates)
    time_machine.move_to(start + timedelta(minutes=1), tick=False)
    updates = [UpdateRequest(kills, 2) for _ in range(2)] + [UpdateRequest(score, 1, f"p{i}") for i in range(5)]
    counter_update_many(updates=updates)
    stats = counters_flush()

    assert stats.operations == 20 and stats.values == 11
    buckets = StatBucket.objects.filter(counter_id=kills.id).order_by("minute")
    got = [(b.minute.minute, b.operations, b.delta, b.last_value, b.max_value) for b in buckets]
    assert got == [(0, 3, 3, 3, 3), (1, 2, 4, 7, 7)]
    buckets = StatBucket.objects.filter(counter_id=score.id).order_by("minute")
    got = [(b.minute.minute, b.operations, b.delta, b.last_value, b.max_value) for b in buckets]
    assert got == [(0, 10, 20, None, None), (1, 5, 5, None, None)]
    assert stored(score.id) == {f"p{i}": 3 if i < 5 else 2 for i in range(10)}
    assert CounterValue.objects.filter(counter_id=kills.id).aggregate(v=Sum("value"), o=Sum("operations")) == {
        "v": 7,
        "o": 5,
    }


@pytest.mark.django_db
def test_subjects_and_members_that_copy_must_escape_are_stored_as_they_are(builtins, make_counter, monkeypatch):
    from counters import flush

    monkeypatch.setattr(flush, "COPY_MIN_ROWS", 1)
    score = make_counter("player_score", scope="user")
    odd = ["tab\there", "back\\slash", "line\nbreak", "bar|in|it", r"\N"]
    app = App.objects.get(slug="default")
    dau = cache.get().counters[(app.id, "daily_active_users")]
    updates = [UpdateRequest(score, 4, subject) for subject in odd] + [UpdateRequest(score, 1, "plain")]
    updates += [UpdateRequest(dau, 1, "", member) for member in [*odd, "plain"]]
    counter_update_many(updates=updates)
    stats = counters_flush()
    assert stats.values == 7 and stats.members == 6
    assert stored(score.id) == {**{subject: 4 for subject in odd}, "plain": 1}
    members = set(UniqueMember.objects.filter(counter_id=dau.id).values_list("member", flat=True))
    assert members == {*odd, "plain"}


@pytest.mark.django_db
def test_a_mark_derived_already_answers_its_row_again(builtins, make_counter, store):
    """A flusher that read a batch before another one derived it still gets every row, the same row."""
    from counters.redis_store import scripts

    score = make_counter("player_score", scope="user")
    counter_update_many(updates=[UpdateRequest(score, 3, f"p{i}") for i in range(3)])
    keys = [
        keyspace.pending_key(score.id),
        keyspace.oplog_key(score.id),
        keyspace.batches_key(score.id),
        keyspace.batch_key(score.id, "b1"),
        keyspace.batch_log_key(score.id, "b1"),
    ]
    scripts.move_pending(keys=keys, args=["b1"], client=store)
    marks = sorted(f for f in store.hkeys(keys[3]) if f.startswith(b"c|"))
    derive_keys = [keys[3], *(keyspace.value_key_of_mark(score.id, mark) for mark in marks)]
    first = scripts.derive(keys=derive_keys, args=marks, client=store)
    second = scripts.derive(keys=derive_keys, args=marks, client=store)
    assert first == second and first[::2] == marks
    assert [row.split()[:2] for row in first[1::2]] == [[b"3", b"1"]] * 3
    counters_flush()
    assert stored(score.id) == {f"p{i}": 3 for i in range(3)}
