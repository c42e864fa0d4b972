"""Alert writes: deliveries for new threshold events, one delivery attempt, the sweep, threshold edits."""

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import orjson
from celery import current_app
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q

from counters import clock
from counters.config import CounterConfig
from counters.errors import CounterNotFound, RuleViolation
from counters.models import Threshold, ThresholdEvent
from metrics.recorders import alert_delivery_record

from .http import DELIVERY_HEADER, DeliveryError, post_json
from .models import Channel, Delivery, DeliveryAttempt, Message
from .payloads import render_template
from .selectors import event_payload
from .signals import threshold_alert
from .sms import sms_backend

logger = logging.getLogger(__name__)
# The "special log line" action writes here; route this logger wherever operators want it.
alert_logger = logging.getLogger("alerts.threshold")

LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}
MAX_ERROR_CHARS = 1000


class ThresholdNotFound(CounterNotFound):
    default_message = "Threshold not found."


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    delivery_id: int
    status: str
    retry_in: float | None


# --- thresholds ---------------------------------------------------------------------------------


def threshold_create(
    *,
    counter: CounterConfig,
    value: int,
    direction: str = Threshold.Direction.UP,
    level: str = Threshold.Level.INFO,
    enabled: bool = True,
    cooldown_seconds: int = 0,
    rearm: bool = False,
) -> Threshold:
    # Every enabled threshold is checked inside the update script: keep that list short.
    if Threshold.objects.filter(counter_id=counter.id).count() >= settings.ALERTS_MAX_THRESHOLDS_PER_COUNTER:
        raise RuleViolation(
            f"Counter {counter.name!r} already has {settings.ALERTS_MAX_THRESHOLDS_PER_COUNTER} thresholds."
        )
    return Threshold.objects.create(
        counter_id=counter.id,
        value=value,
        direction=direction,
        level=level,
        enabled=enabled,
        cooldown_seconds=cooldown_seconds,
        rearm=rearm,
    )


def _threshold(counter: CounterConfig, threshold_id: int) -> Threshold:
    threshold = Threshold.objects.filter(counter_id=counter.id, id=threshold_id).first()
    if threshold is None:
        raise ThresholdNotFound(f"Counter {counter.name!r} has no threshold {threshold_id}.")
    return threshold


def threshold_update(*, counter: CounterConfig, threshold_id: int, changes: dict) -> Threshold:
    threshold = _threshold(counter, threshold_id)
    for field, value in changes.items():
        setattr(threshold, field, value)
    threshold.save()
    return threshold


def threshold_delete(*, counter: CounterConfig, threshold_id: int) -> None:
    _threshold(counter, threshold_id).delete()


# --- deliveries ---------------------------------------------------------------------------------


def _enqueue(delivery_ids: list[int]) -> None:
    from .tasks import deliver  # here, not at the top: tasks imports this module

    for position, delivery_id in enumerate(delivery_ids):
        try:
            deliver.delay(delivery_id)
        except Exception:
            # The broker is out: stop here rather than hold the flusher up once per delivery.
            logger.exception("could not enqueue %s deliveries; the sweep will", len(delivery_ids) - position)
            return


def deliveries_create(*, event_ids: list[int]) -> list[int]:
    """One delivery per enabled channel of each event's threshold, queued once the rows are committed."""
    events = list(ThresholdEvent.objects.filter(id__in=event_ids).values_list("id", "threshold_id"))
    channels: dict[int, list[int]] = defaultdict(list)
    enabled = Channel.objects.filter(threshold_id__in={t for _, t in events}, enabled=True)
    for channel_id, threshold_id in enabled.values_list("id", "threshold_id"):
        channels[threshold_id].append(channel_id)
    rows = [Delivery(event_id=e, channel_id=c) for e, t in events for c in channels[t]]
    if not rows:
        return []
    with transaction.atomic():
        Delivery.objects.bulk_create(rows, ignore_conflicts=True)
        ids = list(
            Delivery.objects.filter(
                event_id__in=[e for e, _ in events], status=Delivery.Status.PENDING, attempts=0
            ).values_list("id", flat=True)
        )
        transaction.on_commit(partial(_enqueue, ids))
    return ids


def _text(payload: dict) -> tuple[str, str]:
    verb = "reached" if payload["direction"] == Threshold.Direction.UP else "fell to"
    who = f" for player {payload['subject']}" if payload["subject"] else ""
    title = f"[{payload['level'].upper()}] {payload['counter_display_name']} {verb} {payload['threshold']}{who}"
    period = f" in period {payload['period']}" if payload["period"] else ""
    body = f"{title}{period} at {payload['triggered_at']} (app {payload['app']}, counter {payload['counter']})."
    return title, body


