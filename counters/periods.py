"""Period arithmetic: which period a moment belongs to, in a counter's time zone.

A period is identified by the local date of its start (``YYYY-MM-DD``); counters without a
period use the empty string. Because the period is computed from the request time, the
rollover is exact at local 00:00:00 whether or not any scheduled job has run.
"""

import zoneinfo
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache

NONE = "none"
DAILY = "daily"
WEEKLY = "weekly"
MONTHLY = "monthly"


@dataclass(frozen=True, slots=True)
class PeriodWindow:
    key: str
    start: datetime | None
    end: datetime | None

    def holds(self, now: datetime) -> bool:
        """Whether ``now`` lies in this window (one without an end, of a counter without periods,
        holds every moment)."""
        return self.end is None or self.start <= now < self.end


@lru_cache(maxsize=512)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def _start_date(period: str, local_day: date) -> date:
    if period == DAILY:
        return local_day
    if period == WEEKLY:
        return local_day - timedelta(days=local_day.weekday())
    if period == MONTHLY:
        return local_day.replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def _next_start(period: str, start: date) -> date:
    if period == DAILY:
        return start + timedelta(days=1)
    if period == WEEKLY:
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


def _previous_start(period: str, start: date) -> date:
    return _start_date(period, start - timedelta(days=1))


def _midnight(day: date, zone: zoneinfo.ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone)


# Frozen: one for every read and update of a counter without period.
_NO_PERIOD = PeriodWindow("", None, None)


def window_at(period: str, time_zone: str, moment: datetime) -> PeriodWindow:
    if period == NONE:
        return _NO_PERIOD
    zone = _zone(time_zone)
    start = _start_date(period, moment.astimezone(zone).date())
    return PeriodWindow(start.isoformat(), _midnight(start, zone), _midnight(_next_start(period, start), zone))


def window_of_key(period: str, time_zone: str, key: str) -> PeriodWindow:
    zone = _zone(time_zone)
    start = date.fromisoformat(key)
    return PeriodWindow(key, _midnight(start, zone), _midnight(_next_start(period, start), zone))


def previous_key(period: str, key: str) -> str:
    return _previous_start(period, date.fromisoformat(key)).isoformat()


def next_key(period: str, key: str) -> str:
    return _next_start(period, date.fromisoformat(key)).isoformat()
