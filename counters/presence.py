"""Presence counters: the value is the number of live leases (docs/presence.md).

A login opens (or renews) a lease, a heartbeat renews it, a logout closes it; a lease that is
not renewed lapses by itself, so a client or game server that dies without logging out stops
counting within one lease. Leases live in Redis only (``keyspace.PRESENCE_SCRIPT``); the count
goes through the update body like any change, so PostgreSQL gets it from the flusher and a
degraded read shows the last count flushed.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.utils.translation import gettext

from . import clock, keyspace, periods
from .config import CounterConfig
from .config import cache as config_cache
from .errors import InvalidParameter, RuleViolation
from .models import Counter
from .redis_store import StoreUnavailable, redis_call, scripts
from .values import UpdateResult, operation_log_prefix, value_hydrate

LOGIN, LOGOUT, HEARTBEAT, READ = "in", "out", "hb", "read"

# Where the presence script's arguments hold the moment of the call: ARGV[2] its time (ms) and
# ARGV[3] its minute. The items (user, session, node) come last.
MOMENT_ARG = 1

# What one heartbeat request may carry: a game server renews all its players in one round trip.
MAX_BATCH_LEASES = 1000


@dataclass(frozen=True, slots=True)
class Lease:
    """A user's lease, per session if ``session_id`` is given, carried by a node if ``node_id`` is.

    A lease with only ``node_id`` renews the node.
    """

    user_id: str = ""
    session_id: str = ""
    node_id: str = ""


@dataclass(frozen=True, slots=True)
class PresenceResult:
    update: UpdateResult
    lease_seconds: int
    expires_at: datetime


def presence_check(*, counter: CounterConfig) -> None:
    if not counter.is_presence:
        raise RuleViolation(
            gettext("Counter '%(name)s' is not a presence counter: it has no leases.") % {"name": counter.name}
        )


def presence_lease_seconds(*, counter: CounterConfig, requested: int | None = None) -> int:
    """The lease a request gets: the counter's, or the one it asks for within the allowed range."""
    if requested is None:
        return counter.lease_seconds
    low, high = Counter.MIN_LEASE_SECONDS, Counter.MAX_LEASE_SECONDS
    if isinstance(requested, bool) or not isinstance(requested, int) or not low <= requested <= high:
        raise InvalidParameter(
            gettext("lease_seconds: must be an integer from %(low)d to %(high)d.") % {"low": low, "high": high}
        )
    return requested


def _check_leases(counter: CounterConfig, op: str, leases: list[Lease]) -> None:
    if op == READ:
        return
    if not leases:
        raise RuleViolation(gettext("Give at least one user_id (or a node_id to renew a node)."))
    if len(leases) > MAX_BATCH_LEASES:
        raise InvalidParameter(
            gettext("At most %(max)d leases per request (%(count)d given).")
            % {"max": MAX_BATCH_LEASES, "count": len(leases)}
        )
    for lease in leases:
        if not lease.user_id and (op != HEARTBEAT or not lease.node_id or lease.session_id):
            raise RuleViolation(
                gettext("Counter '%(name)s' counts players online: a user_id is required.") % {"name": counter.name}
            )


