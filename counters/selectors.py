"""Reads of counters, their values and API keys. Nothing here writes PostgreSQL."""

import hashlib
from dataclasses import dataclass
from datetime import datetime

from . import clock, keyspace, periods
from .config import DEFAULT_APP_SLUG, GLOBAL_APP_SLUG, CounterConfig, KeyConfig
from .config import cache as config_cache
from .errors import CounterNotFound, InvalidParameter
from .redis_store import redis_call
from .services import counter_check_subject, value_hydrate


@dataclass(frozen=True, slots=True)
class ValueView:
    counter: CounterConfig
    subject: str
    value: int
    last_updated: datetime | None
    window: periods.PeriodWindow


def api_key_get(raw_key: str) -> KeyConfig | None:
    return config_cache.get().keys_by_hash.get(hashlib.sha256(raw_key.encode()).hexdigest())


def app_id_get(slug: str) -> int | None:
    return config_cache.get().apps_by_slug.get(slug)


def default_app_id() -> int | None:
    return app_id_get(DEFAULT_APP_SLUG)


def counter_get(*, app_id: int | None, name: str) -> CounterConfig:
    """A counter visible to an app: its own counter of that name, else the global one.

    An unknown name and another app's counter look the same (4004): an app cannot learn what
    other apps have.
    """
    snapshot = config_cache.get()
    counter = snapshot.counters.get((app_id, name)) if app_id is not None else None
    if counter is None:
        global_id = snapshot.apps_by_slug.get(GLOBAL_APP_SLUG)
        counter = snapshot.counters.get((global_id, name))
        if counter is not None and not counter.is_global:
            counter = None
    if counter is None or (counter.expires_at is not None and clock.now() >= counter.expires_at):
        raise CounterNotFound(f"Counter {name!r} not found.")
    return counter


def _to_view(counter: CounterConfig, subject: str, window: periods.PeriodWindow, raw: list) -> ValueView:
    value, updated = raw
    return ValueView(
        counter=counter,
        subject=subject,
        value=int(value),
        last_updated=clock.from_ms(int(updated)) if updated and int(updated) else None,
        window=window,
    )


def counter_values_get(*, items: list[tuple[CounterConfig, str]]) -> list[ValueView]:
    """Current values of several (counter, subject) pairs in one Redis round trip (hydrating misses)."""
    for counter, subject in items:
        counter_check_subject(counter=counter, subject=subject)
    now = clock.now()
    windows = [periods.window_at(c.period, c.time_zone, now) for c, _ in items]
    keys = [keyspace.value_key(c.id, w.key, s) for (c, s), w in zip(items, windows, strict=True)]

    def read(r):
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, "v", "upd")
        return pipe.execute()

    raws = redis_call(read)
    views = []
    for (counter, subject), window, key, raw in zip(items, windows, keys, raws, strict=True):
        if raw[0] is None:
            value_hydrate(counter=counter, subject=subject, window=window)
            raw = redis_call(lambda r, k=key: r.hmget(k, "v", "upd"))
        views.append(_to_view(counter, subject, window, raw))
    return views


def counter_value_get(*, counter: CounterConfig, subject: str = "") -> ValueView:
    return counter_values_get(items=[(counter, subject)])[0]


def parse_names(raw: str, *, limit: int = 10) -> list[str]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        raise InvalidParameter("Give 1 to 10 counter names: ?names=a,b")
    if len(names) > limit:
        raise InvalidParameter(f"At most {limit} names per request ({len(names)} given).")
    return list(dict.fromkeys(names))
