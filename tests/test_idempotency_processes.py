"""Idempotency-Key through a real gunicorn: concurrent retries, a web worker killed with -9 while it held
the first request, and a Redis stopped mid-request and restarted from its AOF. Each retry counts once."""

import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from counters import keyspace
from counters.models import Counter

from .processes import Gunicorn, PrivateRedis, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

PATH = "/api/v1/counter/matches_running/increment"


def worker_pids(master_pid: int) -> list[int]:
    """The gunicorn workers (children of the master), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master_pid:
                pids.append(int(entry.name))
    return pids


def redis_value(port: int, counter_id: int) -> int:
    return int(redis.Redis(port=port).hget(keyspace.value_key(counter_id, "", ""), "v"))


def test_1000_requests_200_keys_each_sent_5_times_from_50_threads(builtins, make_key):
    headers = {"Authorization": f"Bearer {make_key(('write',))}"}
    web = Gunicorn(workers=2)
    try:
        url = web.url + PATH
        start = requests.post(url, json={"value": 1}, headers=headers, timeout=10).json()["current_value"]
        keys = [str(uuid.uuid4()) for _ in range(200)]
        # The five sends of one key are adjacent, so that 50 threads run them at the same time.
        plan = [key for key in keys for _ in range(5)]
        sessions = threading.local()

        def send(key: str) -> tuple[str, int, bytes, bool]:
            session = getattr(sessions, "s", None) or requests.Session()
            sessions.s = session
            reply = session.post(url, json={"value": 1}, headers={**headers, "Idempotency-Key": key}, timeout=30)
            return key, reply.status_code, reply.content, reply.headers.get("Idempotent-Replayed") == "true"

        with ThreadPoolExecutor(max_workers=50) as pool:
            replies = list(pool.map(send, plan))
        end = requests.get(f"{web.url}/api/v1/counter/matches_running", timeout=10).json()["value"]
    finally:
        web.stop()

    assert len(replies) == 1000
    assert {status for _, status, _, _ in replies} == {200}
    assert end == start + 200
    by_key: dict[str, set[bytes]] = defaultdict(set)
    for key, _, content, _ in replies:
        by_key[key].add(content)
    assert all(len(contents) == 1 for contents in by_key.values())
    # Exactly one send per key was applied; the four others were answered from its record.
    assert sum(not replayed for _, _, _, replayed in replies) == 200
    # 200 different values were handed out, one per key: none was applied twice.
    assert len({contents.pop() for contents in by_key.values()}) == 200


def test_a_retry_after_kill_9_of_the_worker_holding_the_first_request_counts_once(builtins, make_key, private_redis):
    headers = {"Authorization": f"Bearer {make_key(('write',))}", "Idempotency-Key": str(uuid.uuid4())}
    # Config is checked against Redis once a minute here, so only the update meets the frozen Redis.
    env = {"TEST_REDIS_URL": private_redis.url, "REDIS_SOCKET_TIMEOUT": "10", "COUNTER_CONFIG_CHECK_SECONDS": "60"}
    web = Gunicorn(workers=1, env=env)
    try:
        url = web.url + PATH
        assert requests.post(url, json={}, headers={"Authorization": headers["Authorization"]}).status_code == 200
        (worker,) = worker_pids(web.process.pid)
        outcome: list = []

        def first_attempt():
            try:
                outcome.append(requests.post(url, json={}, headers=headers, timeout=30))
            except requests.RequestException as exc:
                outcome.append(exc)

        # The worker sends the update to a Redis that does not answer (SIGSTOP) and waits for it.
        private_redis.freeze()
        attempt = threading.Thread(target=first_attempt)
        attempt.start()
        time.sleep(1.0)
        os.kill(worker, signal.SIGKILL)
        attempt.join()
        # Redis reads the update the dead worker sent and applies it: the client never heard so.
        private_redis.thaw()
        assert isinstance(outcome[0], requests.RequestException), outcome
        wait_until(lambda: worker_pids(web.process.pid) not in ([], [worker]), what="a new gunicorn worker")
        wait_until(lambda: requests.get(f"{web.url}/healthz", timeout=2).status_code == 200, what="healthz")
        retry = requests.post(url, json={}, headers=headers, timeout=10)
    finally:
        web.stop()

    counter = Counter.objects.get(name="matches_running")
    assert retry.status_code == 200, retry.content
    assert retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.json()["current_value"] == 2
    assert redis_value(private_redis.port, counter.id) == 2


@pytest.mark.single_redis
def test_a_retry_after_redis_stopped_mid_request_and_restarted_from_its_aof_counts_once(builtins, make_key):
    store = PrivateRedis(appendonly=True)
    headers = {"Authorization": f"Bearer {make_key(('write',))}", "Idempotency-Key": str(uuid.uuid4())}
    env = {
        "TEST_REDIS_URL": store.url,
        "REDIS_SOCKET_TIMEOUT": "1.0",
        "COUNTER_CONFIG_CHECK_SECONDS": "60",
        "REDIS_BREAKER_RESET_SECONDS": "0.5",
    }
    web = Gunicorn(workers=1, env=env)
    try:
        url = web.url + PATH
        # Warm up (hydration, scripts); on this shared machine a first call may itself time out.
        warm = {"Authorization": headers["Authorization"]}
        wait_until(lambda: requests.post(url, json={}, headers=warm, timeout=10).status_code == 200, what="warm-up")
        before = requests.get(f"{web.url}/api/v1/counter/matches_running", timeout=10).json()["value"]
        # A stopped Redis (SIGSTOP) leaves the keyed increment in its socket: the web process times
        # out (5004: outcome unknown), then Redis runs again and applies it; and then Redis is killed.
        store.freeze()
        try:
            unknown = requests.post(url, json={}, headers=headers, timeout=10)
        finally:
            store.thaw()
        counter = Counter.objects.get(name="matches_running")
        wait_until(lambda: redis_value(store.port, counter.id) == before + 1, what="the timed-out update applied")
        store.kill()
        store.start()  # from its AOF (appendfsync always)

        retries: list[requests.Response] = []

        def retried() -> bool:
            retries.append(requests.post(url, json={}, headers=headers, timeout=10))
            return retries[-1].status_code != 503

        wait_until(retried, timeout=20, interval=0.2, what="writes accepted again")
        counter = Counter.objects.get(name="matches_running")
        stored = redis_value(store.port, counter.id)
    finally:
        web.stop()
        store.close()

    assert unknown.status_code == 504 and unknown.json()["error"]["code"] == 5004
    assert "same Idempotency-Key" in unknown.json()["error"]["message"]
    final = retries[-1]
    assert final.status_code == 200, final.content
    assert final.headers.get("Idempotent-Replayed") == "true"
    assert final.json()["current_value"] == before + 1
    # Every attempt before Redis was back was refused unapplied (503); the value counts the update once.
    assert all(r.status_code == 503 for r in retries[:-1])
    assert stored == before + 1
