"""Thresholds on the hot path: once per period, re-arm, cooldown, a new period, and the managers' API."""

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests
import time_machine

from counters import config, selectors
from counters.flush import counters_flush
from counters.models import App, Counter, Threshold, ThresholdEvent
from counters.services import counter_update

from .http import post

DAY_1 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def bump(name: str, amount: int = 1):
    config.cache.invalidate()
    counter = selectors.counter_get(app_id=App.objects.get(slug="default").id, name=name)
    return counter_update(counter=counter, amount=amount)


def events_of(threshold: Threshold) -> list[ThresholdEvent]:
    counters_flush()
    return list(ThresholdEvent.objects.filter(threshold=threshold).order_by("triggered_at"))


@pytest.mark.django_db
class TestHotPath:
    def test_a_crossing_fires_once_per_period_by_default(self, make_counter, builtins):
        counter = make_counter()
        threshold = Threshold.objects.create(counter_id=counter.id, value=5, level="warning")
        results = [bump("boss_kills") for _ in range(7)]
        assert [r.crossed for r in results] == [(), (), (), (), (threshold.id,), (), ()]
        assert threshold.id in results[-1].threshold_marks
        bump("boss_kills", -4)
        assert bump("boss_kills", 3).crossed == ()
        [event] = events_of(threshold)
        assert (event.counter_id, event.subject, event.period) == (counter.id, "", "")
        assert event.triggered_at == results[4].threshold_marks[threshold.id]

    def test_a_jump_over_several_levels_fires_each_of_them(self, make_counter, builtins):
        make_counter()
        counter = Counter.objects.get(name="boss_kills")
        low = Threshold.objects.create(counter_id=counter.id, value=10, level="info")
        high = Threshold.objects.create(counter_id=counter.id, value=20, level="critical")
        result = bump("boss_kills", 25)
        assert sorted(result.crossed) == sorted([low.id, high.id])
        assert len(events_of(low)) == len(events_of(high)) == 1

    def test_a_down_threshold_fires_when_the_value_falls_to_it(self, make_counter, builtins):
        counter = make_counter(allow_negative=True)
        threshold = Threshold.objects.create(counter_id=counter.id, value=-3, direction="down")
        assert bump("boss_kills", -2).crossed == ()
        assert bump("boss_kills", -1).crossed == (threshold.id,)
        assert bump("boss_kills", -5).crossed == ()
        assert len(events_of(threshold)) == 1

    def test_rearm_fires_again_after_falling_back_below(self, make_counter, builtins):
        counter = make_counter()
        threshold = Threshold.objects.create(counter_id=counter.id, value=5, rearm=True)
        with time_machine.travel(DAY_1, tick=False) as clock:
            assert bump("boss_kills", 5).crossed == (threshold.id,)
            clock.shift(1)
            assert bump("boss_kills", -1).crossed == ()
            assert threshold.id not in bump("boss_kills", -1).threshold_marks
            clock.shift(1)
            assert bump("boss_kills", 2).crossed == (threshold.id,)
        assert len(events_of(threshold)) == 2

    def test_without_rearm_falling_back_changes_nothing(self, make_counter, builtins):
        counter = make_counter()
        threshold = Threshold.objects.create(counter_id=counter.id, value=5, cooldown_seconds=0)
        with time_machine.travel(DAY_1, tick=False) as clock:
            bump("boss_kills", 5)
            clock.shift(1)
            assert threshold.id in bump("boss_kills", -3).threshold_marks
            assert bump("boss_kills", 3).crossed == ()
        assert len(events_of(threshold)) == 1

    def test_cooldown_suppresses_repeats_until_it_ends(self, make_counter, builtins):
        counter = make_counter()
        threshold = Threshold.objects.create(counter_id=counter.id, value=5, rearm=True, cooldown_seconds=60)
        with time_machine.travel(DAY_1, tick=False) as clock:
            assert bump("boss_kills", 5).crossed == (threshold.id,)
            for _ in range(3):
                clock.shift(10)
                bump("boss_kills", -1)
                assert bump("boss_kills", 1).crossed == ()
            clock.shift(31)
            bump("boss_kills", -1)
            assert bump("boss_kills", 1).crossed == (threshold.id,)
        [first, second] = events_of(threshold)
        assert second.triggered_at - first.triggered_at == timedelta(seconds=61)

    def test_a_new_period_rearms_the_thresholds(self, make_counter, builtins):
        counter = make_counter(period="daily")
        threshold = Threshold.objects.create(counter_id=counter.id, value=3)
        with time_machine.travel(DAY_1, tick=False) as clock:
            assert bump("boss_kills", 3).crossed == (threshold.id,)
            assert bump("boss_kills").crossed == ()
            clock.shift(timedelta(days=1))
            result = bump("boss_kills", 3)
            assert result.old_value == 0 and result.crossed == (threshold.id,)
        assert [e.period for e in events_of(threshold)] == ["2026-03-10", "2026-03-11"]

    def test_a_cooldown_also_spans_the_period_boundary(self, make_counter, builtins):
        counter = make_counter(period="daily")
        threshold = Threshold.objects.create(counter_id=counter.id, value=3, cooldown_seconds=3600)
        with time_machine.travel(datetime(2026, 3, 10, 23, 50, tzinfo=UTC), tick=False) as clock:
            assert bump("boss_kills", 3).crossed == (threshold.id,)
            clock.shift(timedelta(minutes=20))
            assert bump("boss_kills", 3).crossed == ()
            clock.shift(timedelta(hours=1))
            assert bump("boss_kills", 1).crossed == ()
        assert len(events_of(threshold)) == 1

    def test_user_counters_fire_per_player(self, make_counter, builtins):
        counter = make_counter(scope="user")
        threshold = Threshold.objects.create(counter_id=counter.id, value=2)
        config.cache.invalidate()
        cfg = selectors.counter_get(app_id=counter.app_id, name="boss_kills")
        for player in ("p1", "p2", "p1", "p2", "p1"):
            counter_update(counter=cfg, amount=1, subject=player)
        assert sorted(e.subject for e in events_of(threshold)) == ["p1", "p2"]

    def test_disabled_thresholds_never_fire(self, make_counter, builtins):
        counter = make_counter()
        threshold = Threshold.objects.create(counter_id=counter.id, value=1, enabled=False)
        assert bump("boss_kills", 5).crossed == ()
        assert events_of(threshold) == []


