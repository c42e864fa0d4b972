"""Gauges read from Redis (and the config snapshot) when Prometheus scrapes, not kept in processes.

Flush lag and pending deltas describe the shared store, so any process can read them and every
scrape sees the same; a stuck or dead flusher shows here even though it reports nothing itself.
"""

import logging
from dataclasses import dataclass

from django.conf import settings
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from counters import clock, keyspace, periods, selectors, split
from counters.config import CounterConfig
from counters.config import cache as config_cache
from counters.redis_store import StoreUnavailable, redis_call

from .definitions import PREFIX

logger = logging.getLogger(__name__)

ALL = "*"


@dataclass(frozen=True, slots=True)
class PendingState:
    values: int
    oldest_ms: int | None


def pending_state(*, counter_ids: list[int]) -> PendingState:
    """Values changed and not yet in PostgreSQL (one delta each) and the time of the oldest change,
    over the live pending hashes and the batches in flight."""

    def read(r) -> list[list[bytes | None]]:
        pipe = r.pipeline(transaction=False)
        for cid in counter_ids:
            pipe.hmget(keyspace.pending_key(cid), keyspace.PENDING_SINCE_FIELD, keyspace.PENDING_VALUES_FIELD)
            pipe.smembers(keyspace.batches_key(cid))
        replies = pipe.execute()
        live = replies[0::2]
        batches = [(cid, b) for cid, members in zip(counter_ids, replies[1::2], strict=True) for b in members]
        if not batches:
            return live
        pipe = r.pipeline(transaction=False)
        for cid, batch_id in batches:
            pipe.hmget(
                keyspace.batch_key(cid, batch_id.decode()),
                keyspace.PENDING_SINCE_FIELD,
                keyspace.PENDING_VALUES_FIELD,
            )
        return live + pipe.execute()

    fields = redis_call(read)
    values, oldest = 0, None
    for since, count in fields:
        if count is not None:
            values += int(count)
        if since is not None and (oldest is None or int(since) < oldest):
            oldest = int(since)
    return PendingState(values, oldest)


def latest_boundary_ms(*, counters: list[CounterConfig], now_ms: int) -> int | None:
    """The most recent period boundary any periodic counter has passed (what the archive must close)."""
    now = clock.from_ms(now_ms)
    starts = [periods.window_at(c.period, c.time_zone, now).start for c in counters if c.period != periods.NONE]
    return max((clock.to_ms(s) for s in starts), default=None)


def exported_counters(*, counters: dict[tuple[int, str], CounterConfig], apps: dict[str, int]) -> list[CounterConfig]:
    """The counters of METRICS_COUNTERS: public, not per player, at most METRICS_COUNTERS_MAX."""
    chosen: dict[int, CounterConfig] = {}
    for app_slug, name in settings.METRICS_COUNTERS:
        app_id = apps.get(app_slug)
        if app_id is None:
            continue
        if name == ALL:
            matches = [c for (a, _), c in sorted(counters.items()) if a == app_id]
        else:
            matches = [c for c in (counters.get((app_id, name)),) if c is not None]
        for counter in matches:
            if counter.public and not counter.is_user_scoped:
                chosen.setdefault(counter.id, counter)
    return list(chosen.values())[: settings.METRICS_COUNTERS_MAX]


class StoreCollector(Collector):
    def collect(self):
        up = GaugeMetricFamily(f"{PREFIX}_store_up", "1 if Redis answered this scrape's reads, else 0.")
        snapshot = config_cache.get()
        now_ms = clock.to_ms(clock.now())
        try:
            # Every shard of a split counter has its own pending hash (docs/splitting.md).
            units = [u for cid in sorted(snapshot.counters_by_id) for u in split.units(snapshot.counters_by_id[cid])]
            pending = pending_state(counter_ids=units)
            done = redis_call(lambda r: r.get(keyspace.ARCHIVE_DONE_KEY))
            exported = exported_counters(counters=snapshot.counters, apps=snapshot.apps_by_slug)
            values = selectors.counter_values_get(items=[(c, "") for c in exported]) if exported else []
        except StoreUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 0 if any(v.degraded for v in values) else 1)
        yield up

        lag = 0.0 if pending.oldest_ms is None else max(0, now_ms - pending.oldest_ms) / 1000
        yield GaugeMetricFamily(
            f"{PREFIX}_flush_lag_seconds",
            "Age of the oldest delta not yet written to PostgreSQL (0 when nothing is pending).",
            value=lag,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_flush_pending_deltas",
            "Values changed in Redis whose delta is not yet written to PostgreSQL (one delta per value).",
            value=pending.values,
        )

        boundary = latest_boundary_ms(counters=list(snapshot.counters_by_id.values()), now_ms=now_ms)
        done_ms = int(done) if done is not None else None
        late = boundary is not None and (done_ms is None or done_ms < boundary)
        yield GaugeMetricFamily(
            f"{PREFIX}_archive_lag_seconds",
            "How long the latest period boundary has waited for an archive run (0 once archived).",
            value=max(0, now_ms - boundary) / 1000 if late else 0.0,
        )
        if done_ms is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_archive_last_success_timestamp_seconds",
                "Start time (Unix seconds) of the last archive run that completed.",
                value=done_ms / 1000,
            )

        family = GaugeMetricFamily(
            f"{PREFIX}_counter_value",
            "Current value of the public counters listed in METRICS_COUNTERS.",
            labels=["app", "counter"],
        )
        for view in values:
            family.add_metric([view.counter.app_slug, view.counter.name], view.value)
        yield family
