"""Exactness under concurrency, restarts, a wiped Redis and crashes in the flusher (real processes)."""

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from django.conf import settings

from alerts.models import Channel, Delivery
from alerts.services import deliveries_sweep
from counters import keyspace
from counters.flush import counters_flush
from counters.models import Counter, CounterValue, Threshold, ThresholdEvent, UniqueMember

from .processes import ROOT, Gunicorn, PrivateRedis, service_env, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("daily_far_from_midnight")]


def flush_in_subprocess(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "flush_counters"],
        cwd=ROOT,
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def hammer(url: str, key: str, *, total: int, threads: int, body: dict | None = None) -> list[int]:
    """POST ``total`` requests from ``threads`` threads at once; returns the status codes."""
    per_thread = total // threads

    def worker(_: int) -> list[int]:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {key}"
            return [session.post(url, json=body or {}, timeout=30).status_code for _ in range(per_thread)]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [code for codes in pool.map(worker, range(threads)) for code in codes]


def test_1000_concurrent_increments_end_exactly_right(builtins, make_key, store):
    key = make_key(("write",))
    web = Gunicorn()
    try:
        codes = hammer(f"{web.url}/api/v1/counter/matches_running/increment", key, total=1000, threads=50)
        assert codes == [200] * 1000
        assert requests.get(f"{web.url}/api/v1/counter/matches_running").json()["value"] == 1000
    finally:
        web.stop()
    counter = Counter.objects.get(name="matches_running")
    assert int(store.hget(keyspace.value_key(counter.id, "", ""), "v")) == 1000
    counters_flush()
    assert CounterValue.objects.get(counter=counter).value == 1000


def test_concurrent_logins_and_logouts_never_go_below_zero(builtins, make_key):
    key = make_key(("write",))
    web = Gunicorn()
    try:
        base = f"{web.url}/api/v1/counter/matches_running"
        hammer(f"{base}/increment", key, total=300, threads=30)
        codes = hammer(f"{base}/decrement", key, total=400, threads=40)
        assert codes.count(200) == 300 and codes.count(409) == 100
        assert requests.get(base).json()["value"] == 0
    finally:
        web.stop()
    counters_flush()
    assert CounterValue.objects.get(counter__name="matches_running").value == 0


@pytest.mark.single_redis
def test_values_survive_a_restart_of_the_service_and_reach_postgresql(builtins, make_key):
    """gunicorn stopped (SIGTERM) and Redis killed -9, both started again: every acknowledged value is
    back, from Redis's AOF for what was not flushed yet, and PostgreSQL agrees after a flush."""
    key = make_key(("write",))
    headers = {"Authorization": f"Bearer {key}"}
    store = PrivateRedis(appendonly=True)
    # Every write waits for the AOF's fsync: on a loaded machine that can outlast the default socket
    # timeout (a 504, "may have been applied"), which is not what this test is about.
    env = {"TEST_REDIS_URL": store.url, "REDIS_SOCKET_TIMEOUT": "10"}
    web = Gunicorn(env=env)
    try:
        games = f"{web.url}/api/v1/counter/total_games_played/increment"
        assert [requests.post(games, json={}, headers=headers).status_code for _ in range(25)] == [200] * 25
        assert flush_in_subprocess(**env).returncode == 0
        assert requests.post(games, json={"value": 5}, headers=headers).status_code == 200  # only in Redis
        online = f"{web.url}/api/v1/counter/matches_running/increment"
        assert requests.post(online, json={"value": 7}, headers=headers).status_code == 200
    finally:
        assert web.stop() == 0
    store.kill()
    assert CounterValue.objects.get(counter__name="total_games_played").value == 25
    assert not CounterValue.objects.filter(counter__name="matches_running").exists()

    store.start()
    web = Gunicorn(env=env)
    try:
        assert requests.get(f"{web.url}/api/v1/counter/total_games_played").json()["value"] == 30
        assert requests.get(f"{web.url}/api/v1/counter/matches_running").json()["value"] == 7
        assert flush_in_subprocess(**env).returncode == 0
        assert requests.get(f"{web.url}/api/v1/counter/total_games_played").json()["value"] == 30
    finally:
        web.stop()
        store.close()
    assert CounterValue.objects.get(counter__name="total_games_played").value == 30
    assert CounterValue.objects.get(counter__name="matches_running").value == 7


def test_a_wiped_redis_rehydrates_from_postgresql(builtins, make_key, private_redis):
    key = make_key(("write",))
    headers = {"Authorization": f"Bearer {key}"}
    web = Gunicorn(env={"TEST_REDIS_URL": private_redis.url})
    try:
        inc = f"{web.url}/api/v1/counter/matches_running/increment"
        dau = f"{web.url}/api/v1/counter/daily_active_users/increment"
        for _ in range(40):
            assert requests.post(inc, json={}, headers=headers).status_code == 200
        for user in ("a", "b", "c"):
            requests.post(dau, json={"user_id": user}, headers=headers)
        assert flush_in_subprocess(TEST_REDIS_URL=private_redis.url).returncode == 0
        # Acknowledged but not yet flushed: what a Redis data loss can take (see docs).
        requests.post(inc, json={"value": 5}, headers=headers)

        redis.Redis.from_url(private_redis.url).flushall()

        assert requests.get(f"{web.url}/api/v1/counter/matches_running").json()["value"] == 40
        assert requests.get(f"{web.url}/api/v1/counter/daily_active_users").json()["value"] == 3
        # Members came back from PostgreSQL: "a" is not counted twice, "d" is new.
        assert requests.post(dau, json={"user_id": "a"}, headers=headers).json()["current_value"] == 3
        assert requests.post(dau, json={"user_id": "d"}, headers=headers).json()["current_value"] == 4
        assert requests.post(inc, json={}, headers=headers).json()["current_value"] == 41
        assert flush_in_subprocess(TEST_REDIS_URL=private_redis.url).returncode == 0
    finally:
        web.stop()
    assert CounterValue.objects.get(counter__name="matches_running").value == 41
    assert CounterValue.objects.get(counter__name="daily_active_users").value == 4
    assert sorted(UniqueMember.objects.values_list("member", flat=True)) == ["a", "b", "c", "d"]