@pytest.mark.django_db
class TestManagersApi:
    url = "/api/v1/counter/boss_kills/thresholds"

    @pytest.fixture
    def manager(self, builtins, make_key, make_counter):
        make_counter()
        return {"HTTP_AUTHORIZATION": f"Bearer {make_key(('counter_manage',))}"}

    def test_create_list_change_and_delete(self, client, manager):
        body = {"value": 100, "level": "critical", "rearm": True, "cooldown_seconds": 30}
        created = post(client, self.url, body, manager)
        assert created.status_code == 201
        threshold = created.json()["threshold"]
        assert threshold == {**body, "id": threshold["id"], "direction": "up", "enabled": True}
        post(client, self.url, {"value": 10}, manager)
        listed = client.get(self.url, **manager).json()["thresholds"]
        assert [t["value"] for t in listed] == [10, 100]

        changed = post(client, f"{self.url}/{threshold['id']}", {"enabled": False}, manager, method="patch")
        assert changed.json()["threshold"]["enabled"] is False
        assert changed.json()["threshold"]["value"] == 100
        assert bump("boss_kills", 150).crossed == (listed[0]["id"],)

        assert client.delete(f"{self.url}/{threshold['id']}", **manager).json() == {"success": True}
        assert [t["value"] for t in client.get(self.url, **manager).json()["thresholds"]] == [10]

    def test_a_new_threshold_is_live_at_once(self, client, manager):
        bump("boss_kills", 1)
        threshold_id = post(client, self.url, {"value": 3}, manager).json()["threshold"]["id"]
        assert bump("boss_kills", 2).crossed == (threshold_id,)

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"value": "10"},
            {"value": 1.5},
            {"value": 2**53},
            {"value": 1, "direction": "sideways"},
            {"value": 1, "level": "panic"},
            {"value": 1, "cooldown_seconds": -1},
            {"value": 1, "rearm": "yes"},
        ],
    )
    def test_bad_input_is_refused_with_4001_and_changes_nothing(self, client, manager, body):
        response = post(client, self.url, body, manager)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == 4001
        assert not Threshold.objects.exists()

    def test_the_number_of_thresholds_is_bounded(self, client, manager, settings):
        settings.ALERTS_MAX_THRESHOLDS_PER_COUNTER = 2
        assert post(client, self.url, {"value": 1}, manager).status_code == 201
        assert post(client, self.url, {"value": 2}, manager).status_code == 201
        refused = post(client, self.url, {"value": 3}, manager)
        assert refused.status_code == 400 and "already has 2" in refused.json()["error"]["message"]

    def test_unknown_threshold_is_4004(self, client, manager):
        response = client.delete(f"{self.url}/999999", **manager)
        assert response.status_code == 404 and response.json()["error"]["code"] == 4004

    def test_only_managers_of_the_counters_app_may_edit(self, client, manager, make_key):
        writer = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'data_view'))}"}
        assert post(client, self.url, {"value": 1}, writer).status_code == 403
        assert client.get(self.url, **writer).status_code == 403
        assert client.get(self.url).status_code == 401
        stranger = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('counter_manage',), app='other')}"}
        response = post(client, self.url, {"value": 1}, stranger)
        assert response.status_code == 404 and response.json()["error"]["code"] == 4004
        threshold = Threshold.objects.create(counter=Counter.objects.get(name="boss_kills"), value=5)
        other_app = App.objects.get(slug="other")
        Counter.objects.create(app=other_app, name="boss_kills")
        assert client.delete(f"{self.url}/{threshold.id}", **stranger).status_code == 404
        assert Threshold.objects.filter(id=threshold.id).exists()
        assert not Threshold.objects.exclude(id=threshold.id).exists()


