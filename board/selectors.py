"""Reads for the live board: an app's public counters, from Redis, or from PostgreSQL while it is down."""

from dataclasses import dataclass

from counters import selectors
from counters.errors import CounterNotFound


@dataclass(frozen=True, slots=True)
class Board:
    app_slug: str
    degraded: bool
    values: list[selectors.ValueView]


def board_get(*, app_slug: str) -> Board:
    app_id = selectors.app_id_get(app_slug)
    if app_id is None:
        raise CounterNotFound(f"App {app_slug!r} not found.")
    counters = selectors.public_counters_get(app_id=app_id)
    # While Redis is down the values come from PostgreSQL (selectors.counter_values_get says so).
    views = selectors.counter_values_get(items=[(c, "") for c in counters])
    return Board(app_slug, any(view.degraded for view in views), views)
