"""Statistics of an app's counters (``getCounterStats`` and ``GET /api/v1/stats``). Reads only.

Activity comes from the per-minute buckets that the hot path records and the flusher writes to
``StatBucket``, so it trails the live values by one flush interval (about a second). Current
values come from the live store, the same as ``getCounter``.
"""

import zoneinfo
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from django.db.models import Max, Sum
from django.db.models.functions import Trunc
from django.utils.translation import gettext as _

from . import clock, periods, selectors
from .config import GLOBAL_APP_SLUG, CounterConfig
from .config import cache as config_cache
from .errors import RuleViolation
from .models import CounterValue, StatBucket

DEFAULT_RANGE = timedelta(days=7)
MAX_SLOTS = 1000
FIRST_YEAR, LAST_YEAR = 1970, 9998
TOP_COUNTERS = 10
SLOT_UNITS = {"hour": "hour", "day": "day", "week": "week"}


@dataclass(frozen=True, slots=True)
class StatsRange:
    start: datetime
    end: datetime
    group_by: str
    zone: zoneinfo.ZoneInfo


def _moment(value: date | datetime, zone: zoneinfo.ZoneInfo, *, field: str, end: bool) -> datetime:
    # Years the arithmetic below (a day later, a week earlier, local time) cannot take past datetime's range.
    if not FIRST_YEAR <= value.year <= LAST_YEAR:
        raise RuleViolation(
            _("%(field)s: use a date from %(first)d to %(last)d.")
            % {"field": field, "first": FIRST_YEAR, "last": LAST_YEAR}
        )
    if isinstance(value, datetime):
        return value
    # A date is a whole local day: an end date includes that day.
    return datetime.combine(value + timedelta(days=1) if end else value, time(0), tzinfo=zone)


def stats_range(
    *, time_zone: str, start: date | datetime | None, end: date | datetime | None, group_by: str
) -> StatsRange:
    """The range of a statistics request; ``start`` and ``end`` as ``StatsDateField`` parses them."""
    zone = zoneinfo.ZoneInfo(time_zone)
    end_at = _moment(end, zone, field="endDate", end=True) if end else clock.now()
    start_at = _moment(start, zone, field="startDate", end=False) if start else end_at - DEFAULT_RANGE
    if start_at >= end_at:
        raise RuleViolation(_("startDate must be before endDate."))
    slot = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}[group_by]
    if (end_at - start_at) / slot > MAX_SLOTS:
        raise RuleViolation(
            _("At most %(max)d %(unit)s slots per request: narrow the dates or group by a longer unit.")
            % {"max": MAX_SLOTS, "unit": group_by}
        )
    return StatsRange(start_at, end_at, group_by, zone)


def _slot_start(moment: datetime, group_by: str, zone: zoneinfo.ZoneInfo) -> datetime:
    local = moment.astimezone(zone)
    if group_by == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    day = local.date() if group_by == "day" else local.date() - timedelta(days=local.weekday())
    return datetime.combine(day, time(0), tzinfo=zone)


def _slots(span: StatsRange) -> list[datetime]:
    slots = []
    current = _slot_start(span.start, span.group_by, span.zone)
    while current < span.end and len(slots) <= MAX_SLOTS:
        slots.append(current)
        if span.group_by == "hour":
            current = (current + timedelta(hours=1)).astimezone(span.zone)
        else:
            step = 1 if span.group_by == "day" else 7
            current = datetime.combine(current.date() + timedelta(days=step), time(0), tzinfo=span.zone)
    return slots


def stats_counters(*, app_id: int, counter_type: str | None) -> list[CounterConfig]:
    """The counters the statistics cover: the app's own, or the global ones for ``global``."""
    snapshot = config_cache.get()
    now = clock.now()
    owner = snapshot.apps_by_slug.get(GLOBAL_APP_SLUG) if counter_type == "global" else app_id
    counters = [
        c
        for c in snapshot.counters_by_id.values()
        if c.app_id == owner
        and c.is_live(now)
        and (counter_type is None or selectors.counter_type_of(c) == counter_type or c.scope == counter_type)
    ]
    return sorted(counters, key=lambda c: c.name)


