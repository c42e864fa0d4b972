"""The updates and reads of ``counters.services`` / ``counters.selectors``, awaiting Redis through the
coalesced round trip and running every PostgreSQL step on the pool.

Each function follows its blocking twin step for step and reuses its checks, its script arguments
and its reading of the script's reply (``_prepare_update`` / ``_update_result``): only the waits
differ.
"""

import asyncio
from collections import defaultdict

import redis
from django.conf import settings

from .. import clock, keyspace, periods, presence, selectors, services, split, values, write_through
from ..config import CounterConfig
from ..errors import CounterError, IdempotencyConflict, OutOfLimits
from ..redis_store import StoreUnavailable
from .offload import offload
from .store import lane_store


async def _reconcile_if_due() -> None:
    if write_through._reconcile_due.is_set():
        await offload(write_through.store_reconcile_if_due)


async def _hydrate(*, counter: CounterConfig, subject: str, window: periods.PeriodWindow, shard: int = 0) -> None:
    """``values.value_hydrate`` off the loop, one at a time per value: the requests that find a value
    cold while it is being loaded wait for that load instead of each queueing its own. A load also
    adds the period's unique members from PostgreSQL; a cold daily-users value hit by a burst of
    requests once queued one load per request (each re-adding every member), which kept a worker's
    CPU busy for minutes after the burst (bench/README.md)."""
    loads = lane_store().hydrating
    key = (counter.id, subject, window.key, shard)
    load = loads.get(key)
    if load is None:
        load = loads[key] = asyncio.ensure_future(
            offload(values.value_hydrate, counter=counter, subject=subject, window=window, shard=shard)
        )
        load.add_done_callback(lambda _: loads.pop(key, None))
    # Shielded: a waiter that gives up (its client left) does not cancel the others' load.
    await asyncio.shield(load)


async def _run_update(prepared: services._PreparedUpdate) -> list:
    store = lane_store()
    keys, args = services.update_call(prepared)
    for _ in range(3):
        result = await store.script("update", keys, args)
        if result[0] != b"HYDRATE":
            return result
        counter, subject, window = prepared.counter, prepared.subject, prepared.window
        await _hydrate(counter=counter, subject=subject, window=window, shard=prepared.shard)
    raise StoreUnavailable("value could not be hydrated")


async def _shard_values(counter: CounterConfig, subject: str, window: periods.PeriodWindow) -> list[list]:
    """``values.shard_values_read``: one HMGET per shard in the shared round trip (per node)."""
    store = lane_store()
    keys = split.value_keys(counter, window.key, subject)
    raws = list(await asyncio.gather(*(store.command("HMGET", key, *values.VALUE_FIELDS) for key in keys)))
    for shard, key in enumerate(keys):
        if raws[shard][0] is None:
            await _hydrate(counter=counter, subject=subject, window=window, shard=shard)
            raws[shard] = await store.command("HMGET", key, *values.VALUE_FIELDS)
    return raws


async def _run_split_update(prepared: services._PreparedUpdate) -> tuple[list, int]:
    """A split counter's update and the read of its other shards, side by side in one round trip:
    the reply and ``services.split_others``."""
    counter, subject, window = prepared.counter, prepared.subject, prepared.window
    result, raws = await asyncio.gather(
        _run_update(prepared), _shard_values(counter, subject, window), return_exceptions=True
    )
    if isinstance(result, BaseException):
        raise result
    if isinstance(raws, BaseException):
        raise services.split_read_failed(raws) from raws
    return result, services.split_others_of(prepared, raws)


async def counter_update(
    *,
    counter: CounterConfig,
    amount: int,
    subject: str = "",
    user_id: str = "",
    actor: str = "",
    metadata: dict | None = None,
    allow_negative: bool = False,
    idempotency=None,
) -> values.UpdateResult:
    """``services.counter_update``: one script call, in the worker's shared round trip."""
    if counter.is_presence:
        # services._presence_update: a login or logout of user_id (no write-through, no key).
        op = presence.presence_login_op(counter=counter, amount=amount)
        leases = [presence.Lease(user_id)]
        return (await presence_update(counter=counter, op=op, leases=leases, actor=actor, metadata=metadata)).update
    now = clock.now()
    prepared = services._prepare_update(
        counter=counter,
        amount=amount,
        subject=subject,
        user_id=user_id,
        actor=actor,
        metadata=metadata,
        allow_negative=allow_negative,
        now=now,
        idempotency=idempotency,
    )
    return await _prepared_run(prepared, amount, now)


