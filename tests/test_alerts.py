"""Alert channels and actions, delivered by Celery tasks run eagerly in the test process.

The outside world is replaced by local servers on free loopback ports and the locmem mail backend.
The real worker (backoff, timeouts, a hanging receiver) is in ``test_alerts_worker.py``.
"""

import hashlib
import hmac
import logging
import time
from datetime import timedelta

import orjson
import pytest
from django.core import mail
from django.core.exceptions import ValidationError

from alerts.models import Channel, Delivery, DeliveryAttempt, Message
from alerts.services import deliveries_create, deliveries_sweep
from alerts.signals import threshold_alert
from counterproject.celery import app as celery_app
from counters import clock, config, selectors
from counters.flush import counters_flush
from counters.models import App, Counter, Threshold, ThresholdEvent
from counters.services import counter_update

from .alerts_receiver import Receiver

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def eager():
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def threshold(builtins):
    counter = Counter.objects.create(app=App.objects.get(slug="default"), name="boss_kills", display_name="Boss kills")
    return Threshold.objects.create(counter=counter, value=10, level="critical")


def channel(threshold: Threshold, kind: str, **fields) -> Channel:
    obj = Channel(threshold=threshold, kind=kind, **fields)
    obj.full_clean()
    obj.save()
    return obj


def cross(threshold: Threshold, django_capture_on_commit_callbacks, *, subject: str = "") -> None:
    """Push the counter over the threshold, then flush: the event is stored and its deliveries run."""
    config.cache.invalidate()
    counter = selectors.counter_get(app_id=threshold.counter.app_id, name=threshold.counter.name)
    assert counter_update(counter=counter, amount=threshold.value, subject=subject).crossed == (threshold.id,)
    with django_capture_on_commit_callbacks(execute=True):
        counters_flush()


def test_a_webhook_is_signed_with_hmac_over_timestamp_and_body(threshold, receiver, django_capture_on_commit_callbacks):
    channel(threshold, "webhook", url=f"{receiver.url}/hooks/counters", secret="s3cret")
    cross(threshold, django_capture_on_commit_callbacks)

    [request] = receiver.received
    assert request.path == "/hooks/counters"
    timestamp = request.headers["X-Counter-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 300
    expected = hmac.new(b"s3cret", timestamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["X-Counter-Signature"], f"sha256={expected}")
    wrong = hmac.new(b"other", timestamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Counter-Signature"] != f"sha256={wrong}"

    document = orjson.loads(request.body)
    event = ThresholdEvent.objects.get()
    delivery = Delivery.objects.get()
    assert request.headers["X-Counter-Delivery"] == str(delivery.id)
    assert document["type"] == "threshold.crossed" and document["delivery_id"] == delivery.id
    assert document["data"] | {"triggered_at": None} == {
        "event_id": event.id,
        "app": "default",
        "counter": "boss_kills",
        "counter_display_name": "Boss kills",
        "subject": "",
        "player_id": "",
        "period": "",
        "threshold_id": threshold.id,
        "threshold": 10,
        "direction": "up",
        "level": "critical",
        "triggered_at": None,
    }
    assert (delivery.status, delivery.attempts) == ("sent", 1)
    assert list(DeliveryAttempt.objects.values_list("number", "ok", "status_code")) == [(1, True, 200)]


def test_a_receiver_failing_twice_gets_it_on_the_third_try_and_every_attempt_is_logged(
    threshold, django_capture_on_commit_callbacks
):
    receiver = Receiver(statuses=[500, 503])
    try:
        channel(threshold, "webhook", url=receiver.url, secret="k")
        cross(threshold, django_capture_on_commit_callbacks)
    finally:
        receiver.close()
    assert len(receiver.received) == 3
    assert len({r.headers["X-Counter-Delivery"] for r in receiver.received}) == 1
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("sent", 3, "")
    attempts = list(delivery.attempt_log.values_list("number", "ok", "status_code"))
    assert attempts == [(1, False, 500), (2, False, 503), (3, True, 200)]
    assert "receiver says no" in delivery.attempt_log.first().error


def test_attempts_are_bounded_and_the_delivery_ends_failed(threshold, settings, django_capture_on_commit_callbacks):
    settings.ALERTS_MAX_ATTEMPTS = 4
    receiver = Receiver(statuses=[500] * 10)
    try:
        channel(threshold, "webhook", url=receiver.url, secret="k")
        cross(threshold, django_capture_on_commit_callbacks)
    finally:
        receiver.close()
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 4)
    assert len(receiver.received) == 4 and delivery.last_error.startswith("HTTP 500")


def test_an_unreachable_receiver_is_a_logged_failure(threshold, settings, django_capture_on_commit_callbacks):
    settings.ALERTS_MAX_ATTEMPTS = 2
    receiver = Receiver()
    url = receiver.url
    receiver.close()
    channel(threshold, "webhook", url=url, secret="k")
    cross(threshold, django_capture_on_commit_callbacks)
    delivery = Delivery.objects.get()
    assert delivery.status == "failed"
    assert [a.status_code for a in delivery.attempt_log.all()] == [None, None]
    assert "refused" in delivery.last_error.lower()


def test_email_goes_through_the_django_mail_backend(threshold, django_capture_on_commit_callbacks):
    channel(threshold, "email", recipients="ops@example.com,\nlead@example.com")
    cross(threshold, django_capture_on_commit_callbacks)
    [message] = mail.outbox
    assert message.to == ["ops@example.com", "lead@example.com"]
    assert message.subject == "[CRITICAL] Boss kills reached 10"
    assert "counter boss_kills" in message.body
    assert Delivery.objects.get().status == "sent"


def test_sms_goes_to_the_http_gateway(threshold, receiver, settings, django_capture_on_commit_callbacks):
    settings.ALERTS_SMS_BACKEND = "alerts.sms.HttpGatewayBackend"
    settings.ALERTS_SMS_GATEWAY_URL = f"{receiver.url}/sms/send"
    settings.ALERTS_SMS_GATEWAY_TOKEN = "gw-token"
    channel(threshold, "sms", recipients="+15550001,+15550002")
    cross(threshold, django_capture_on_commit_callbacks)
    [request] = receiver.received
    assert request.path == "/sms/send"
    assert request.headers["Authorization"] == "Bearer gw-token"
    body = orjson.loads(request.body)
    assert body["to"] == ["+15550001", "+15550002"]
    assert body["text"].startswith("[CRITICAL] Boss kills reached 10")
    assert list(DeliveryAttempt.objects.values_list("ok", "status_code")) == [(True, 200)]


def test_sms_logging_backend_for_development(threshold, caplog, django_capture_on_commit_callbacks):
    channel(threshold, "sms", recipients="+15550001")
    with caplog.at_level(logging.INFO, logger="alerts.sms"):
        cross(threshold, django_capture_on_commit_callbacks)
    assert any("SMS to +15550001: [CRITICAL] Boss kills reached 10" in r.getMessage() for r in caplog.records)


def test_in_system_messages_are_stored_and_listed_for_managers(
    threshold, client, make_key, admin_client, django_capture_on_commit_callbacks
):
    channel(threshold, "message")
    cross(threshold, django_capture_on_commit_callbacks)
    manager = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('counter_manage',))}"}
    body = client.get("/api/v1/alerts/messages", **manager).json()
    [listed] = body["messages"]
    assert listed["title"] == "[CRITICAL] Boss kills reached 10"
    assert listed["counter"] == "boss_kills" and listed["level"] == "critical"
    assert listed["event_id"] == ThresholdEvent.objects.get().id
    filtered = client.get("/api/v1/alerts/messages?counter=boss_kills&limit=1", **manager).json()
    assert len(filtered["messages"]) == 1

    stranger = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('counter_manage',), app='other')}"}
    assert client.get("/api/v1/alerts/messages", **stranger).json()["messages"] == []
    writer = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write',))}"}
    assert client.get("/api/v1/alerts/messages", **writer).status_code == 403
    assert client.get("/api/v1/alerts/messages?limit=0", **manager).json()["error"]["code"] == 4001

    page = admin_client.get("/admin/alerts/message/")
    assert page.status_code == 200 and "Boss kills reached 10" in page.content.decode()


