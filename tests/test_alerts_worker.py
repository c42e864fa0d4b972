"""Deliveries by a real Celery worker process: backoff between retries, and a hanging receiver
that times out in the worker while increments go on unaffected (numbers printed, not asserted)."""

import hashlib
import hmac
import statistics
import subprocess
import sys
import threading
import time

import pytest
import redis
import requests
from django.conf import settings

from alerts.models import Channel, Delivery, DeliveryAttempt, Message
from alerts.services import deliveries_sweep
from counterproject.celery import app as celery_app
from counters import config, selectors
from counters.flush import counters_flush
from counters.models import App, Counter, CounterValue, Threshold
from counters.services import counter_update

from .alerts_receiver import Receiver
from .processes import ROOT, CeleryWorker, Gunicorn, free_port, service_env, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

WORKER_ENV = {
    "ALERTS_HTTP_TIMEOUT_SECONDS": "1",
    "ALERTS_RETRY_BASE_SECONDS": "0.5",
    "ALERTS_MAX_ATTEMPTS": "3",
}


@pytest.fixture(scope="module")
def worker(django_db_setup):
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    process = CeleryWorker(pool="threads", concurrency=4, env=WORKER_ENV)
    try:
        yield process.process
    finally:
        process.stop(timeout=30)
        process.close()
        redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()


def counter_with_thresholds(name: str, threshold_values: list[int]) -> list[Threshold]:
    counter = Counter.objects.create(app=App.objects.get(slug="default"), name=name)
    return [Threshold.objects.create(counter=counter, value=v, level="warning") for v in threshold_values]


def test_a_real_worker_retries_with_growing_backoff_until_the_receiver_accepts(worker, builtins):
    receiver = Receiver(statuses=[500, 502])
    try:
        [threshold] = counter_with_thresholds("raid_wins", [3])
        Channel.objects.create(threshold=threshold, kind="webhook", url=f"{receiver.url}/hook", secret="w-secret")
        config.cache.invalidate()
        counter = selectors.counter_get(app_id=threshold.counter.app_id, name="raid_wins")
        assert counter_update(counter=counter, amount=3).crossed == (threshold.id,)
        counters_flush()
        wait_until(lambda: Delivery.objects.get().status == "sent", timeout=60, what="the third attempt")
    finally:
        receiver.close()

    delivery = Delivery.objects.get()
    attempts = list(delivery.attempt_log.values_list("number", "ok", "status_code"))
    assert attempts == [(1, False, 500), (2, False, 502), (3, True, 200)]
    first, second, third = (r.at for r in receiver.received)
    # Retries wait base * 2**(n-1): 0.5 s, then 1 s (lower bounds only; the worker may be slower).
    assert second - first >= 0.4
    assert third - second >= 0.9
    for request in receiver.received:
        timestamp = request.headers["X-Counter-Timestamp"]
        mac = hmac.new(b"w-secret", timestamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
        assert request.headers["X-Counter-Signature"] == f"sha256={mac}"


def _increment_latencies(web: Gunicorn, key: str, name: str, count: int) -> list[float]:
    latencies = []
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {key}"
        url = f"{web.url}/api/v1/counter/{name}/increment"
        for _ in range(count):
            started = time.perf_counter()
            response = session.post(url, json={}, timeout=30)
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return latencies


def _summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"median {statistics.median(ordered):.2f} ms, p95 {p95:.2f} ms, max {ordered[-1]:.2f} ms"


def test_a_hanging_receiver_does_not_slow_increments(worker, builtins, make_key):
    counter_with_thresholds("calm", [])
    stormy = counter_with_thresholds("stormy", list(range(10, 101, 10)))
    receiver = Receiver(hang=3.0)
    for threshold in stormy:
        Channel.objects.create(threshold=threshold, kind="webhook", url=receiver.url, secret="s")
    key = make_key(("write",))
    web = Gunicorn(workers=2)
    stop = threading.Event()

    def flush_every_200ms():
        # What Beat does in production: the worker flushes, records the events and queues deliveries.
        for _ in range(600):
            if stop.wait(0.2):
                return
            celery_app.send_task("counters.flush")

    flusher = threading.Thread(target=flush_every_200ms, daemon=True)
    flusher.start()
    try:
        _increment_latencies(web, key, "calm", 50)  # warm-up
        quiet = _increment_latencies(web, key, "calm", 300)
        # One increment crosses all ten thresholds: ten webhooks to a receiver that never answers in time.
        _increment_latencies(web, key, "stormy", 100)
        wait_until(lambda: receiver.received, timeout=30, what="the first delivery attempt")
        storm_started = time.time()
        storm = _increment_latencies(web, key, "calm", 300)
        storm_ended = time.time()
        wait_until(
            lambda: Delivery.objects.filter(status="failed").count() == len(stormy),
            timeout=120,
            what="every delivery to time out",
        )
    finally:
        stop.set()
        flusher.join()
        web.stop()
        receiver.close()

    attempts = list(DeliveryAttempt.objects.all())
    assert len(attempts) == len(stormy) * int(WORKER_ENV["ALERTS_MAX_ATTEMPTS"])
    assert all(not a.ok and a.status_code is None and "timed out" in a.error for a in attempts)
    overlapping = [a for a in attempts if a.started_at.timestamp() <= storm_ended]
    print(f"\nincrements, no alert traffic:        {_summary(quiet)}")
    print(f"increments, receiver hanging (3 s):  {_summary(storm)}")
    print(f"delivery attempts (1 s timeout) started while measuring: {len(overlapping)} of {len(attempts)}")
    print(f"storm window {storm_ended - storm_started:.2f} s")


def test_a_broker_outage_neither_stops_the_flush_nor_loses_the_alert(builtins, client, writer, settings):
    [threshold] = counter_with_thresholds("quests", [2])
    Channel.objects.create(threshold=threshold, kind="message")
    Channel.objects.create(threshold=threshold, kind="log")
    for _ in range(3):
        response = client.post("/api/v1/counter/quests/increment", "{}", content_type="application/json", **writer)
        assert response.status_code == 200
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    flushed = subprocess.run(
        [sys.executable, "manage.py", "flush_counters"],
        cwd=ROOT,
        env=service_env(TEST_BROKER_URL=dead_broker),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert flushed.returncode == 0, flushed.stderr
    assert "the sweep will" in flushed.stderr
    assert CounterValue.objects.get(counter__name="quests").value == 3
    assert list(Delivery.objects.values_list("status", "attempts")) == [("pending", 0), ("pending", 0)]

    settings.ALERTS_SWEEP_GRACE_SECONDS = 0
    celery_app.conf.task_always_eager = True
    try:
        assert deliveries_sweep() == 2
    finally:
        celery_app.conf.task_always_eager = False
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}
    assert Message.objects.get().title == "[WARNING] quests reached 2"