def planned_send(plan) -> tuple | None:
    """The first half of ``planned_update``: its script call queued for this loop turn's round
    trip. None when the plan's counter is no longer live (nothing sent), else ``(now, reply)``:
    the future of the call's reply (a breaker open: its exception), or None when the plan's call
    goes by the general path (a Redis Cluster, a reconcile due, a counter that logs its operations).
    """
    now = clock.now()
    if not plan.counter.is_live(now):
        return None
    store = lane_store()
    call = None if store.cluster or write_through._reconcile_due.is_set() else plan.call(now)
    if call is None:
        return now, None
    try:
        return now, store.packed(*call)
    except StoreUnavailable as exc:
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(exc)
        return now, failed


def plain_ok(reply) -> bool:
    """Whether a script reply is a plain OK (no threshold crossed): ``[OK, old, new]``."""
    return reply is not None and len(reply) == 3 and reply[0] == b"OK"


async def planned_update(plan, *, whole: bool = False, sent: tuple | None = None):
    """The value after the update of a plan (``fastlane.plans.UpdatePlan``: checked by
    ``counter_update`` before), or with ``whole`` its ``UpdateResult``, as ``counter_update`` makes
    it; None when its counter is no longer live (the general path's error). The plan packs its own
    script call; any other outcome than a plain OK (bounds, thresholds, a value to hydrate, a script
    Redis lost, Redis down) is handled by ``counter_update``'s own code. ``sent``: what
    ``planned_send`` gave for this request, when its call went out before (the web process's
    protocol sends a kept update without a task: ``counterproject.lane_protocol``)."""
    if sent is None:
        sent = planned_send(plan)
        if sent is None:
            return None
    now, pending = sent
    result = None
    if pending is not None:
        try:
            reply = await pending
        except redis.exceptions.NoScriptError:
            reply = None  # the general path loads it
        except StoreUnavailable as exc:
            result = await _unavailable(plan.prepared(now), plan.amount, now, exc)
        else:
            if reply is not None and reply[0] != b"HYDRATE":
                if plain_ok(reply):
                    # services._update_result of a plain OK, without building the call again.
                    if not whole:
                        return reply[2]
                    return values.UpdateResult(
                        counter=plan.counter,
                        subject=plan.subject,
                        window=plan.window,
                        old_value=reply[1],
                        new_value=reply[2],
                        duplicate=False,
                        crossed=(),
                        threshold_marks={},
                        updated_at=now,
                    )
                result = services._update_result(plan.prepared(now), reply, now)
    if result is None:
        result = await _prepared_run(plan.prepared(now), plan.amount, now)
    return result if whole else result.new_value


async def _prepared_run(prepared: services._PreparedUpdate, amount: int, now) -> values.UpdateResult:
    try:
        await _reconcile_if_due()
        if prepared.counter.shards > 1:
            result, others = await _run_split_update(prepared)
        else:
            result, others = await _run_update(prepared), 0
    except StoreUnavailable as exc:
        return await _unavailable(prepared, amount, now, exc)
    return services._update_result(prepared, result, now, others)


async def _unavailable(prepared: services._PreparedUpdate, amount: int, now, exc: StoreUnavailable):
    """An update Redis did not take: written through to PostgreSQL where that is safe, else ``exc``."""
    # A key is recorded in Redis only: a keyed write is refused rather than written through.
    if settings.COUNTER_REDIS_DOWN_WRITES != "write_through" or exc.maybe_applied or prepared.idempotency:
        raise exc
    write_through.store_reconcile_mark_due()
    return await offload(
        write_through.counter_update_write_through,
        counter=prepared.counter,
        amount=amount,
        subject=prepared.subject,
        member=prepared.member,
        window=prepared.window,
        now=now,
        bounds=(prepared.low, prepared.high),
        log=prepared.log,
    )


