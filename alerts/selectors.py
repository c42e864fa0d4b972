"""Reads of thresholds, alert payloads and in-system messages."""

from datetime import UTC

from counters.config import CounterConfig
from counters.models import Threshold, ThresholdEvent

from .models import Message


def thresholds_list(*, counter: CounterConfig) -> list[Threshold]:
    return list(Threshold.objects.filter(counter_id=counter.id).order_by("value", "id"))


def event_payload(*, event: ThresholdEvent) -> dict:
    """What every channel says about an event (also the variables of payload templates)."""
    threshold, counter = event.threshold, event.counter
    return {
        "event_id": event.id,
        "app": counter.app.slug,
        "counter": counter.name,
        "counter_display_name": counter.display_name or counter.name,
        "subject": event.subject,
        "player_id": event.subject,
        "period": event.period,
        "threshold_id": threshold.id,
        "threshold": threshold.value,
        "direction": threshold.direction,
        "level": threshold.level,
        "triggered_at": event.triggered_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def messages_list(*, app_id: int, counter_id: int | None = None, limit: int = 50) -> list[Message]:
    messages = Message.objects.filter(app_id=app_id).select_related("counter")
    if counter_id is not None:
        messages = messages.filter(counter_id=counter_id)
    return list(messages[:limit])
