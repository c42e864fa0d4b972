"""Presence counters (online_players): leases opened by logins, renewed by heartbeats, closed by
logouts, lapsing by themselves; node leases; persistence; all with the clock moved, never slept."""

import random
import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django_celery_beat.models import PeriodicTask

from counters import config, keyspace
from counters.errors import InvalidParameter
from counters.flush import counters_flush
from counters.models import Counter, CounterValue
from counters.presence import HEARTBEAT, LOGIN, LOGOUT, Lease, presence_sweep, presence_update
from counters.selectors import counter_get, counter_value_get, default_app_id

T0 = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def online(**fields):
    """The built-in online_players (a presence counter since migration 0007), with ``fields`` changed."""
    if fields:
        Counter.objects.filter(app__slug="default", name="online_players").update(**fields)
        config.cache.invalidate()
    return counter_get(app_id=default_app_id(), name="online_players")


def act(op: str, *users: str, session: str = "", node: str = "", lease: int | None = None) -> int:
    leases = [Lease(user, session, node) for user in users] or [Lease(node_id=node)]
    return presence_update(counter=online(), op=op, leases=leases, lease_seconds=lease).update.new_value


def count() -> int:
    return counter_value_get(counter=online()).value


@pytest.fixture
def clock_at(time_machine):
    """Moves the service's clock: ``clock_at(seconds)`` is T0 + seconds, with the clock stopped."""

    def move(seconds: float) -> None:
        time_machine.move_to(T0 + timedelta(seconds=seconds), tick=False)

    move(0)
    return move


@pytest.mark.django_db
class TestLeases:
    def test_the_builtin_online_players_is_a_presence_counter(self, builtins):
        counter = online()
        assert counter.is_presence
        assert (counter.lease_seconds, counter.presence_counts) == (90, "users")

    def test_a_lease_counts_until_it_lapses_and_a_heartbeat_renews_it(self, builtins, clock_at):
        assert act(LOGIN, "u1", "u2") == 2
        clock_at(60)
        assert act(HEARTBEAT, "u1") == 2
        clock_at(89.999)
        assert count() == 2
        clock_at(90)
        assert count() == 1  # u2's lease (T0 + 90 s) has lapsed; u1's runs to 150 s
        clock_at(150)
        assert count() == 0

    def test_logout_closes_the_lease_at_once(self, builtins, clock_at):
        act(LOGIN, "u1", "u2")
        assert act(LOGOUT, "u1") == 1
        assert act(LOGOUT, "u1") == 1  # a repeated logout changes nothing
        assert act(LOGOUT, "never-logged-in") == 1

    def test_the_same_user_on_two_sessions_counts_once_until_both_end(self, builtins, clock_at):
        act(LOGIN, "u1", session="phone")
        assert act(LOGIN, "u1", session="pc") == 1
        assert act(LOGOUT, "u1", session="phone") == 1  # still online on the pc
        clock_at(60)
        act(HEARTBEAT, "u1", session="pc")
        clock_at(120)
        assert count() == 1
        assert act(LOGOUT, "u1", session="pc") == 0

    def test_logout_without_a_session_ends_every_session_of_the_user(self, builtins, clock_at):
        act(LOGIN, "u1", session="phone")
        act(LOGIN, "u1", session="pc")
        act(LOGIN, "u10", session="pc")  # a user whose id starts like u1's stays
        assert act(LOGOUT, "u1") == 1
        assert count() == 1

    def test_logout_without_a_session_ends_the_login_without_one_too(self, builtins, clock_at):
        online(presence_counts="sessions")
        act(LOGIN, "u1")
        act(LOGIN, "u1", session="phone")
        act(LOGIN, "u10")
        assert act(LOGOUT, "u1") == 1
        assert act(LOGIN, "u1") == 2  # a new lease: nothing of the old one was left behind

    def test_a_logout_ends_a_login_whose_session_index_predates_this_version(self, builtins, clock_at, store):
        """Earlier versions indexed a login without a session among the user's sessions too: Redis
        keeps those leases across an upgrade, and a logout still ends them, index entry included."""
        act(LOGIN, "u1")
        act(LOGIN, "u1", session="phone")
        sessions = keyspace.presence_keys(online().id, "")[8]
        store.zadd(sessions, {"u1|": 0})  # as an earlier version wrote it
        assert act(LOGOUT, "u1") == 0
        assert store.zrange(sessions, 0, -1) == []
        assert act(LOGIN, "u1") == 1

    def test_a_login_again_renews_the_lease(self, builtins, clock_at):
        act(LOGIN, "u1", "u2")
        clock_at(60)
        assert act(LOGIN, "u1") == 2
        clock_at(90)
        assert count() == 1
        clock_at(149.999)
        assert count() == 1
        clock_at(150)
        assert count() == 0

    def test_a_login_again_without_the_node_stays_with_the_node(self, builtins, clock_at):
        act(LOGIN, "u1", node="server-a")
        clock_at(60)
        act(LOGIN, "u1")  # its own 90 s would run to 150 s: the node's lease still decides
        clock_at(89.999)
        assert count() == 1
        clock_at(90)
        assert count() == 0

    def test_a_counter_of_sessions_counts_each_session(self, builtins, clock_at):
        online(presence_counts="sessions")
        act(LOGIN, "u1", session="phone")
        assert act(LOGIN, "u1", session="pc") == 2
        assert act(LOGOUT, "u1", session="phone") == 1

    def test_a_heartbeat_may_ask_for_a_longer_lease(self, builtins, clock_at):
        act(HEARTBEAT, "u1", lease=600)
        act(HEARTBEAT, "u2")
        clock_at(300)
        assert count() == 1