async def presence_update(
    *,
    counter: CounterConfig,
    op: str,
    leases: list[presence.Lease],
    lease_seconds: int | None = None,
    actor: str = "",
    metadata: dict | None = None,
) -> presence.PresenceResult:
    """``presence.presence_update``: the same checks and script call, in the worker's shared round trip."""
    call = presence.presence_prepare(
        counter=counter, op=op, leases=leases, lease_seconds=lease_seconds, actor=actor, metadata=metadata
    )
    store = lane_store()
    for _ in range(3):
        reply = await store.script("presence", call.keys, call.args)
        if reply[0] != b"HYDRATE":
            return call.result(reply)
        await _hydrate(counter=counter, subject="", window=call.window)
    raise StoreUnavailable("value could not be hydrated")


def planned_login_send(plan, lease: presence.Lease, now) -> asyncio.Future | None:
    """The first half of ``planned_login``: its script call queued for this loop turn's round trip
    (the future of its reply), or None when it goes by ``presence_update``'s code (a counter that
    logs its operations, a Redis Cluster)."""
    store = lane_store()
    call = None if store.cluster else plan.call(now, lease)
    return None if call is None else store.packed(*call)


def login_ok(reply) -> int | None:
    """The count a presence script reply answers, unless it asks for the general path (HYDRATE).
    A presence reply is OK (with the crossed thresholds of a counter that has some) or HYDRATE."""
    return reply[2] if reply is not None and reply[0] == b"OK" else None


async def planned_login(plan, lease: presence.Lease, metadata: dict | None, now, sent=None) -> int:
    """The count after a login or logout of a plan (``fastlane.plans.LoginPlan``: its counter live
    at ``now``), as ``presence_update`` makes it. The plan packs its own script call (``metadata``
    goes only into the log entry of a counter that logs its operations, which the plan does not
    pack); a value to hydrate or a script Redis lost goes to ``presence_update``'s own code, and so
    does a counter that logs its operations or a Redis Cluster. ``sent``: the reply's future of a
    call ``planned_login_send`` sent before (the web process's protocol)."""
    pending = sent if sent is not None else planned_login_send(plan, lease, now)
    if pending is not None:
        try:
            reply = await pending
        except redis.exceptions.NoScriptError:
            reply = None  # the general path loads it
        count = login_ok(reply)
        if count is not None:
            return count
    counter, actor = plan.counter, plan.key.prefix
    result = await presence_update(counter=counter, op=plan.op, leases=[lease], actor=actor, metadata=metadata)
    return result.update.new_value


async def _run_update_many(prepared: list) -> list[list]:
    """``services._run_update_pipeline``: one ``update_many`` call per counter (one hash slot)."""
    store = lane_store()
    results: list = [None] * len(prepared)
    todo = list(range(len(prepared)))
    for _ in range(3):
        groups: dict[tuple[keyspace.Unit, str], list[int]] = defaultdict(list)
        for i in todo:
            groups[(prepared[i].unit, prepared[i].window.key)].append(i)
        calls = []
        for group in groups.values():
            keys, args = services.update_many_call([prepared[i] for i in group])
            calls.append(store.script("update_many", keys, args))
        retry, cold = [], {}
        for group, replies in zip(groups.values(), await asyncio.gather(*calls), strict=True):
            for i, reply in zip(group, replies, strict=True):
                if reply[0] == b"HYDRATE":
                    retry.append(i)
                    cold[prepared[i].keys[0]] = prepared[i]
                else:
                    results[i] = reply
        if not retry:
            return results
        for item in cold.values():
            counter, subject, window, shard = item.counter, item.subject, item.window, item.shard
            await _hydrate(counter=counter, subject=subject, window=window, shard=shard)
        todo = sorted(retry)
    raise StoreUnavailable("values could not be hydrated")


