"""Redis dies mid-traffic (kill -9 of a private redis-server): read-only from PostgreSQL, 503s that
wait for no timeout, write-through mode, and recovery with an empty Redis or with its AOF data — all
through gunicorn. What is asserted is counted (statuses, the server's own log), never timed: the
latencies of these outages are printed by bench/outage.py."""

import threading
import time

import pytest
import redis
import requests

from counters import keyspace
from counters.models import Counter, CounterValue, UniqueMember, WrittenThroughValue

from .processes import Gunicorn, PrivateRedis, wait_until
from .test_core_durability import flush_in_subprocess, hammer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("daily_far_from_midnight")]

ACCESS_FORMAT = "ACCESS %(s)s %(D)s %(m)s %(U)s"
# What each web process logs when its breaker opens and closes (counters/redis_store.py).
OPENED, CLOSED = "circuit opened", "circuit closed"
# Replies to requests sent after a failure that a test waits for before it looks at them.
OUTAGE_REPLIES = 20


class Traffic:
    """Threads posting increments until stopped; every reply is recorded with its latency."""

    def __init__(self, url: str, key: str, *, threads: int = 4, body: dict | None = None) -> None:
        self.url, self.key, self.body = url, key, body or {}
        self.stop = threading.Event()
        self.replies: list[tuple[float, int, float]] = []  # (sent at, status, seconds)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {self.key}"
            deadline = time.monotonic() + 300  # a cap for a test that dies; it stops them itself
            while not self.stop.is_set() and time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    status = session.post(self.url, json=self.body, timeout=10).status_code
                except requests.RequestException:
                    status = 0
                with self._lock:
                    self.replies.append((sent, status, time.monotonic() - sent))
                time.sleep(0.002)

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def count(self, status: int) -> int:
        return sum(1 for _, s, _ in self.replies if s == status)

    def sent_after(self, moment: float) -> list[tuple[float, int, float]]:
        with self._lock:
            return [r for r in self.replies if r[0] > moment]


def run_through(traffic: Traffic, failure, replies: int = OUTAGE_REPLIES) -> float:
    """Inflict ``failure`` (kill, freeze: both return once it has happened) on Redis under the traffic,
    stop the traffic once ``replies`` requests sent after it are answered; returns when it happened."""
    failure()
    happened_at = time.monotonic()
    wait_until(lambda: len(traffic.sent_after(happened_at)) >= replies, timeout=60, what="replies during the outage")
    traffic.finish()
    return happened_at


BREAKER_RESET_SECONDS = 0.5


# A Redis with an AOF fsyncs every write: on a loaded machine a reply can outlast the default socket
# timeout (a 504). These tests kill Redis (refused at once), so a patient timeout costs them nothing.
PATIENT = {"REDIS_SOCKET_TIMEOUT": "10"}


def web_on(store: PrivateRedis, *, access_log: bool = False, **env: str) -> Gunicorn:
    env = {"TEST_REDIS_URL": store.url, "REDIS_BREAKER_RESET_SECONDS": str(BREAKER_RESET_SECONDS), **PATIENT, **env}
    if not access_log:
        return Gunicorn(env=env)
    return Gunicorn(env={**env, "GUNICORN_ACCESSLOG": "-"}, extra_args=["--access-logformat", ACCESS_FORMAT])


def server_count(web: Gunicorn, status: int, path: str) -> int:
    """Requests to ``path`` that gunicorn's own access log says were answered with ``status``."""
    return sum(1 for line in web.output().splitlines() if line.split()[:2] == ["ACCESS", str(status)] and path in line)


def get(web: Gunicorn, path: str) -> requests.Response:
    return requests.get(f"{web.url}/api/v1/{path}", timeout=10)


