"""What a read of several counters (GET /api/v1/counters?names=...) needs besides their values, kept
from one request to the next while the config snapshot stays the same.

A board or a game client polls the same names over and over. What the view checks before it reads
(the names, the app, each counter, the permission, no per-player counter: ``apis.read_many_targets``)
depends only on the config snapshot, the caller's key (or the app of a public read) and the names
as given; what it sends to Redis depends on those and the period windows. A plan keeps both for a
request that passed every check: the counters, each one's part of the reply, and the HMGETs of the
windows it last read, packed. Only time can change the outcome under one snapshot: a temporary
counter expires, so liveness is checked again on every request, and a window that turned sends new
commands. The plans go with their snapshot: a key revoked, a counter made private or deleted applies
at the same moment as on every other path. The checks themselves are ``read_many_targets``: a plan
is made by calling it, and any request the plan does not fit (an expired counter) calls it again for
its error.

A GET of ten names spent about 4 µs per name in those steps, most of what it costs over a GET of one
(bench/README.md).
"""

import hiredis
import orjson

from .. import apis, auth, clock, keyspace, periods, values
from ..config import CounterConfig
from ..config import cache as config_cache

# At most this many plans per worker (names lists times callers); past it they are made afresh.
MAX_PLANS = 1000


class ReadPlan:
    """The checked counters of one names list for one caller, and how to read and show them."""

    __slots__ = ("_commands", "counters", "expiring", "fragments", "key", "plain", "zone_of", "zones")

    def __init__(self, key, counters: list[CounterConfig]) -> None:
        self.key = key
        self.counters = counters
        self.expiring = [c for c in counters if c.expires_at is not None]
        # Plain values (one hash each) are read by the plan; presence and split counters take the
        # general read (``fastlane.services.counter_values_get``).
        self.plain = all(not c.is_presence and c.shards <= 1 for c in counters)
        zones: dict[tuple[str, str], int] = {}
        self.zone_of = [zones.setdefault((c.period, c.time_zone), len(zones)) for c in counters]
        self.zones = list(zones)
        # Each counter's part of the reply, as orjson writes {"name": ..., "value": ...} (names hold no "%").
        self.fragments = [b'{"name":%s,"value":%%d}' % orjson.dumps(c.name).replace(b"%", b"%%") for c in counters]
        self._commands: tuple | None = None  # (window keys, commands, packed) of the last read

    def windows(self, now) -> list[periods.PeriodWindow]:
        """Each counter's window at ``now`` (counters of one period and time zone share theirs)."""
        zone_windows = [periods.window_at(period, zone, now) for period, zone in self.zones]
        return [zone_windows[i] for i in self.zone_of]

    def commands(self, windows: list[periods.PeriodWindow]) -> tuple[tuple, bytes]:
        """The HMGET of each value in its window, and the same packed for the wire."""
        window_keys = tuple(w.key for w in windows)
        last = self._commands
        if last is None or last[0] != window_keys:
            fields = values.VALUE_FIELDS
            commands = tuple(
                ("HMGET", keyspace.value_key(c.id, key, ""), *fields)
                for c, key in zip(self.counters, window_keys, strict=True)
            )
            last = self._commands = (window_keys, commands, b"".join(map(hiredis.pack_command, commands)))
        return last[1], last[2]

    def body(self, numbers: list[int], degraded: bool) -> bytes:
        """The reply's JSON, byte for byte as the view renders it."""
        listed = b",".join([fragment % n for fragment, n in zip(self.fragments, numbers, strict=True)])
        return b'{"counters":[%s]%s}' % (listed, b',"degraded":true' if degraded else b"")


_plans: dict[tuple, ReadPlan] = {}
_snapshot = None  # the snapshot the plans were made under


def read_plan(request) -> ReadPlan:
    """The plan of a GET /api/v1/counters request, its checks passed (else their error is raised)."""
    global _plans, _snapshot
    key = auth.request_key(request)
    app_id = auth.request_app_id(request, key)
    snapshot = config_cache.get()
    if snapshot is not _snapshot:
        _plans, _snapshot = {}, snapshot
    slot = (id(key), app_id, request.GET.get("names", ""))
    plan = _plans.get(slot)
    if plan is not None and plan.key is key:
        if not plan.expiring:
            return plan
        now = clock.now()
        if all(c.is_live(now) for c in plan.expiring):
            return plan
    plan = ReadPlan(key, apis.read_many_targets(request))
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[slot] = plan
    return plan
