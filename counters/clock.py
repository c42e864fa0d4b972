"""The one source of "now" for the service, so tests can move time (time-machine)."""

from datetime import UTC, datetime

from django.utils import timezone


def now() -> datetime:
    return timezone.now()


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