def test_a_custom_endpoint_gets_its_template_filled_as_reward_mail(
    threshold, receiver, django_capture_on_commit_callbacks
):
    threshold.counter.scope = "user"
    threshold.counter.save()
    template = {
        "mail": {"to": "${player_id}", "items": [{"id": "gold", "count": 100}]},
        "reason": "Reached ${threshold} boss kills ($$ bonus)",
        "threshold": "${threshold}",
    }
    channel(threshold, "endpoint", url=f"{receiver.url}/game/mail", payload_template=template)
    cross(threshold, django_capture_on_commit_callbacks, subject="p42")
    [request] = receiver.received
    assert "X-Counter-Signature" not in request.headers
    assert orjson.loads(request.body) == {
        "mail": {"to": "p42", "items": [{"id": "gold", "count": 100}]},
        "reason": "Reached 10 boss kills ($ bonus)",
        "threshold": 10,
    }


@pytest.mark.parametrize(
    "template",
    [{"x": "${__class__}"}, {"x": "${counter.__class__}"}, {"x": "{0.__class__}${"}, {"x": "$(import os)"}],
)
def test_templates_never_evaluate_anything(threshold, template):
    with pytest.raises(ValidationError) as error:
        channel(threshold, "endpoint", url="http://127.0.0.1:9/x", payload_template=template)
    assert "payload_template" in error.value.message_dict


def test_channel_config_is_checked(threshold):
    with pytest.raises(ValidationError):
        channel(threshold, "webhook", url="http://127.0.0.1:9/x")
    with pytest.raises(ValidationError):
        channel(threshold, "webhook", url="ftp://127.0.0.1/x", secret="k")
    with pytest.raises(ValidationError):
        channel(threshold, "email")