async def counter_update_many(
    *, updates: list[services.UpdateRequest], actor: str = "", allow_negative: bool = False
) -> list:
    """``services.counter_update_many``: every item checked first, then one script call per counter."""
    now = clock.now()
    prepared = []
    windows: dict[int, periods.PeriodWindow] = {}
    # Game servers send the same update many times in a batch (50 x "a game was played"): the
    # checks and script arguments depend only on the item and the request's time, so an item
    # equal to an earlier one (without metadata) reuses its preparation.
    seen: dict[tuple, services._PreparedUpdate] = {}
    shards: dict[int, int] = {}
    for index, update in enumerate(updates):
        counter = update.counter
        plain = update.metadata is None and update.idempotency is None
        same = (counter.id, update.amount, update.subject, update.user_id) if plain else None
        earlier = seen.get(same) if same is not None else None
        if earlier is not None:
            prepared.append(earlier)
            continue
        if counter.id not in windows:
            windows[counter.id] = periods.window_at(counter.period, counter.time_zone, now)
        try:
            item = services._prepare_update(
                counter=counter,
                amount=update.amount,
                subject=update.subject,
                user_id=update.user_id,
                actor=actor,
                metadata=update.metadata,
                allow_negative=allow_negative,
                now=now,
                window=windows[counter.id],
                idempotency=update.idempotency,
                shards=shards,
            )
        except CounterError as exc:
            raise type(exc)(f"updates[{index}]: {exc.message}") from exc
        prepared.append(item)
        if same is not None:
            seen[same] = item
    await _reconcile_if_due()
    replies = await _run_update_many(prepared)
    split_values = {(item.counter.id, item.subject): item for item in prepared if item.counter.shards > 1}
    read = [_shard_values(item.counter, item.subject, item.window) for item in split_values.values()]
    try:
        shares = dict(zip(split_values, await asyncio.gather(*read), strict=True))
    except StoreUnavailable as exc:
        raise services.split_read_failed(exc) from exc
    results = []
    for item, reply in zip(prepared, replies, strict=True):
        raws = shares.get((item.counter.id, item.subject))
        others = services.split_others_of(item, raws) if raws else 0
        try:
            results.append(services._update_result(item, reply, now, others))
        except (OutOfLimits, IdempotencyConflict) as exc:
            results.append(exc)
    return results


async def counter_values_get(*, items: list[tuple[CounterConfig, str]]) -> list[selectors.ValueView]:
    """``selectors.counter_values_get``: one HMGET per value in the shared round trip; PostgreSQL off the loop."""
    now = clock.now()
    # Counters of one period and time zone share their window (most of a 10-name read).
    by_zone: dict[tuple[str, str], periods.PeriodWindow] = {}
    windows = []
    for counter, subject in items:
        values.counter_check_subject(counter=counter, subject=subject)
        zone = (counter.period, counter.time_zone)
        window = by_zone.get(zone)
        if window is None:
            window = by_zone[zone] = periods.window_at(counter.period, counter.time_zone, now)
        windows.append(window)
    try:
        await _reconcile_if_due()
        return await _values_from_store(items, windows, now)
    except StoreUnavailable:
        return await offload(selectors.counter_values_from_database, items=items, windows=windows)


async def planned_values_read(plan) -> tuple[list[int], bool]:
    """The values of a read plan's plain counters (``fastlane.plans``), and whether they came from
    PostgreSQL (Redis unavailable): ``counter_values_get`` with the plan's commands, packed already."""
    windows = plan.windows(clock.now())
    items = [(c, "") for c in plan.counters]
    try:
        raws = await _planned_raws(items, windows, *plan.commands(windows))
        return [int(raw[0]) for raw in raws], False
    except StoreUnavailable:
        views = await offload(selectors.counter_values_from_database, items=items, windows=windows)
        return [view.value for view in views], True


async def planned_value_get(plan) -> selectors.ValueView | None:
    """The value of a GET plan (``fastlane.plans.ValuePlan``: checked by the general read before),
    as ``counter_value_get`` reads it; None when its counter is no longer live (the general path's error)."""
    now = clock.now()
    if not plan.counter.is_live(now):
        return None
    window, command, packed = plan.read_call(now)
    items, windows = [(plan.counter, plan.subject)], [window]
    try:
        [raw] = await _planned_raws(items, windows, (command,), packed)
        return selectors._to_view(plan.counter, plan.subject, window, raw)
    except StoreUnavailable:
        return (await offload(selectors.counter_values_from_database, items=items, windows=windows))[0]


