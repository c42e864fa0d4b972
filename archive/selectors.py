"""Reads of the archive: the closed periods of a counter, next to its live value."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from counters import clock, periods
from counters.config import CounterConfig
from counters.errors import RuleViolation
from counters.selectors import ValueView, counter_value_get

from .models import PeriodArchive


@dataclass(frozen=True, slots=True)
class ClosedPeriod:
    period: str
    start: datetime
    end: datetime
    final_value: int
    peak: int
    operations: int


@dataclass(frozen=True, slots=True)
class CounterHistory:
    current: ValueView
    closed: list[ClosedPeriod]


def period_history_get(*, counter: CounterConfig, subject: str = "", days: int = 7) -> CounterHistory:
    """The live period and the archived periods that ended within the last ``days`` days, newest first."""
    if counter.period == periods.NONE:
        raise RuleViolation(f"Counter {counter.name!r} never resets: it has no period history.")
    since = clock.now() - timedelta(days=days)
    rows = PeriodArchive.objects.filter(counter_id=counter.id, subject=subject, period_end__gt=since).order_by(
        "-period_start"
    )
    closed = [
        ClosedPeriod(r.period, r.period_start, r.period_end, r.final_value, r.peak, r.operations)
        for r in rows.only("period", "period_start", "period_end", "final_value", "peak", "operations")
    ]
    return CounterHistory(current=counter_value_get(counter=counter, subject=subject), closed=closed)