def _script_call(
    counter: CounterConfig,
    *,
    op: str,
    leases: list[Lease],
    lease_seconds: int,
    now: datetime,
    window: periods.PeriodWindow,
    log: str,
) -> tuple[list[str], list]:
    ms = clock.to_ms(now)
    args = [op, ms, ms // 60000, lease_seconds * 1000, counter.presence_counts, f"{window.key}|", log]
    args.append(len(counter.thresholds))
    for t in counter.thresholds:
        args += [t.id, t.value, t.direction, t.cooldown_seconds * 1000, int(t.rearm)]
    for lease in leases:
        args += [lease.user_id, lease.session_id, lease.node_id]
    return keyspace.presence_keys(counter.id, window.key), args


def _result(counter: CounterConfig, window: periods.PeriodWindow, reply: list, now: datetime) -> UpdateResult:
    # Crossed thresholds and marks come only for a counter with thresholds.
    crossed = tuple(int(t) for t in reply[3]) if len(reply) > 3 else ()
    flat = reply[4] if len(reply) > 4 else []
    marks = {int(flat[i]): clock.from_ms(int(flat[i + 1])) for i in range(0, len(flat), 2)}
    return UpdateResult(
        counter=counter,
        subject="",
        window=window,
        old_value=int(reply[1]),
        new_value=int(reply[2]),
        duplicate=False,
        crossed=crossed,
        threshold_marks=marks,
        updated_at=now,
    )


@dataclass(frozen=True, slots=True)
class PresenceCall:
    """A checked presence operation: the script's keys and arguments, and what its reply is read with."""

    counter: CounterConfig
    keys: list[str]
    args: list
    window: periods.PeriodWindow
    now: datetime
    lease_seconds: int

    def result(self, reply: list) -> PresenceResult:
        update = _result(self.counter, self.window, reply, self.now)
        return PresenceResult(update, self.lease_seconds, self.now + timedelta(seconds=self.lease_seconds))


def presence_prepare(
    *,
    counter: CounterConfig,
    op: str,
    leases: list[Lease],
    lease_seconds: int | None = None,
    actor: str = "",
    metadata: dict | None = None,
) -> PresenceCall:
    """Every check of ``presence_update`` and its script call, nothing sent (the fast lane awaits it)."""
    presence_check(counter=counter)
    _check_leases(counter, op, leases)
    lease_seconds = presence_lease_seconds(counter=counter, requested=lease_seconds)
    now = clock.now()
    window = periods.window_at(counter.period, counter.time_zone, now)
    log = ""
    if counter.log_operations and op in (LOGIN, LOGOUT) and len(leases) == 1:
        ms = clock.to_ms(now)
        log = operation_log_prefix(
            actor=actor, user_id=leases[0].user_id, subject="", period=window.key, ms=ms, metadata=metadata
        )
    keys, args = _script_call(
        counter, op=op, leases=leases, lease_seconds=lease_seconds, now=now, window=window, log=log
    )
    return PresenceCall(counter, keys, args, window, now, lease_seconds)


def presence_update(
    *,
    counter: CounterConfig,
    op: str,
    leases: list[Lease],
    lease_seconds: int | None = None,
    actor: str = "",
    metadata: dict | None = None,
) -> PresenceResult:
    """Log in, heartbeat or log out ``leases`` (or only sweep, for ``READ``) in one round trip.

    Lapsed leases are dropped first, in the same script; the result's ``new_value`` is the count
    of live leases right after the operation. Without Redis the leases cannot be known: the
    store error propagates (503, read-only), even in write-through mode.
    """
    call = presence_prepare(
        counter=counter, op=op, leases=leases, lease_seconds=lease_seconds, actor=actor, metadata=metadata
    )
    for _ in range(3):
        reply = redis_call(lambda r: scripts.presence(keys=call.keys, args=call.args, client=r))
        if reply[0] != b"HYDRATE":
            return call.result(reply)
        value_hydrate(counter=counter, subject="", window=call.window)
    raise StoreUnavailable("value could not be hydrated")


def presence_login_op(*, counter: CounterConfig, amount: int) -> str:
    """What an increment (login) or decrement (logout) of a presence counter does; the amount must be 1."""
    if abs(amount) != 1:
        raise RuleViolation(
            gettext("Counter '%(name)s' counts live leases: a login or logout is always 1.") % {"name": counter.name}
        )
    return LOGIN if amount > 0 else LOGOUT


def presence_read_call(
    *, counter: CounterConfig, window: periods.PeriodWindow, now: datetime
) -> tuple[list[str], list]:
    """The keys and arguments of a sweeping count of a presence counter (no lease changes)."""
    return _script_call(counter, op=READ, leases=[], lease_seconds=0, now=now, window=window, log="")


def presence_read_pipeline(
    *, pipe: redis.client.Pipeline, counter: CounterConfig, window: periods.PeriodWindow, now: datetime
) -> None:
    """Queue a sweeping count of a presence counter in a read pipeline (``presence_read_reply`` reads it)."""
    keys, args = presence_read_call(counter=counter, window=window, now=now)
    pipe.execute_command("EVALSHA", scripts.presence.sha, len(keys), *keys, *args)


def presence_read_reply(*, counter: CounterConfig, window: periods.PeriodWindow, reply, now: datetime) -> UpdateResult:
    """The count from a ``presence_read_pipeline`` reply; a cold value or a Redis that lost the
    script is answered by a call of its own (which hydrates or loads it)."""
    result = presence_read_counted(counter=counter, window=window, reply=reply, now=now)
    return result if result is not None else presence_update(counter=counter, op=READ, leases=[]).update


def presence_read_counted(
    *, counter: CounterConfig, window: periods.PeriodWindow, reply, now: datetime
) -> UpdateResult | None:
    """The count from a sweeping count's reply (a read pipeline's, or the fast lane's round trip),
    or None when the read needs a call of its own: a cold value (hydrated first) or a Redis that
    lost the script (loaded first). Any other error reply is raised."""
    if isinstance(reply, BaseException):
        if not isinstance(reply, redis.exceptions.NoScriptError):
            raise reply
        return None
    if reply[0] == b"HYDRATE":
        return None
    return _result(counter, window, reply, now)


def presence_sweep() -> int:
    """Drop lapsed leases of every presence counter, so that counters nobody reads or writes
    still come down (and the flusher persists it); returns how many counters changed."""
    changed = 0
    for counter in config_cache.get().counters_by_id.values():
        if counter.is_presence and counter.is_live(clock.now()):
            result = presence_update(counter=counter, op=READ, leases=[]).update
            changed += result.new_value != result.old_value
    return changed
