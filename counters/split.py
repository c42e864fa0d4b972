"""Hot-counter splitting: one counter's value spread over N shards, each under its own hash tag.

A counter with ``shards`` = N > 1 keeps each of its values as N value hashes: shard 0 under the
counter's own keys, shard k under the unit ``{c<id>s<k>}`` (``keyspace.unit``), which a Redis
Cluster puts in another slot and so, usually, on another node. Each update runs the ordinary update
script on one shard; a read sums the shards (one HMGET each, in one round trip per node); the
flusher moves each shard's delta like a counter's and adds it to the value's one PostgreSQL row, in
the same transaction as the shard's own ``CounterValueShard`` row, whose version makes that
exactly once (shard 0 uses ``CounterValue.version``, as an unsplit counter does).

Which shard an update goes to:

- a unique-member counter: the member's (a CRC of its name), so each member is always counted in
  the same shard's member set and counted once, exactly;
- an update with an Idempotency-Key: the key's, so a retry meets its record;
- any other update: a random shard.

What a split counter cannot keep exactly is refused (``Counter._clean_shards``, and decrements
below a lower bound at update time); thresholds are detected by the flusher from the totals it
writes (``docs/splitting.md``).
"""

import random
import zlib

from django.db.models import OuterRef, Subquery, Sum
from django.utils.translation import gettext

from . import keyspace
from .config import CounterConfig
from .errors import RuleViolation
from .models import CounterValueShard


def shard_of(counter: CounterConfig, *, member: str = "", idempotency=None, chosen: int | None = None) -> int:
    """The shard an update of ``counter`` goes to (0 for a counter that is not split); ``chosen``
    instead of a random one (a batch sends its plain updates of a counter to one shard: one script
    call, and its replies count up one by one)."""
    n = counter.shards
    if n <= 1:
        return 0
    if member:
        return zlib.crc32(member.encode()) % n
    if idempotency is not None:
        return zlib.crc32(f"{idempotency.app_id}:{idempotency.key}".encode()) % n
    return random.randrange(n) if chosen is None else chosen


def units(counter: CounterConfig) -> list[keyspace.Unit]:
    """Every shard's unit of keys, shard 0 (the counter's own) first."""
    return [keyspace.unit(counter.id, k) for k in range(counter.shards)]


def value_keys(counter: CounterConfig, period: str, subject: str) -> list[str]:
    """The value hash of each shard of one value, shard 0 first."""
    return [keyspace.value_key(u, period, subject) for u in units(counter)]


def check_update(counter: CounterConfig, *, amount: int, low: int) -> None:
    """A decrement of a split counter with a lower bound is refused: each shard would check the
    bound against its own share only."""
    if amount < 0 and counter.shards > 1 and low > -keyspace.MAX_SAFE_VALUE:
        raise RuleViolation(
            gettext(
                "Counter '%(name)s' is split over %(n)d shards and has a lower bound: it counts up only "
                "(allow negative values to decrement it)."
            )
            % {"name": counter.name, "n": counter.shards}
        )


def check_reset(counter: CounterConfig) -> None:
    if counter.shards > 1:
        raise RuleViolation(
            gettext("Counter '%(name)s' is split over %(n)d shards: it cannot be reset to a value in one step.")
            % {"name": counter.name, "n": counter.shards}
        )


def combine(raws: list) -> list:
    """One value's ``[v, upd, rst]`` from its shards' HMGETs (shard 0 first): the sum, the latest
    update, shard 0's reset time. None if a shard is not hydrated."""
    total, updated = 0, 0
    for raw in raws:
        if raw[0] is None:
            return [None, None, None]
        total += int(raw[0])
        if raw[1] is not None:
            updated = max(updated, int(raw[1]))
    return [total, updated or None, raws[0][2]]


def shard_base(*, counter_id: int, subject: str, period: str, shard: int, row) -> tuple[int, int, int] | None:
    """``(value, operations, version)`` of one shard as PostgreSQL has it, from the value's row
    ``(value, operations, version)`` (None if it has none).

    A shard k > 0 has its ``CounterValueShard`` row (none: nothing flushed yet, all zero). Shard 0
    has the rest of the total: the row minus every other shard's, at the row's version. Called under
    the row's lock, or before any shard could have been flushed (no row), so the two reads agree.
    """
    if shard:
        found = (
            CounterValueShard.objects.filter(counter_id=counter_id, subject=subject, period=period, shard=shard)
            .values_list("value", "operations", "version")
            .first()
        )
        return found or (0, 0, 0)
    if row is None:
        return None
    sums = CounterValueShard.objects.filter(counter_id=counter_id, subject=subject, period=period).aggregate(
        v=Sum("value"), o=Sum("operations")
    )
    return row[0] - (sums["v"] or 0), row[1] - (sums["o"] or 0), row[2]


SUM_FIELDS = ("shards_value", "shards_ops")


def with_shard_sums(values):
    """A ``CounterValue`` queryset annotated with what shards k > 0 hold of each row (``SUM_FIELDS``)."""
    shard_rows = CounterValueShard.objects.filter(
        counter_id=OuterRef("counter_id"), subject=OuterRef("subject"), period=OuterRef("period")
    ).values("counter_id")
    return values.annotate(
        shards_value=Subquery(shard_rows.annotate(total=Sum("value")).values("total")),
        shards_ops=Subquery(shard_rows.annotate(total=Sum("operations")).values("total")),
    )


def member_in_shard(counter: CounterConfig, member: str, shard: int) -> bool:
    return shard_of(counter, member=member) == shard
