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


# ``isoformat`` rather than ``strftime``, which took 2-3 times as long: a GET of one counter writes
# two of them (tests/test_periods.py compares both with strftime's).
def iso_utc(moment: datetime | None) -> str | None:
    """REST v1's time format: UTC to the second, ``2023-10-01T10:30:00Z``."""
    if moment is None:
        return None
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="seconds")[:-6] + "Z"  # without "+00:00"


def iso_ms(moment: datetime | None) -> str | None:
    """The cloud functions' time format: UTC with milliseconds, ``2023-10-01T10:30:00.000Z``."""
    if moment is None:
        return None
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
