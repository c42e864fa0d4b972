"""The one source of "now" for the service, so tests can move time (time-machine)."""

from datetime import UTC, datetime


def now() -> datetime:
    """Aware UTC, as ``django.utils.timezone.now`` gives it with USE_TZ (which this project sets),
    without its settings lookup: the hot path asks the time more than once per request."""
    return datetime.now(UTC)


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def iso_utc(moment: datetime | None) -> str | None:
    """REST v1's time format: UTC to the second, ``2023-10-01T10:30:00Z``."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_ms(moment: datetime | None) -> str | None:
    """The cloud functions' time format: UTC with milliseconds, ``2023-10-01T10:30:00.000Z``."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
