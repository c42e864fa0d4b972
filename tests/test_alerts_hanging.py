"""A webhook receiver that hangs does not slow increments: proved by order of events, not by timing.

The receiver holds every delivery (no answer) until the test releases it, and the worker's HTTP
timeout is longer than the test: while every delivery thread of the worker is stuck on it, hundreds
of increments and a new threshold crossing are answered. Had an increment waited on a delivery, it
would still be waiting. Latencies with a hanging receiver are for bench scripts, not for tests.
"""

import pytest
import redis
import requests
from django.conf import settings

from alerts.models import Channel, Delivery
from counters.flush import counters_flush
from counters.models import App, Counter, Threshold

from .alerts_receiver import Receiver
from .processes import CeleryWorker, Gunicorn, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

DELIVERY_THREADS = 4
WORKER_ENV = {"ALERTS_HTTP_TIMEOUT_SECONDS": "600", "ALERTS_MAX_ATTEMPTS": "1"}


def test_increments_are_answered_while_every_delivery_hangs(builtins, make_key):
    app = App.objects.get(slug="default")
    Counter.objects.create(app=app, name="calm")
    stormy = Counter.objects.create(app=app, name="stormy")
    receiver = Receiver(held=True)
    for value in range(10, 101, 10):
        threshold = Threshold.objects.create(counter=stormy, value=value, level="warning")
        Channel.objects.create(threshold=threshold, kind="webhook", url=receiver.url, secret="s")
    key = make_key(("write",))
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    worker = CeleryWorker(pool="threads", concurrency=DELIVERY_THREADS, env=WORKER_ENV)
    web = Gunicorn(workers=2)
    try:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {key}"

            def increment(name: str, value: int = 1) -> int:
                return session.post(f"{web.url}/api/v1/counter/{name}/increment", json={"value": value}, timeout=60)

            # One increment crosses all ten thresholds: ten webhooks to a receiver that holds them.
            assert increment("stormy", 100).status_code == 200
            counters_flush()  # records the events and queues the deliveries, as Beat's flush does
            wait_until(
                lambda: len(receiver.received) == DELIVERY_THREADS, timeout=60, what="every delivery thread to hang"
            )

            replies = [increment("calm").status_code for _ in range(200)]
            replies.append(increment("stormy", 5).status_code)  # above every threshold already: nothing new
            assert replies == [200] * 201
            assert (len(receiver.received), receiver.answered) == (DELIVERY_THREADS, 0)  # still all stuck
            assert session.get(f"{web.url}/api/v1/counter/calm").json()["value"] == 200

        receiver.release()
        wait_until(
            lambda: Delivery.objects.filter(status="sent").count() == 10, timeout=120, what="every delivery once freed"
        )
    finally:
        receiver.close()
        web.stop()
        worker.stop(timeout=30)
        worker.close()
    assert receiver.answered == 10
    assert Delivery.objects.count() == 10