async def _planned_raws(items, windows, commands: tuple, packed: bytes) -> list:
    """The replies of plain values' HMGETs (``commands``, also ``packed``) in the shared round trip, a
    cold value hydrated and read again, as ``_values_from_store`` reads them."""
    await _reconcile_if_due()
    store = lane_store()
    raws = list(await store.commands(commands, packed))
    for i, ((counter, subject), window, command, raw) in enumerate(zip(items, windows, commands, raws, strict=True)):
        if isinstance(raw, BaseException):
            raise raw
        if raw[0] is None:
            await _hydrate(counter=counter, subject=subject, window=window)
            raws[i] = await store.command(*command)
    return raws


async def _values_from_store(items, windows, now) -> list[selectors.ValueView]:
    """``selectors._values_from_store``: one HMGET per value (per shard of a split counter), or for
    a presence counter one sweeping count of its leases at the moment of the read, all in the
    shared round trip."""
    store = lane_store()
    keys = [keyspace.value_key(c.id, w.key, s) for (c, s), w in zip(items, windows, strict=True)]
    fields = values.VALUE_FIELDS
    # The plain values' HMGETs go together (one future for all of them); the others each their own call.
    plain = [i for i, (counter, _) in enumerate(items) if not counter.is_presence and counter.shards <= 1]
    if len(plain) == len(items):
        # Only plain values (a GET one, most GET 10s): their one call, awaited without a gather.
        replies = await store.commands([("HMGET", key, *fields) for key in keys])
    else:
        replies = await _mixed_replies(store, items, windows, keys, plain, now)
    views = []
    for (counter, subject), window, key, raw in zip(items, windows, keys, replies, strict=True):
        if counter.is_presence:
            # presence.presence_read_reply, awaiting the call of its own a cold value or a Redis
            # that lost the script needs (which hydrates or loads it).
            result = presence.presence_read_counted(counter=counter, window=window, reply=raw, now=now)
            if result is None:
                result = (await presence_update(counter=counter, op=presence.READ, leases=[])).update
            views.append(selectors.presence_view(counter, subject, window, result))
            continue
        if isinstance(raw, BaseException):
            raise raw
        if counter.shards > 1:
            raw = split.combine(raw)
        elif raw[0] is None:
            await _hydrate(counter=counter, subject=subject, window=window)
            raw = await store.command("HMGET", key, *fields)
        views.append(selectors._to_view(counter, subject, window, raw))
    return views


async def _mixed_replies(store, items, windows, keys, plain: list[int], now) -> list:
    """The replies of a read that mixes plain values (one call for all of them) with presence
    counters (a sweeping count each) and split counters (a read of each shard), gathered."""
    fields = values.VALUE_FIELDS
    calls = [store.commands([("HMGET", keys[i], *fields) for i in plain])] if plain else []
    for (counter, subject), window in zip(items, windows, strict=True):
        if counter.is_presence:
            keys_args = presence.presence_read_call(counter=counter, window=window, now=now)
            calls.append(store.script_now("presence", *keys_args))
        elif counter.shards > 1:
            calls.append(_shard_values(counter, subject, window))
    done = iter(await asyncio.gather(*calls, return_exceptions=True))
    replies: list = [None] * len(items)
    if plain:
        together = next(done)
        if isinstance(together, BaseException):  # the round trip failed: every plain value with it
            together = [together] * len(plain)
        for i, reply in zip(plain, together, strict=True):
            replies[i] = reply
    for i in sorted(set(range(len(items))) - set(plain)):
        replies[i] = next(done)
    return replies


async def counter_value_get(*, counter: CounterConfig, subject: str = "") -> selectors.ValueView:
    return (await counter_values_get(items=[(counter, subject)]))[0]


async def threshold_marks_get(*, counter: CounterConfig, subject: str, window: periods.PeriodWindow) -> dict:
    raw = await lane_store().command("HGETALL", keyspace.threshold_marks_key(counter.id, window.key, subject))
    return {int(k): clock.from_ms(int(v)) for k, v in _pairs(raw)}


def _pairs(raw):
    # HGETALL through a raw pipeline command comes back as a dict (redis-py's reply callback) or a flat list.
    if isinstance(raw, dict):
        return raw.items()
    return zip(raw[::2], raw[1::2], strict=True)