@dataclass(frozen=True, slots=True)
class CurrentValue:
    value: int
    peak: int
    updated_at: datetime | None


def _current_values(counters: list[CounterConfig]) -> dict[int, CurrentValue]:
    shared = [c for c in counters if not c.is_user_scoped]
    current = {
        view.counter.id: CurrentValue(view.value, view.value, view.last_updated)
        for view in selectors.counter_values_get(items=[(c, "") for c in shared])
    }
    now = clock.now()
    for counter in counters:
        if counter.is_user_scoped:
            # Per-player values: their sum in the current period, as of the last flush.
            window = periods.window_at(counter.period, counter.time_zone, now)
            row = CounterValue.objects.filter(counter_id=counter.id, period=window.key).aggregate(
                value=Sum("value"), peak=Max("peak"), updated=Max("updated_at")
            )
            current[counter.id] = CurrentValue(row["value"] or 0, row["peak"] or 0, row["updated"])
    return current


def _levels(ids: list[int], span: StatsRange, slotted) -> list[tuple[datetime, int]]:
    """Each slot with the selected counters' level at its end: the sum over counters of the value
    after the last update up to then (a slot without updates keeps the level before it).

    Levels come from the buckets' ``last_value`` (recorded for counters that are not per player,
    including the value a reset set), so per-player counters are not part of them.
    """
    level = dict(
        StatBucket.objects.filter(counter_id__in=ids, minute__lt=span.start, last_value__isnull=False)
        .order_by("counter_id", "-minute")
        .distinct("counter_id")
        .values_list("counter_id", "last_value")
    )
    at_end: dict[datetime, list[tuple[int, int]]] = {}
    last_in_slot = (
        slotted.filter(last_value__isnull=False)
        .order_by("counter_id", "slot", "-minute")
        .distinct("counter_id", "slot")
        .values_list("slot", "counter_id", "last_value")
    )
    for slot, counter_id, last_value in last_in_slot:
        at_end.setdefault(slot, []).append((counter_id, last_value))
    levels = []
    for slot in _slots(span):
        level.update(at_end.get(slot, ()))
        levels.append((slot, sum(level.values())))
    return levels


def counter_stats(*, counters: list[CounterConfig], span: StatsRange) -> dict:
    """summary, counterList, timeSeries and topCounters of ``counters`` over ``span``."""
    ids = [c.id for c in counters]
    buckets = StatBucket.objects.filter(counter_id__in=ids, minute__gte=span.start, minute__lt=span.end)
    activity = {
        row["counter_id"]: row
        for row in buckets.values("counter_id").annotate(ops=Sum("operations"), peak=Max("max_value"))
    }
    slotted = buckets.annotate(slot=Trunc("minute", SLOT_UNITS[span.group_by], tzinfo=span.zone))
    operations = {row["slot"]: row["ops"] for row in slotted.values("slot").annotate(ops=Sum("operations"))}
    current = _current_values(counters)

    counter_list = []
    for counter in counters:
        now_value = current[counter.id]
        active = activity.get(counter.id)
        peak = active["peak"] if active and active["peak"] is not None else now_value.peak
        counter_list.append(
            {
                "counterId": counter.name,
                "counterName": counter.display_name or counter.name,
                "currentValue": now_value.value,
                "peakValue": peak,
                "operationCount": active["ops"] if active else 0,
                "lastUpdateTime": now_value.updated_at,
            }
        )
    values = [item["currentValue"] for item in counter_list]
    ranked = sorted(counter_list, key=lambda item: (-item["currentValue"], item["counterId"]))[:TOP_COUNTERS]
    return {
        "summary": {
            "totalCounters": len(counters),
            "activeCounters": sum(1 for row in activity.values() if row["ops"]),
            "totalOperations": sum(row["ops"] or 0 for row in activity.values()),
            "avgValue": round(sum(values) / len(values), 2) if values else 0.0,
        },
        "counterList": counter_list,
        "timeSeries": [
            {"time": slot, "value": level, "operations": operations.get(slot) or 0}
            for slot, level in _levels(ids, span, slotted)
        ],
        "topCounters": [
            {"counterId": item["counterId"], "value": item["currentValue"], "ranking": rank}
            for rank, item in enumerate(ranked, start=1)
        ],
    }