def test_emit_event_and_the_special_log_line(threshold, caplog, django_capture_on_commit_callbacks):
    heard = []

    def listener(sender, *, payload, channel_id, delivery_id, **kwargs):
        heard.append((payload["counter"], payload["threshold"], channel_id, delivery_id))

    threshold_alert.connect(listener)
    try:
        event_channel = channel(threshold, "event")
        channel(threshold, "log")
        with caplog.at_level(logging.INFO, logger="alerts.threshold"):
            cross(threshold, django_capture_on_commit_callbacks)
    finally:
        threshold_alert.disconnect(listener)
    delivery = Delivery.objects.get(channel=event_channel)
    assert heard == [("boss_kills", 10, event_channel.id, delivery.id)]
    [line] = [r for r in caplog.records if r.name == "alerts.threshold"]
    assert line.levelno == logging.CRITICAL
    assert orjson.loads(line.getMessage().removeprefix("threshold "))["counter"] == "boss_kills"
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}


def test_a_failing_subscriber_fails_the_attempt_and_is_retried(threshold, settings, django_capture_on_commit_callbacks):
    settings.ALERTS_MAX_ATTEMPTS = 2

    def broken(sender, **kwargs):
        raise RuntimeError("subscriber bug")

    threshold_alert.connect(broken)
    try:
        channel(threshold, "event")
        cross(threshold, django_capture_on_commit_callbacks)
    finally:
        threshold_alert.disconnect(broken)
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 2)
    assert delivery.last_error == "RuntimeError: subscriber bug"


def test_disabled_channels_and_repeated_signals_do_not_deliver_twice(threshold, django_capture_on_commit_callbacks):
    channel(threshold, "message")
    channel(threshold, "message", enabled=False)
    cross(threshold, django_capture_on_commit_callbacks)
    event_id = ThresholdEvent.objects.get().id
    with django_capture_on_commit_callbacks(execute=True):
        deliveries_create(event_ids=[event_id])
    assert Delivery.objects.count() == 1 and Message.objects.count() == 1


def test_the_sweep_delivers_events_the_flusher_could_not_hand_over(threshold, django_capture_on_commit_callbacks):
    channel(threshold, "message")
    long_ago = clock.now() - timedelta(minutes=10)
    ThresholdEvent.objects.create(threshold=threshold, counter=threshold.counter, triggered_at=long_ago)
    with django_capture_on_commit_callbacks(execute=True):
        assert deliveries_sweep() == 1
    assert Message.objects.count() == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert deliveries_sweep() == 0


def test_the_sweep_requeues_a_delivery_whose_task_was_lost(threshold, django_capture_on_commit_callbacks):
    channel(threshold, "message")
    event = ThresholdEvent.objects.create(threshold=threshold, counter=threshold.counter, triggered_at=clock.now())
    delivery = Delivery.objects.create(event=event, channel=threshold.alert_channels.get())
    Delivery.objects.filter(id=delivery.id).update(created_at=clock.now() - timedelta(minutes=10))
    with django_capture_on_commit_callbacks(execute=True):
        assert deliveries_sweep() == 1
    delivery.refresh_from_db()
    assert delivery.status == "sent" and Message.objects.get().delivery_id == delivery.id


def test_an_operator_retries_a_failed_delivery_from_the_admin(
    threshold, settings, admin_client, django_capture_on_commit_callbacks
):
    settings.ALERTS_MAX_ATTEMPTS = 2
    receiver = Receiver(statuses=[500, 500, 500])
    try:
        channel(threshold, "webhook", url=receiver.url, secret="k")
        cross(threshold, django_capture_on_commit_callbacks)
        delivery = Delivery.objects.get()
        assert (delivery.status, delivery.attempts) == ("failed", 2)
        with django_capture_on_commit_callbacks(execute=True):
            response = admin_client.post(
                "/admin/alerts/delivery/", {"action": "retry", "_selected_action": [delivery.id]}, follow=True
            )
        assert "1 failed deliveries queued again." in response.content.decode()
    finally:
        receiver.close()
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("sent", 4)
    assert [a.status_code for a in delivery.attempt_log.all()] == [500, 500, 500, 200]
    page = admin_client.get(f"/admin/alerts/delivery/{delivery.id}/change/").content.decode()
    assert "receiver says no" in page


def test_operators_configure_channels_in_the_admin(threshold, admin_client):
    assert admin_client.get("/admin/alerts/channel/add/").status_code == 200
    form = {"threshold": threshold.id, "kind": "webhook", "url": "http://127.0.0.1:9/x", "enabled": "on"}
    refused = admin_client.post("/admin/alerts/channel/add/", {**form, "payload_template": "{}"})
    assert "Webhooks are signed: give a secret." in refused.content.decode()
    created = admin_client.post("/admin/alerts/channel/add/", {**form, "secret": "k", "payload_template": "{}"})
    assert created.status_code == 302
    assert Channel.objects.get().secret == "k"
    for page in ("/admin/alerts/channel/", "/admin/alerts/delivery/", "/admin/alerts/message/"):
        assert admin_client.get(page).status_code == 200
