"""Reads for the live board: an app's public counters, from Redis, or from PostgreSQL while it is down."""

from dataclasses import dataclass

from counters import clock, periods, selectors
from counters.config import CounterConfig
from counters.errors import CounterNotFound
from counters.models import CounterValue
from counters.redis_store import StoreUnavailable


@dataclass(frozen=True, slots=True)
class Board:
    app_slug: str
    degraded: bool
    values: list[selectors.ValueView]


def _database_values(counters: list[CounterConfig]) -> list[selectors.ValueView]:
    """The durable values of the current periods, without touching Redis (it is down).

    They lag the live values by the deltas not yet flushed (about a second of traffic); a period
    without a row yet shows its configured reset value.
    """
    now = clock.now()
    windows = {c.id: periods.window_at(c.period, c.time_zone, now) for c in counters}
    rows = {
        (row.counter_id, row.period): row
        for row in CounterValue.objects.filter(counter_id__in=list(windows), subject="")
        if row.period == windows[row.counter_id].key
    }
    views = []
    for counter in counters:
        window = windows[counter.id]
        row = rows.get((counter.id, window.key))
        fallback = counter.reset_value if counter.period != periods.NONE and counter.reset_strategy == "value" else 0
        views.append(
            selectors.ValueView(
                counter=counter,
                subject="",
                value=row.value if row else fallback,
                last_updated=row.updated_at if row else None,
                window=window,
            )
        )
    return views


def board_get(*, app_slug: str) -> Board:
    app_id = selectors.app_id_get(app_slug)
    if app_id is None:
        raise CounterNotFound(f"App {app_slug!r} not found.")
    counters = selectors.public_counters_get(app_id=app_id)
    try:
        return Board(app_slug, False, selectors.counter_values_get(items=[(c, "") for c in counters]))
    except StoreUnavailable:
        return Board(app_slug, True, _database_values(counters))