def wait_for_writes(web: Gunicorn, headers: dict, name: str) -> int:
    """Post increments until one is accepted again (breaker closed); returns that value."""
    accepted: list[int] = []

    def accepted_once() -> bool:
        reply = requests.post(f"{web.url}/api/v1/counter/{name}/increment", json={}, headers=headers, timeout=10)
        if reply.status_code == 200:
            accepted.append(reply.json()["current_value"])
        return bool(accepted)

    wait_until(accepted_once, timeout=20, interval=0.2, what="writes accepted after Redis came back")

    # Each gunicorn worker has its own breaker: the others close at their next probe (a read is one).
    def every_breaker_closed() -> bool:
        get(web, f"counter/{name}")
        return web.output().count(CLOSED) >= web.output().count(OPENED)

    wait_until(every_breaker_closed, timeout=30, interval=0.1, what="every worker's breaker to close")
    return accepted[0]


def outage_replies(traffic: Traffic, killed_at: float) -> list[tuple[float, int, float]]:
    # Only requests sent after the failure: those already on the wire have an ambiguous fate by nature.
    return traffic.sent_after(killed_at)


@pytest.mark.single_redis
def test_redis_down_read_only_from_postgresql_then_empty_redis_rehydrates(builtins, make_key):
    key = make_key(("write",))
    headers = {"Authorization": f"Bearer {key}"}
    store = PrivateRedis()
    web = web_on(store, access_log=True)
    try:
        inc = f"{web.url}/api/v1/counter/matches_running/increment"
        traffic = Traffic(inc, key)
        wait_until(lambda: traffic.count(200) >= 50, what="traffic before the kill")
        assert flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).returncode == 0
        flushed = CounterValue.objects.get(counter__name="matches_running").value
        killed_at = run_through(traffic, store.kill)

        during = outage_replies(traffic, killed_at)
        assert len(during) >= OUTAGE_REPLIES and {s for _, s, _ in during} == {503}
        assert server_count(web, 503, "/api/v1/counter/matches_running/increment") >= len(during)
        assert OPENED in web.output()
        refused = requests.post(inc, json={}, headers=headers, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == 5003 and "read-only" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) > 0

        # Reads come from PostgreSQL (what was flushed) and say so.
        reply = get(web, "counter/matches_running")
        assert reply.status_code == 200 and reply.headers["X-Counter-Source"] == "database"
        body = reply.json()
        assert body == {"name": "matches_running", "value": flushed, "last_updated": body["last_updated"]} | {
            "degraded": True
        }
        assert body["last_updated"] is not None
        batch = get(web, "counters?names=matches_running,daily_active_users")
        assert batch.status_code == 200 and batch.headers["X-Counter-Source"] == "database"
        assert batch.json() == {
            "counters": [{"name": "matches_running", "value": flushed}, {"name": "daily_active_users", "value": 0}],
            "degraded": True,
        }
        health = requests.get(f"{web.url}/healthz", timeout=10).json()
        assert health["status"] == "degraded" and health["redis"] == "down"

        # Redis comes back empty (no AOF): values are PostgreSQL's, then writes are exact again.
        store.start()
        assert wait_for_writes(web, headers, "matches_running") == flushed + 1
        for _ in range(9):
            assert requests.post(inc, json={}, headers=headers, timeout=10).status_code == 200
        reply = get(web, "counter/matches_running")
        assert reply.json()["value"] == flushed + 10 and "X-Counter-Source" not in reply.headers
        assert "degraded" not in reply.json()
        assert flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).returncode == 0
        assert CounterValue.objects.get(counter__name="matches_running").value == flushed + 10
    finally:
        web.stop()
        store.close()


