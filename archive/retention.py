"""The archive's retention rule, checked at start-up (settings) and again by the task that enforces it."""

from django.core.exceptions import ImproperlyConfigured

MIN_RETENTION_DAYS = 7  # a week of history is always there


def retention_days_checked(days: int, minimum: int = MIN_RETENTION_DAYS) -> int:
    if days < minimum:
        raise ImproperlyConfigured(f"COUNTER_ARCHIVE_RETENTION_DAYS={days}: the archive keeps at least {minimum} days.")
    return days