# Every crash point of the flusher (counters/flush.py, _crash_point): what the killed flush left
# in PostgreSQL, whether the first batch is still in Redis, whether its threshold event was recorded.
CRASHES = {
    "after_move": (None, True, False),
    "before_commit": (None, True, False),
    "after_commit": (12, True, True),
    "after_drop": (12, False, True),
}


@pytest.mark.parametrize("crash_point", list(CRASHES))
def test_a_flusher_killed_mid_flush_applies_each_delta_exactly_once(
    client, writer, store, settings, plain_flushed_first, crash_point
):
    online = Counter.objects.get(name="matches_running")
    threshold = Threshold.objects.create(counter=online, value=10)
    Channel.objects.create(threshold=threshold, kind="message")
    for _ in range(12):
        client.post("/api/v1/counter/matches_running/increment", "{}", content_type="application/json", **writer)
    client.post(
        "/api/v1/counter/daily_active_users/increment", '{"user_id": "u1"}', content_type="application/json", **writer
    )

    crashed = flush_in_subprocess(COUNTER_TEST_CRASH_POINT=crash_point, COUNTER_FLUSH_LOCK_SECONDS="1")
    assert crashed.returncode == -signal.SIGKILL
    applied, batch_left, event_recorded = CRASHES[crash_point]
    assert CounterValue.objects.filter(counter=online).values_list("value", flat=True).first() == applied
    assert len(store.smembers(keyspace.batches_key(online.id))) == int(batch_left)
    assert ThresholdEvent.objects.filter(threshold=threshold).exists() is event_recorded
    assert not Delivery.objects.exists()  # the alerts were never handed over

    # More traffic arrives before the flusher comes back.
    client.post("/api/v1/counter/matches_running/increment", '{"value": 3}', content_type="application/json", **writer)
    # The dead flusher's lock expires by itself; a restarted flusher then takes over.
    wait_until(lambda: "flushed" in flush_in_subprocess().stdout, timeout=30, what="a flush after the lock expired")
    assert CounterValue.objects.get(counter=online).value == 15
    assert CounterValue.objects.get(counter__name="daily_active_users").value == 1
    assert store.smembers(keyspace.batches_key(online.id)) == set()
    assert client.get("/api/v1/counter/matches_running").json()["value"] == 15
    # One event, one delivery: handed over by the restarted flush, or (after_drop) by the sweep.
    settings.ALERTS_SWEEP_GRACE_SECONDS = 0
    deliveries_sweep()
    assert ThresholdEvent.objects.filter(threshold=threshold).count() == 1
    assert Delivery.objects.count() == 1


def test_config_and_threshold_changes_reach_other_processes_at_the_production_interval(builtins, make_key):
    key = make_key(("write",))
    headers = {"Authorization": f"Bearer {key}"}
    # The tests' own processes check the config generation on every request; gunicorn here checks
    # it once a second, as in production (counterproject/settings.py).
    web = Gunicorn(workers=1, env={"COUNTER_CONFIG_CHECK_SECONDS": "1"})
    try:
        url = f"{web.url}/api/v1/counter/total_games_played/increment"
        function = f"{web.url}/api/v1/functions/increaseCounter"
        body = {"appId": "default", "counterType": "daily", "counterId": "total_games_played"}
        assert requests.post(url, json={"value": 5}, headers=headers).status_code == 200
        assert requests.post(function, json=body, headers=headers).json()["data"]["thresholds"] == []
        counter = Counter.objects.get(name="total_games_played")
        Threshold.objects.create(counter=counter, value=100)  # the receiver bumps the config generation

        def listed() -> bool:
            data = requests.post(function, json=body, headers=headers).json()["data"]
            return [t["value"] for t in data["thresholds"]] == [100]

        wait_until(listed, timeout=30, what="the new threshold to apply in gunicorn")
        counter.max_value = 1000
        counter.save()

        def refused() -> bool:
            return requests.post(url, json={"value": 2000}, headers=headers).status_code == 409

        wait_until(refused, timeout=30, what="the new max_value to apply in gunicorn")
        value = requests.get(f"{web.url}/api/v1/counter/total_games_played").json()["value"]
        assert requests.post(url, json={"value": 1000}, headers=headers).status_code == 409
        assert requests.get(f"{web.url}/api/v1/counter/total_games_played").json()["value"] == value
    finally:
        web.stop()


def test_settings_point_tests_at_their_own_redis_database():
    assert settings.REDIS_URL != "redis://127.0.0.1:6379/0"