@pytest.mark.single_redis
def test_redis_back_with_its_data_loses_no_acknowledged_increment_and_doubles_none(builtins, make_key):
    key = make_key(("write",))
    headers = {"Authorization": f"Bearer {key}"}
    store = PrivateRedis(appendonly=True)
    threads = 4
    web = web_on(store)
    try:
        inc = f"{web.url}/api/v1/counter/total_games_played/increment"
        traffic = Traffic(inc, key, threads=threads)
        wait_until(lambda: traffic.count(200) >= 40, what="traffic before a flush")
        assert flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).returncode == 0
        wait_until(lambda: traffic.count(200) >= 80, what="traffic after the flush")
        killed_at = run_through(traffic, store.kill)
        acknowledged = traffic.count(200)
        flushed = CounterValue.objects.get(counter__name="total_games_played").value
        assert flushed < acknowledged  # some acknowledged increments exist only in Redis's AOF
        assert {s for _, s, _ in outage_replies(traffic, killed_at)} == {503}
        assert get(web, "counter/total_games_played").json()["value"] == flushed

        store.start()
        # Every acknowledged increment is back. A request on the wire at the kill may have been
        # applied without its reply arriving (at most one per client thread).
        after = wait_for_writes(web, headers, "total_games_played") - 1
        assert acknowledged <= after <= acknowledged + threads
        for _ in range(2):  # the second flush finds nothing: nothing is applied twice
            assert flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).returncode == 0
            assert CounterValue.objects.get(counter__name="total_games_played").value == after + 1
        assert get(web, "counter/total_games_played").json()["value"] == after + 1
    finally:
        web.stop()
        store.close()


@pytest.mark.single_redis
def test_write_through_mode_lands_in_postgresql_exactly_and_redis_agrees_after_recovery(builtins, make_key):
    key = make_key(("write",))
    headers = {"Authorization": f"Bearer {key}"}
    store = PrivateRedis(appendonly=True)
    threads = 4
    web = web_on(store, COUNTER_REDIS_DOWN_WRITES="write_through")
    dau = f"{web.url}/api/v1/counter/daily_active_users/increment"
    games = f"{web.url}/api/v1/counter/total_games_played/increment"
    try:
        for user in ("a", "b"):
            assert requests.post(dau, json={"user_id": user}, headers=headers, timeout=10).status_code == 200
        assert flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).returncode == 0
        # Acknowledged before the outage but only in Redis (its AOF): pending for the flusher.
        assert requests.post(dau, json={"user_id": "c"}, headers=headers, timeout=10).status_code == 200
        for _ in range(10):
            assert requests.post(games, json={}, headers=headers, timeout=10).status_code == 200
        traffic = Traffic(f"{web.url}/api/v1/counter/matches_running/increment", key, threads=threads)
        wait_until(lambda: traffic.count(200) >= 40, what="traffic before the kill")

        killed_at = run_through(traffic, store.kill)
        during = outage_replies(traffic, killed_at)
        assert len(during) >= OUTAGE_REPLIES and {s for _, s, _ in during} == {200}

        # 200 concurrent increments during the outage land in PostgreSQL exactly.
        assert hammer(games, key, total=200, threads=10) == [200] * 200
        assert CounterValue.objects.get(counter__name="total_games_played").value == 200
        reply = get(web, "counter/total_games_played")
        assert reply.json()["degraded"] is True and reply.json()["value"] == 200
        # Unique members: "a" is in PostgreSQL already, "d" is new and counted once.
        assert requests.post(dau, json={"user_id": "a"}, headers=headers, timeout=10).json()["current_value"] == 2
        assert requests.post(dau, json={"user_id": "d"}, headers=headers, timeout=10).json()["current_value"] == 3
        assert requests.post(dau, json={"user_id": "d"}, headers=headers, timeout=10).json()["current_value"] == 3
        assert WrittenThroughValue.objects.count() == 3

        # Redis returns with its old data, stale for the values written through; the flusher's
        # run corrects them (a web process that saw the outage also does before it writes again).
        store.start()
        assert "reconciled 3 written-through values" in flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).stdout
        assert WrittenThroughValue.objects.count() == 0
        hot = redis.Redis.from_url(store.url)
        for name, value in [("total_games_played", 210), ("daily_active_users", 4)]:
            counter = Counter.objects.get(name=name)
            period = CounterValue.objects.get(counter=counter).period
            assert int(hot.hget(keyspace.value_key(counter.id, period, ""), "v")) == value
            assert CounterValue.objects.get(counter=counter).value == value
        acknowledged = traffic.count(200)
        online = Counter.objects.get(name="matches_running")
        in_redis = int(hot.hget(keyspace.value_key(online.id, "", ""), "v"))
        # Every acknowledged increment, once; a request on the wire at the kill may have been
        # applied without its reply arriving (at most one per client thread).
        assert acknowledged <= in_redis <= acknowledged + threads
        assert CounterValue.objects.get(counter=online).value == in_redis

        assert wait_for_writes(web, headers, "total_games_played") == 211
        assert get(web, "counter/total_games_played").json()["value"] == 211
        # Members written through reached Redis: nobody is counted twice.
        for user in ("a", "b", "c", "d"):
            assert requests.post(dau, json={"user_id": user}, headers=headers, timeout=10).json()["current_value"] == 4
        assert requests.post(dau, json={"user_id": "e"}, headers=headers, timeout=10).json()["current_value"] == 5
        assert flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).returncode == 0
        assert CounterValue.objects.get(counter__name="total_games_played").value == 211
        assert CounterValue.objects.get(counter__name="daily_active_users").value == 5
        assert sorted(UniqueMember.objects.values_list("member", flat=True)) == ["a", "b", "c", "d", "e"]
    finally:
        web.stop()
        store.close()