@pytest.mark.django_db
class TestNodes:
    def test_a_node_lapse_takes_all_its_players_at_once_and_other_nodes_stay(self, builtins, clock_at):
        act(LOGIN, *[f"a{i}" for i in range(50)], node="server-a")
        act(LOGIN, *[f"b{i}" for i in range(30)], node="server-b")
        act(LOGIN, "solo")
        assert count() == 81
        for second in (30, 60, 90, 120):
            clock_at(second)
            act(HEARTBEAT, node="server-b")  # server-a has crashed: only b heartbeats
            act(HEARTBEAT, "solo")
            expected = 81 if second < 90 else 31
            assert count() == expected, second
        # Players carried by a live node need no heartbeat of their own.
        for second in range(180, 660, 60):
            clock_at(second)
            act(HEARTBEAT, node="server-b")
        assert count() == 30

    def test_a_player_who_moves_to_another_node_leaves_with_the_new_one(self, builtins, clock_at):
        act(LOGIN, "u1", node="server-a")
        act(LOGIN, "u1", node="server-b")
        clock_at(60)
        act(HEARTBEAT, node="server-a")
        clock_at(100)
        act(HEARTBEAT, node="server-a")
        assert count() == 0  # server-b lapsed at 90 s and took u1; server-a's lapse must not matter

    def test_logout_detaches_the_player_from_the_node(self, builtins, clock_at, store):
        act(LOGIN, "u1", "u2", node="server-a")
        assert act(LOGOUT, "u1") == 1
        tag = keyspace.presence_keys(online().id, "")
        assert store.zcard(tag[10]) == 1 and store.hlen(tag[11]) == 1  # only u2 left on the node


@pytest.mark.django_db
class TestRefusals:
    @pytest.mark.parametrize("op", [LOGIN, LOGOUT])
    def test_login_and_logout_need_a_user(self, builtins, op):
        with pytest.raises(InvalidParameter) as error:
            presence_update(counter=online(), op=op, leases=[Lease(node_id="n1")])
        assert error.value.code == 4001
        assert count() == 0

    @pytest.mark.parametrize("lease", [0, 4, 3601, True, "90"])
    def test_a_lease_out_of_range_is_refused(self, builtins, lease):
        with pytest.raises(InvalidParameter):
            presence_update(counter=online(), op=HEARTBEAT, leases=[Lease("u1")], lease_seconds=lease)
        assert count() == 0

    def test_at_most_a_thousand_leases_per_call(self, builtins):
        with pytest.raises(InvalidParameter):
            presence_update(counter=online(), op=HEARTBEAT, leases=[Lease(f"u{i}") for i in range(1001)])
        assert count() == 0


@pytest.mark.django_db
class TestPersistence:
    def test_the_flusher_persists_the_count_and_peak_including_lapses(self, builtins, clock_at):
        act(LOGIN, *[f"u{i}" for i in range(10)])
        act(LOGOUT, "u0", "u1", "u2")
        counters_flush()
        row = CounterValue.objects.get(counter_id=online().id, subject="", period="")
        assert (row.value, row.peak) == (7, 10)
        clock_at(91)
        assert presence_sweep() == 1  # nobody reads: the Beat task brings the count down
        counters_flush()
        row.refresh_from_db()
        assert (row.value, row.peak) == (0, 10)

    def test_a_count_that_never_changes_writes_nothing_for_the_flusher(self, builtins, clock_at, store):
        act(LOGIN, "u1")
        counters_flush()
        for second in range(10, 80, 10):
            clock_at(second)
            act(HEARTBEAT, "u1")
            count()
        assert not store.exists(keyspace.pending_key(online().id))


@pytest.mark.django_db(transaction=True)
def test_storms_racing_with_expiry_stay_exact(builtins, clock_at, store):
    """Logins, heartbeats and logouts from 8 threads while the clock passes the lapse of 200
    idle players: no reply is ever negative or counts a lapsed lease, and the end is exact."""
    idle = [f"idle{i}" for i in range(200)]
    act(HEARTBEAT, *idle, lease=5)  # they lapse at T0 + 5 s, in the middle of the storm
    players = {t: [f"t{t}p{i}" for i in range(25)] for t in range(8)}
    last_op: dict[str, str] = {}
    seen: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(9)

    def storm(thread: int) -> None:
        rng = random.Random(thread)
        try:
            start.wait()
            for _ in range(150):
                user = rng.choice(players[thread])
                op = rng.choice([LOGIN, LOGIN, HEARTBEAT, LOGOUT])
                # Storm leases (300 s) outlive the storm: only the idle players may lapse.
                seen.append(act(op, user, lease=300 if op != LOGOUT else None))
                last_op[user] = op
        except BaseException as exc:  # re-raised below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=storm, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    start.wait()
    for tenth in range(1, 101):
        clock_at(tenth / 10)  # 0.1 s steps to T0 + 10 s, racing with the storm
        value = count()
        seen.append(value)
        if tenth >= 50:
            assert value <= 200, "a lapsed idle lease was counted"
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert min(seen) >= 0 and max(seen) <= 400
    expected = sum(1 for op in last_op.values() if op != LOGOUT)
    assert count() == expected
    counters_flush()
    assert CounterValue.objects.get(counter_id=online().id, subject="", period="").value == expected


@pytest.mark.django_db
def test_beat_sweeps_presence_counters(builtins):
    call_command("setup_schedules")
    task = PeriodicTask.objects.get(task="counters.presence_sweep")
    assert task.interval.every == 15 and task.enabled
