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

A GET of one counter (GET /api/v1/counter/<name>) is the same with the name and the query string
(its ``user_id``, a public read's ``app``) in place of the names list: a value plan keeps the
counter and the subject its checks found, and the HMGET of the last window read, packed; the value
is read at the moment of every request. Presence and split counters take the general read.

An increment or decrement (POST /api/v1/counter/<name>/increment|decrement) is the same: a game
server sends the same body with the same key again and again, and what the view checks before its
script call (the key, the app, the name, the counter, the permission, the body, the update's own
rules: ``_rest_update`` and ``services._prepare_update``) depends only on the snapshot, the name,
the key's header, the body and its content type. An update plan keeps what those checks found, made
after an update that passed them; each request still checks the counter's liveness, takes the window
and the time of its own moment, and calls the script. The call is packed once per window, with only
the moment put in per request: building and packing the script's twenty-odd arguments and reading
the reply into an ``UpdateResult`` were about a third of a kept update's own work (bench/README.md).
A request with an Idempotency-Key, a larger body, a presence or split counter takes the general path
every time.

A login or logout (an increment or decrement of a presence counter) carries a new user_id each
time, so its body cannot be kept: a login plan keeps what the view checks before the body (the
key, the app, the name, the counter, the permission), for the caller's headers and content type.
Each request still has its body parsed and checked, the counter's liveness checked, and its own
script call, packed once per window around the moment and the lease (``LoginPlan.call``). A request
with an Idempotency-Key header takes the general path, and so does the call of a counter that logs
its operations (its log entry holds the moment, the user and the metadata).

A cloud function (getCounter, increaseCounter, decreaseCounter) keeps its input, what the view's
DRF serializer found in a body seen before (``function_input``). A call by an API key sent again
with the same headers and body keeps a plan as the REST endpoints do (``function_plan``): an
update plan for increaseCounter and decreaseCounter, a value plan for getCounter. An update with a
requestId or an Idempotency-Key is checked every time, and so is every call of a player token (it
expires): for those the caller, the app, the counter and the permission are checked each time.

A value or update plan is made the second time its request passed (the first only marks it seen), so
requests that never repeat (a new user_id each time) cost a dict entry, not a plan each.
"""

import hiredis
import orjson

from .. import apis, auth, clock, keyspace, periods, presence, services, values
from ..config import CounterConfig, KeyConfig
from ..config import cache as config_cache
from ..errors import CounterError
from ..idempotency import META_HEADER
from ..rendering import request_json
from . import store

# At most this many plans of each kind per worker (names lists, or counters and bodies, times
# callers); past it they are made afresh.
MAX_PLANS = 1000
# A body, query string or key header longer than this is checked every time: the plans' keys hold
# them as sent (in this process's memory only, as the request did).
MAX_PLANNED_BODY = 256


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


class UpdatePlan:
    """A checked increment or decrement of one counter by one caller with one body."""

    __slots__ = (
        "_call",
        "_keys",
        "_window",
        "actor",
        "amount",
        "bounds",
        "counter",
        "member",
        "metadata",
        "subject",
        "user_id",
    )

    def __init__(self, prepared: services._PreparedUpdate, *, key: KeyConfig, user_id: str, metadata) -> None:
        self.counter = prepared.counter
        self.amount = prepared.args[1]
        self.subject = prepared.subject
        self.member = prepared.member
        self.bounds = (prepared.low, prepared.high)
        self.actor = key.prefix
        self.user_id = user_id
        self.metadata = metadata
        self._window = prepared.window
        self._keys = prepared.keys
        self._call: tuple | None = None  # the packed script call of this window, around its moment

    @property
    def window(self) -> periods.PeriodWindow:
        """The window of the last ``call`` or ``prepared``."""
        return self._window

    def _window_at(self, now) -> periods.PeriodWindow:
        window = self._window
        if not window.holds(now):
            counter = self.counter
            window = self._window = periods.window_at(counter.period, counter.time_zone, now)
            self._keys = keyspace.update_keys(keyspace.unit(counter.id, 0), window.key, self.subject)
            self._call = None
        return window

    def prepared(self, now) -> services._PreparedUpdate:
        """The update's script call at ``now``, as ``services._prepare_update`` makes it."""
        return services._update_at(
            counter=self.counter,
            amount=self.amount,
            subject=self.subject,
            user_id=self.user_id,
            actor=self.actor,
            metadata=self.metadata,
            window=self._window_at(now),
            keys=self._keys,
            bounds=self.bounds,
            member=self.member,
            now=now,
        )

    def call(self, now) -> tuple[bytes, int] | None:
        """``prepared(now)``'s script call packed for the wire, and its length in arguments: only its
        moment (ms, minute) changes within a window, so the rest is packed once per window. None for
        a counter that logs its operations (its log entry holds the moment)."""
        if self.counter.log_operations:
            return None
        self._window_at(now)
        call = self._call
        if call is None:
            keys, args = services.update_call(self.prepared(now))
            call = self._call = store.script_packed_around("update", keys, args, services.UPDATE_MOMENT_ARG)
        head, tail, length = call
        return head + store.packed_moment(clock.to_ms(now)) + tail, length


class LoginPlan:
    """A checked login or logout (an increment or decrement of a presence counter) by one caller."""

    __slots__ = ("_call", "_window", "counter", "key", "op")

    def __init__(self, key: KeyConfig, counter: CounterConfig, op: str) -> None:
        self.key = key
        self.counter = counter
        self.op = op
        self._window: periods.PeriodWindow | None = None
        self._call: tuple | None = None  # the packed script call of this window, around its moment and lease

    def call(self, now, lease: presence.Lease) -> tuple[bytes, int] | None:
        """The script call ``presence.presence_prepare`` makes for ``lease`` at ``now``, packed for
        the wire, and its length in arguments: only the moment and the lease change within a
        window. None for a counter that logs its operations (its log entry holds both)."""
        counter = self.counter
        if counter.log_operations:
            return None
        window = self._window
        if window is None or not window.holds(now):
            window = self._window = periods.window_at(counter.period, counter.time_zone, now)
            self._call = None
        call = self._call
        if call is None:
            keys, args = presence._script_call(
                counter,
                op=self.op,
                leases=[lease],
                lease_seconds=counter.lease_seconds,
                now=now,
                window=window,
                log="",
            )
            call = self._call = store.script_packed_around("presence", keys, args, presence.MOMENT_ARG, last=3)
        head, tail, length = call
        items = store.packed_arguments((lease.user_id, lease.session_id, lease.node_id))
        return head + store.packed_moment(clock.to_ms(now)) + tail + items, length


class ValuePlan:
    """A checked GET of one plain counter by one caller with one query string."""

    __slots__ = ("_call", "counter", "subject")

    def __init__(self, counter: CounterConfig, subject: str) -> None:
        self.counter = counter
        self.subject = subject
        self._call: tuple | None = None  # (window, HMGET, packed) of the last window read

    def read_call(self, now) -> tuple[periods.PeriodWindow, tuple, bytes]:
        """The value's window at ``now`` and its HMGET, also packed for the wire."""
        call = self._call
        if call is None or not call[0].holds(now):
            counter = self.counter
            window = periods.window_at(counter.period, counter.time_zone, now)
            command = ("HMGET", keyspace.value_key(counter.id, window.key, self.subject), *values.VALUE_FIELDS)
            call = self._call = (window, command, hiredis.pack_command(command))
        return call


_plans: dict[tuple, ReadPlan] = {}
_value_plans: dict[tuple, ValuePlan | None] = {}  # None: seen once
_update_plans: dict[tuple, UpdatePlan | None] = {}  # None: seen once
_login_plans: dict[tuple, LoginPlan | None] = {}  # None: seen once
_function_inputs: dict[tuple, dict] = {}
_function_plans: dict[tuple, "UpdatePlan | ValuePlan | None"] = {}  # None: seen once
_snapshot = None  # the snapshot the plans were made under


def _current() -> None:
    """Drops every plan made under an earlier config snapshot."""
    global _snapshot
    snapshot = config_cache.get()
    if snapshot is not _snapshot:
        _snapshot = snapshot
        for plans in (_plans, _value_plans, _update_plans, _login_plans, _function_inputs, _function_plans):
            plans.clear()


def function_input(request, view) -> dict:
    """The cloud function's input, ``view.input_serializer``'s validated data of the request's body
    (its errors raised as the view raises them). A DRF serializer deep-copies its fields each time it
    is made, most of a cloud function's CPU (bench/README.md); what it finds depends only on the
    body and its content type, so a body seen before (a game server's same call again) takes the
    validated data found for it then. Bodies with metadata (whose limit is a setting, and which is a
    dict of its own) or longer than a plan keeps are validated every time."""
    body = request.read()
    slot = (view, request.META.get("CONTENT_TYPE"), body) if len(body) <= MAX_PLANNED_BODY else None
    found = _kept(_function_inputs, slot)
    if found is not None:
        return dict(found)
    data = view.input_serializer(data=request_json(request))
    data.is_valid(raise_exception=True)
    values = data.validated_data
    if slot is not None and "metadata" not in values:
        keep(_function_inputs, slot, dict(values))
    return values


def _kept(plans: dict, slot: tuple | None):
    """The plan kept in ``plans`` for ``slot`` under the current snapshot, if there is one."""
    if slot is None:
        return None
    _current()
    return plans.get(slot)


def keep(plans: dict, slot: tuple, plan) -> None:
    """``plan`` kept for ``slot``; a full ``plans`` (``MAX_PLANS``) is emptied first."""
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plans[slot] = plan


def _passed_before(plans: dict, slot: tuple) -> bool:
    """Whether ``slot`` passed its checks before under the current snapshot; if not, it is marked seen
    (a plan is made on a slot's second pass: requests that never repeat make none)."""
    _current()
    if slot in plans:
        return True
    keep(plans, slot, None)
    return False


def _caller(meta: dict) -> tuple | None:
    """The headers that name the caller's key, as sent; None if they are longer than a plan keeps."""
    header, api_key = meta.get("HTTP_AUTHORIZATION"), meta.get("HTTP_X_API_KEY")
    if len(header or "") + len(api_key or "") > MAX_PLANNED_BODY:
        return None
    return header, api_key


def value_slot(request, name: str) -> tuple | None:
    """What the checks of a GET of one counter depend on besides the snapshot (the plans' key);
    None for a request that is checked every time."""
    meta = request.META
    caller, query = _caller(meta), meta["QUERY_STRING"]
    if caller is None or len(query) > MAX_PLANNED_BODY:
        return None
    return (name, *caller, query)


def value_plan(slot: tuple | None) -> ValuePlan | None:
    """The plan of a GET of one counter checked before (``value_slot``), if there is one."""
    return _kept(_value_plans, slot)


def value_plan_keep(slot: tuple | None, counter: CounterConfig, subject: str) -> None:
    """After a GET of one counter that passed every check: a plan, the second time its slot is seen."""
    _value_plan_keep(_value_plans, slot, counter, subject)


def _value_plan_keep(plans: dict, slot: tuple | None, counter: CounterConfig, subject: str) -> None:
    if slot is None or counter.is_presence or counter.shards > 1:
        return
    if _passed_before(plans, slot):
        plans[slot] = ValuePlan(counter, subject)


def login_slot(request, name: str, sign: int) -> tuple | None:
    """What the checks of an increment or decrement before its body depend on besides the snapshot
    (the login plans' key); None for a request that is checked every time."""
    return _caller_slot(request, name, sign)


def _caller_slot(request, *what) -> tuple | None:
    """``what`` with the caller's headers and the content type; None for a request that is checked
    every time (an Idempotency-Key header, longer headers than a plan keeps)."""
    meta = request.META
    caller = _caller(meta)
    if caller is None or META_HEADER in meta:
        return None
    return (*what, *caller, meta.get("CONTENT_TYPE"))


def update_slot(request, login: tuple | None) -> tuple | None:
    """What an update's checks depend on besides the snapshot (the plans' key): its ``login_slot``
    and its body; None for a request that is checked every time."""
    body = request.read()
    if login is None or len(body) > MAX_PLANNED_BODY:
        return None
    return (*login, body)


def update_plan(slot: tuple | None) -> UpdatePlan | None:
    """The plan of an increment or decrement checked before (``update_slot``), if there is one."""
    return _kept(_update_plans, slot)


def update_plan_keep(slot: tuple | None, *, key: KeyConfig, counter: CounterConfig, **update) -> None:
    """After an update that passed every check and was applied (``update``: the amount, subject,
    user_id and metadata it was made with, as given to ``services._prepare_update``): a plan, the
    second time its slot is seen (a body sent once, a new user_id each time, makes none)."""
    _update_plan_keep(_update_plans, slot, key, counter, False, update)


def _update_plan_keep(plans: dict, slot, key: KeyConfig, counter: CounterConfig, allow_negative: bool, update) -> None:
    if slot is None or counter.is_presence or counter.shards > 1 or not _passed_before(plans, slot):
        return
    try:
        prepared = services._prepare_update(
            counter=counter, actor=key.prefix, allow_negative=allow_negative, now=clock.now(), **update
        )
    except CounterError:  # it expired since: the next request finds out
        return
    plans[slot] = UpdatePlan(prepared, key=key, user_id=update["user_id"], metadata=update["metadata"])


def function_slot(request, view) -> tuple | None:
    """What the checks of a cloud function's update depend on besides the snapshot (the function
    plans' key): the view, the caller's headers, the content type and the body; None for a request
    that is checked every time (an Idempotency-Key header, a larger body)."""
    return update_slot(request, _caller_slot(request, view))


def function_plan(slot: tuple | None) -> "UpdatePlan | ValuePlan | None":
    """The plan of a cloud function checked before (``function_slot``), if there is one: an update
    plan for increaseCounter and decreaseCounter, a value plan for getCounter."""
    return _kept(_function_plans, slot)


def function_value_plan_keep(slot: tuple | None, counter: CounterConfig, subject: str) -> None:
    """After a getCounter by a key that passed every check: a plan, the second time its slot is
    seen (``value_plan_keep``)."""
    _value_plan_keep(_function_plans, slot, counter, subject)


def function_plan_keep(
    slot: tuple | None, *, key: KeyConfig, counter: CounterConfig, allow_negative: bool, **update
) -> None:
    """After a cloud function's update by a key, without a requestId, that passed every check and
    was applied: a plan, the second time its slot is seen (``update_plan_keep``)."""
    _update_plan_keep(_function_plans, slot, key, counter, allow_negative, update)


def login_plan(slot: tuple | None) -> LoginPlan | None:
    """The plan of a login or logout checked before (``login_slot``), if there is one."""
    return _kept(_login_plans, slot)


def login_plan_keep(slot: tuple | None, *, key: KeyConfig, counter: CounterConfig, op: str) -> None:
    """After a login or logout that passed every check and was applied: a plan, the second time its
    slot is seen."""
    if slot is not None and _passed_before(_login_plans, slot):
        _login_plans[slot] = LoginPlan(key, counter, op)


def read_plan(request) -> ReadPlan:
    """The plan of a GET /api/v1/counters request, its checks passed (else their error is raised)."""
    key = auth.request_key(request)
    app_id = auth.request_app_id(request, key)
    _current()
    slot = (id(key), app_id, request.GET.get("names", ""))
    plan = _plans.get(slot)
    if plan is not None and plan.key is key:
        if not plan.expiring:
            return plan
        now = clock.now()
        if all(c.is_live(now) for c in plan.expiring):
            return plan
    plan = ReadPlan(key, apis.read_many_targets(request))
    keep(_plans, slot, plan)
    return plan