@pytest.mark.single_redis
def test_a_frozen_redis_costs_a_timeout_only_until_the_breaker_opens(builtins, make_key):
    """A Redis that hangs (SIGSTOP) instead of refusing: without the breaker every write would wait
    for the socket timeout. With it, only the requests in flight before it opens do. A request that
    waited for the timeout is a 504 (its command reached Redis); one refused by the open breaker is
    a 503: counted, not timed."""
    key = make_key(("write",))
    store = PrivateRedis()
    timeout, threads, threshold = 0.3, 4, 3
    # One worker, so one breaker; no probe during the freeze (reset 60 s).
    env = {"REDIS_SOCKET_TIMEOUT": str(timeout), "REDIS_CONNECT_TIMEOUT": str(timeout)}
    env |= {"TEST_REDIS_URL": store.url, "REDIS_BREAKER_RESET_SECONDS": "60", "REDIS_BREAKER_THRESHOLD": str(threshold)}
    env |= {"GUNICORN_ACCESSLOG": "-", "COUNTER_CONFIG_CHECK_SECONDS": "60"}
    web = Gunicorn(workers=1, env=env, extra_args=["--access-logformat", ACCESS_FORMAT])
    path = "/api/v1/counter/matches_running/increment"
    try:
        traffic = Traffic(f"{web.url}{path}", key, threads=threads)
        wait_until(lambda: traffic.count(200) >= 50, what="traffic before the freeze")
        store.freeze()
        frozen_at = time.monotonic()
        wait_until(lambda: OPENED in web.output(), timeout=60, what="the breaker to open")
        opened_at = time.monotonic()
        run_through(traffic, lambda: None)  # OUTAGE_REPLIES more replies to requests sent once it was open
        acknowledged = traffic.count(200)
        after = traffic.sent_after(frozen_at)
        store.thaw()

        assert {s for _, s, _ in after} <= {503, 504}
        # Once open, no request waited for the socket timeout: every one sent since is a 503.
        assert {s for _, s, _ in traffic.sent_after(opened_at)} == {503}
        # Before it opened: the threshold's failures, plus the requests already waiting with them
        # (at most one per client thread) — the server's own log agrees.
        timed_out = traffic.count(504)
        assert 1 <= timed_out <= threshold + threads
        assert server_count(web, 504, path) == timed_out
        assert web.output().count(OPENED) == 1

        # The writes that timed out said "may have been applied" (504): the thawed Redis ran them.
        counter = Counter.objects.get(name="matches_running")
        hot = redis.Redis.from_url(store.url)
        wait_until(lambda: hot.ping(), what="the thawed redis-server")
        in_redis = int(hot.hget(keyspace.value_key(counter.id, "", ""), "v"))
        assert acknowledged <= in_redis <= acknowledged + timed_out + threads
    finally:
        store.thaw()
        web.stop()
        store.close()