@pytest.mark.django_db(transaction=True)
def test_1000_concurrent_increments_crossing_two_thresholds_fire_exactly_one_event_each(
    make_counter, live_server, builtins, make_key
):
    counter = make_counter()
    low = Threshold.objects.create(counter_id=counter.id, value=300, level="warning")
    high = Threshold.objects.create(counter_id=counter.id, value=700, level="critical")
    key = make_key(("write",))
    url = f"{live_server.url}/api/v1/counter/boss_kills/increment"

    def worker(_: int) -> list[int]:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {key}"
            return [session.post(url, json={}, timeout=30).status_code for _ in range(40)]

    # 25 clients at once: more would overflow the live test server's listen backlog, not the counter.
    with ThreadPoolExecutor(max_workers=25) as pool:
        codes = [code for codes in pool.map(worker, range(25)) for code in codes]
    assert codes == [200] * 1000
    counters_flush()
    assert ThresholdEvent.objects.filter(threshold=low).count() == 1
    assert ThresholdEvent.objects.filter(threshold=high).count() == 1
    assert ThresholdEvent.objects.count() == 2


@pytest.mark.django_db
def test_a_wiped_redis_does_not_record_a_second_event_in_the_period(make_counter, builtins, store):
    counter = make_counter()
    once = Threshold.objects.create(counter_id=counter.id, value=5)
    rearming = Threshold.objects.create(counter_id=counter.id, value=6, rearm=True)
    bump("boss_kills", 6)
    counters_flush()
    store.flushdb()
    bump("boss_kills", -6)  # rehydrated at 6 from PostgreSQL, marks gone
    assert bump("boss_kills", 6).crossed == (once.id, rearming.id)
    assert len(events_of(once)) == 1
    assert len(events_of(rearming)) == 2


@pytest.mark.django_db
def test_a_wiped_redis_does_not_break_the_cooldown(make_counter, builtins, store):
    counter = make_counter()
    threshold = Threshold.objects.create(counter_id=counter.id, value=5, rearm=True, cooldown_seconds=60)
    with time_machine.travel(DAY_1, tick=False) as clock:
        bump("boss_kills", 5)
        counters_flush()
        store.flushdb()
        clock.shift(10)
        bump("boss_kills", -1)
        bump("boss_kills", 1)  # Redis lost the last firing: only PostgreSQL still knows it
        clock.shift(60)
        bump("boss_kills", -1)
        bump("boss_kills", 1)
    [first, second] = events_of(threshold)
    assert second.triggered_at - first.triggered_at == timedelta(seconds=70)


@pytest.mark.django_db
def test_writes_through_postgresql_follow_the_same_threshold_rules(make_counter, builtins, settings):
    from counters.redis_store import breaker

    settings.COUNTER_REDIS_DOWN_WRITES = "write_through"
    counter = make_counter()
    once = Threshold.objects.create(counter_id=counter.id, value=3)
    cooling = Threshold.objects.create(counter_id=counter.id, value=4, rearm=True, cooldown_seconds=60)
    config.cache.get()
    with time_machine.travel(DAY_1, tick=False) as clock:
        for _ in range(settings.REDIS_BREAKER_THRESHOLD):
            breaker.record_failure()
        assert breaker.is_open
        assert sorted(bump_cached("boss_kills", 4).crossed) == sorted([once.id, cooling.id])
        clock.shift(10)
        bump_cached("boss_kills", -2)
        assert bump_cached("boss_kills", 2).crossed == ()
        clock.shift(60)
        bump_cached("boss_kills", -2)
        assert bump_cached("boss_kills", 2).crossed == (cooling.id,)
    assert ThresholdEvent.objects.filter(threshold=once).count() == 1
    assert ThresholdEvent.objects.filter(threshold=cooling).count() == 2


def bump_cached(name: str, amount: int):
    """An update without reloading the config (which would need the store that is down)."""
    counter = selectors.counter_get(app_id=App.objects.get(slug="default").id, name=name)
    return counter_update(counter=counter, amount=amount)