def _send(delivery: Delivery) -> int | None:
    """Deliver once through the channel; returns an HTTP status when there is one, raises on failure."""
    channel, event = delivery.channel, delivery.event
    payload = event_payload(event=event)
    title, body = _text(payload)
    kind = channel.kind
    if kind == Channel.Kind.EMAIL:
        send_mail(title, body, None, channel.recipient_list, fail_silently=False)
        return None
    if kind == Channel.Kind.SMS:
        return sms_backend().send(to=channel.recipient_list, text=body)
    if kind == Channel.Kind.MESSAGE:
        Message.objects.create(
            app_id=event.counter.app_id,
            counter_id=event.counter_id,
            event=event,
            delivery=delivery,
            level=payload["level"],
            title=title,
            body=body,
            created_at=clock.now(),
        )
        return None
    headers = {DELIVERY_HEADER: str(delivery.id)}
    if kind == Channel.Kind.WEBHOOK:
        document = {"type": "threshold.crossed", "delivery_id": delivery.id, "data": payload}
        return post_json(url=channel.url, payload=document, secret=channel.secret, headers=headers).status_code
    if kind == Channel.Kind.ENDPOINT:
        document = render_template(channel.payload_template, payload)
        return post_json(url=channel.url, payload=document, secret=channel.secret, headers=headers).status_code
    if kind == Channel.Kind.EVENT:
        threshold_alert.send(sender=Channel, payload=payload, channel_id=channel.id, delivery_id=delivery.id)
        if channel.task_name:
            current_app.send_task(channel.task_name, kwargs={"payload": payload})
        return None
    if kind == Channel.Kind.LOG:
        level = LOG_LEVELS.get(payload["level"], logging.WARNING)
        alert_logger.log(level, "threshold %s", orjson.dumps(payload).decode())
        return None
    raise DeliveryError(f"Unknown channel kind {kind!r}.")


def _backoff_seconds(attempts: int) -> float:
    return min(settings.ALERTS_RETRY_MAX_SECONDS, settings.ALERTS_RETRY_BASE_SECONDS * 2 ** (attempts - 1))


def delivery_attempt(*, delivery_id: int) -> AttemptOutcome | None:
    """Make one attempt and log it. Returns when to retry, or None if another worker holds the delivery.

    The row stays locked during the attempt, so a duplicated task message never sends twice at once;
    a delivery already sent or failed is left alone.
    """
    with transaction.atomic():
        delivery = (
            Delivery.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("channel", "event__threshold", "event__counter__app")
            .filter(id=delivery_id)
            .first()
        )
        if delivery is None:
            return None
        if delivery.status in (Delivery.Status.SENT, Delivery.Status.FAILED):
            return AttemptOutcome(delivery.id, delivery.status, None)
        started_at = clock.now()
        started = time.monotonic()
        status_code, error = None, ""
        try:
            with transaction.atomic():
                status_code = _send(delivery)
        except DeliveryError as exc:
            status_code, error = exc.status_code, str(exc)
        except Exception as exc:  # Any failure of a channel is a failed attempt, logged and retried.
            error = f"{type(exc).__name__}: {exc}"
        delivery.attempts += 1
        DeliveryAttempt.objects.create(
            delivery=delivery,
            number=delivery.attempts,
            started_at=started_at,
            duration_ms=round((time.monotonic() - started) * 1000),
            ok=not error,
            status_code=status_code,
            error=error[:MAX_ERROR_CHARS],
        )
        retry_in = None
        if not error:
            delivery.status, delivery.last_error = Delivery.Status.SENT, ""
            delivery.finished_at, delivery.next_attempt_at = clock.now(), None
        elif delivery.attempts >= settings.ALERTS_MAX_ATTEMPTS + delivery.extra_attempts:
            delivery.status, delivery.last_error = Delivery.Status.FAILED, error[:MAX_ERROR_CHARS]
            delivery.finished_at, delivery.next_attempt_at = clock.now(), None
            logger.warning("delivery %s failed after %s attempts: %s", delivery.id, delivery.attempts, error)
        else:
            retry_in = _backoff_seconds(delivery.attempts)
            delivery.status, delivery.last_error = Delivery.Status.RETRYING, error[:MAX_ERROR_CHARS]
            delivery.next_attempt_at = clock.now() + timedelta(seconds=retry_in)
        delivery.save()
    alert_delivery_record(channel=str(delivery.channel.kind), outcome=str(delivery.status))
    return AttemptOutcome(delivery.id, delivery.status, retry_in)


def deliveries_retry(*, delivery_ids: list[int]) -> int:
    """An operator's retry of failed deliveries: a new round of attempts, starting now."""
    with transaction.atomic():
        failed = list(Delivery.objects.select_for_update().filter(id__in=delivery_ids, status=Delivery.Status.FAILED))
        for delivery in failed:
            delivery.extra_attempts = delivery.attempts
            delivery.status, delivery.finished_at = Delivery.Status.PENDING, None
            delivery.save(update_fields=["extra_attempts", "status", "finished_at"])
        transaction.on_commit(partial(_enqueue, [d.id for d in failed]))
    return len(failed)


def deliveries_sweep() -> int:
    """Repair what a crash or a broker outage left behind; returns how many deliveries were queued.

    Events recorded without deliveries (the flusher died before the signal) get them; deliveries
    whose task was lost (pending or due for a retry well past their time) are queued again.
    """
    now = clock.now()
    grace = timedelta(seconds=settings.ALERTS_SWEEP_GRACE_SECONDS)
    orphans = ThresholdEvent.objects.filter(
        triggered_at__gte=now - timedelta(seconds=settings.ALERTS_SWEEP_LOOKBACK_SECONDS),
        triggered_at__lt=now - grace,
        deliveries__isnull=True,
        threshold__alert_channels__enabled=True,
    )
    created = deliveries_create(event_ids=list(orphans.values_list("id", flat=True).distinct()))
    stale = Delivery.objects.filter(
        Q(status=Delivery.Status.PENDING, created_at__lt=now - grace)
        | Q(status=Delivery.Status.RETRYING, next_attempt_at__lt=now - grace)
    ).exclude(id__in=created)
    stale_ids = list(stale.values_list("id", flat=True)[:1000])
    _enqueue(stale_ids)
    return len(created) + len(stale_ids)
