"""The hot endpoints, answered as the DRF views answer them (``counters.apis``, ``counters.functions``).

Each handler runs the view's own helpers in the view's order (key, app, name, counter, permission,
body), awaits Redis and PostgreSQL through ``fastlane.services``, and renders through the one error
path. Requests the lane does not own (other methods, other hosts, other paths) never reach here.
"""

import contextlib
import functools
import re
from datetime import datetime

import orjson
from django.core.signals import setting_changed
from django.urls import Resolver404, resolve
from django.utils import translation

from metrics.middleware import UNMATCHED
from metrics.recorders import RequestMeter, Stopwatch, request_meter, surface_of

from .. import apis, auth, clock, functions, presence, selectors
from ..api_errors import error_response
from ..config import cache as config_cache
from ..config import pinned
from ..errors import AuthenticationRequired, CounterError, Forbidden, InvalidParameter
from ..idempotency import META_HEADER, REPLAYED_HEADERS, idempotency_parse, request_idempotency
from ..permissions import Role, check_read, check_write
from ..rendering import body_json, request_json
from ..serializers import batch_updates_parse, heartbeat_input_parse, presence_update_input_parse, update_input_parse
from ..services import UpdateRequest
from . import plans
from . import services as lane
from .http import LaneRequest, log_error_reply, send_json
from .snapshot import current_snapshot

DEGRADED = [(b"x-counter-source", b"database")]
# DRF adds the view's allowed methods to every reply of a function view (APIView.default_response_headers).
FUNCTION_HEADERS = [(b"allow", b"POST, OPTIONS")]
REPLAYED = [(k.lower().encode(), v.encode()) for k, v in REPLAYED_HEADERS.items()]
UPDATED = b'{"success":true,"current_value":%d}'  # CounterViewSet._update's reply, as orjson writes it


def _body(data) -> bytes:
    return orjson.dumps(data)


# --- REST v1 ----------------------------------------------------------------------------------


async def rest_read(request: LaneRequest, name: str):
    slot = plans.value_slot(request, name)
    plan = plans.value_plan(slot)  # the checks below, kept while the config stays the same
    if plan is not None:
        view = await lane.planned_value_get(plan)
        if view is not None:
            return _read_reply(apis.value_body(view), [view])
    key = auth.request_key(request)
    counter = selectors.counter_get(app_id=auth.request_app_id(request, key), name=auth.checked_name(name))
    check_read(key, counter)
    user_id = apis.checked_user_id(request.GET.get("user_id"))
    subject = user_id if counter.is_user_scoped else ""
    view = await lane.counter_value_get(counter=counter, subject=subject)
    plans.value_plan_keep(slot, counter, subject)
    return _read_reply(apis.value_body(view), [view])


def _read_reply(body: dict, views: list):
    if any(view.degraded for view in views):
        return 200, _body({**body, "degraded": True}), DEGRADED
    return 200, _body(body), []


async def _rest_update(request: LaneRequest, name: str, sign: int):
    login_slot = plans.login_slot(request, name, sign)
    slot = plans.update_slot(request, login_slot)
    kept = _kept_send(request, login_slot, slot)  # the checks below, kept while the config stays the same
    if kept is not None:
        return await kept[2](request)
    key = auth.request_key(request)
    checked = auth.checked_name(name)  # before the app, in CounterViewSet._update's order
    counter = selectors.counter_get(app_id=auth.request_app_id(request, key), name=checked)
    check_write(key, counter)
    if counter.is_presence:
        # CounterViewSet._update: a login or logout; a malformed Idempotency-Key is refused, a valid one ignored.
        request_idempotency(request, app_id=key.app_id, parts=("presence", counter.id))
        lease, metadata = presence_update_input_parse(request_json(request))
        op = presence.LOGIN if sign > 0 else presence.LOGOUT
        result = await lane.presence_update(counter=counter, op=op, leases=[lease], actor=key.prefix, metadata=metadata)
        plans.login_plan_keep(login_slot, key=key, counter=counter, op=op)
        return 200, UPDATED % result.update.new_value, []
    value, user_id, metadata = update_input_parse(request_json(request))
    idempotency = request_idempotency(
        request, app_id=key.app_id, parts=apis.update_fingerprint_parts(counter, sign * value, user_id, metadata)
    )
    update = {
        "amount": sign * value,
        "subject": user_id if counter.is_user_scoped else "",
        "user_id": user_id,
        "metadata": metadata,
    }
    result = await lane.counter_update(counter=counter, actor=key.prefix, idempotency=idempotency, **update)
    plans.update_plan_keep(slot, key=key, counter=counter, **update)
    return 200, UPDATED % result.new_value, REPLAYED if result.replayed else []


async def rest_increment(request: LaneRequest, name: str):
    return await _rest_update(request, name, 1)


async def rest_decrement(request: LaneRequest, name: str):
    return await _rest_update(request, name, -1)


_SIGNS = {rest_increment: 1, rest_decrement: -1}


def _kept_send(request: LaneRequest, login_slot: tuple | None, slot: tuple | None) -> tuple | None:
    """An increment or decrement with a kept plan (an update plan, or a login plan: the checks
    before the body), its script call queued for this loop turn's round trip: ``(reply future,
    plain, finish)``. ``plain(reply)`` is the reply body of a plain outcome, else None; ``finish``,
    a handler for ``answer``, reads any outcome (the future None: the call goes by the general path,
    a Redis Cluster or a counter that logs its operations). None, having sent nothing, when no plan
    fits (none kept, a counter no longer live). A body refused or a breaker open raises, as on the
    general path."""
    plan = plans.update_plan(slot)
    if plan is not None:
        sent = lane.planned_send(plan)
        if sent is not None:
            return sent[1], _updated, functools.partial(_kept_update_finish, plan=plan, sent=sent)
    login = plans.login_plan(login_slot)
    if login is None:
        return None
    now = clock.now()
    if not login.counter.is_live(now):
        return None
    # The plan's slot holds the content type that passed request_json's check before.
    lease, metadata = presence_update_input_parse(body_json(request.read()))
    pending = lane.planned_login_send(login, lease, now)
    finish = functools.partial(_kept_login_finish, plan=login, lease=lease, metadata=metadata, now=now, sent=pending)
    return pending, _logged_in, finish


def kept_update_send(scope, body: bytes, handler, params: dict) -> tuple | None:
    """``_kept_send`` outside a task (the web process's protocol, ``counterproject.lane_protocol``),
    under the snapshot ``answer`` would pin; None, having sent nothing, for any request that takes
    ``answer``'s way from the start (besides ``_kept_send``'s: a config check due, a body refused,
    Redis down, a call by the general path)."""
    sign = _SIGNS.get(handler)
    if sign is None:
        return None
    snapshot, due = config_cache.due()
    if due != "fresh":
        return None
    token = pinned.set(snapshot)
    try:
        request = LaneRequest(scope, body)
        login_slot = plans.login_slot(request, params["name"], sign)
        kept = _kept_send(request, login_slot, plans.update_slot(request, login_slot))
    except Exception:  # a body refused, a breaker open: nothing was sent, and answer's way answers it
        return None
    finally:
        pinned.reset(token)
    return None if kept is None or kept[0] is None else kept


def _updated(reply) -> bytes | None:
    return UPDATED % reply[2] if lane.plain_ok(reply) else None


def _logged_in(reply) -> bytes | None:
    count = lane.login_ok(reply)
    return None if count is None else UPDATED % count


def kept_reply(pending, plain) -> bytes | None:
    """The reply body of a kept update whose script call answered a plain outcome, else None."""
    if pending.cancelled() or pending.exception() is not None:
        return None
    return plain(pending.result())


async def _kept_update_finish(request: LaneRequest, plan, sent: tuple):
    return 200, UPDATED % await lane.planned_update(plan, sent=sent), []


async def _kept_login_finish(request: LaneRequest, plan, lease, metadata, now, sent):
    return 200, UPDATED % await lane.planned_login(plan, lease, metadata, now, sent=sent), []


async def rest_heartbeat(request: LaneRequest, name: str):
    """``CounterViewSet.heartbeat``: renew one player's lease, or a game server's players and node."""
    key = auth.request_key(request)
    counter = selectors.counter_get(app_id=auth.request_app_id(request, key), name=auth.checked_name(name))
    check_write(key, counter)
    presence.presence_check(counter=counter)
    leases, lease_seconds = heartbeat_input_parse(request_json(request))
    result = await lane.presence_update(
        counter=counter, op=presence.HEARTBEAT, leases=leases, lease_seconds=lease_seconds, actor=key.prefix
    )
    body = {"success": True, "current_value": result.update.new_value, "lease_seconds": result.lease_seconds}
    return 200, _body({**body, "expires_at": clock.iso_utc(result.expires_at)}), []


async def rest_read_many(request: LaneRequest):
    plan = plans.read_plan(request)  # apis.read_many_targets, kept while the config stays the same
    if plan.plain:
        numbers, degraded = await lane.planned_values_read(plan)
        return 200, plan.body(numbers, degraded), DEGRADED if degraded else []
    views = await lane.counter_values_get(items=[(c, "") for c in plan.counters])
    return _read_reply({"counters": [{"name": v.counter.name, "value": v.value} for v in views]}, views)


async def rest_batch_update(request: LaneRequest):
    key = auth.request_key(request)
    if key is None:
        raise AuthenticationRequired()
    if META_HEADER in request.META:
        raise InvalidParameter('A batch takes an idempotency key per item (its "id"), not the Idempotency-Key header.')
    app_id = auth.request_app_id(request, key)
    items = batch_updates_parse(request_json(request))
    counters = {}
    updates = []
    for index, item in enumerate(items):
        counter = counters.get(item.name)
        if counter is None:
            try:
                counter = counters[item.name] = selectors.counter_get(app_id=app_id, name=item.name)
                check_write(key, counter)
            except CounterError as exc:
                raise type(exc)(f"updates[{index}]: {exc.message}") from exc
        subject = item.user_id if counter.is_user_scoped else ""
        parts = apis.update_fingerprint_parts(counter, item.amount, item.user_id, item.metadata)
        idempotency = idempotency_parse(item.id, app_id=key.app_id, parts=parts, field=f"updates[{index}].id")
        updates.append(UpdateRequest(counter, item.amount, subject, item.user_id, item.metadata, idempotency))
    results = await lane.counter_update_many(updates=updates, actor=key.prefix)
    bodies = [apis.batch_result_body(u.counter.name, r) for u, r in zip(updates, results, strict=True)]
    replayed = all(apis._replayed(r) for r in results)
    return 200, _body({"success": True, "results": bodies}), REPLAYED if replayed else []


# --- cloud functions --------------------------------------------------------------------------


async def _function(request: LaneRequest, view: type[functions.FunctionView], call, reply=None):
    """``FunctionView.post``: parse with the view's serializer, resolve the caller and app, call.
    A call sent again by a key with the same body keeps what its checks found
    (``plans.function_plan``): an update's plan (``reply``: what it answers from its result), or
    getCounter's."""
    values = plans.function_input(request, view)  # the view's serializer, kept for a body seen before
    slot = plans.function_slot(request, view)
    plan = plans.function_plan(slot)
    if plan is not None:
        if view.keyed:
            result = await lane.planned_update(plan, whole=True)
            if result is not None:
                return _answered(request, view, *await reply(plan.counter, values, result))
        else:
            found = await lane.planned_value_get(plan)
            if found is not None:
                return _answered(request, view, _counter_data(plan.counter, found), clock.now())
    caller = auth.request_caller(request)
    app_id = functions.caller_app_id(caller, values["appId"])
    if not view.keyed:
        data = await call(caller, app_id, values, slot)
        return _answered(request, view, data, clock.now())
    request_id = values.pop("requestId", None)
    parts = (view.__name__, dict(values))
    idempotency = request_idempotency(request, app_id=app_id, parts=parts, body_key=request_id)
    return _answered(request, view, *await call(caller, app_id, values, idempotency, None if idempotency else slot))


def _answered(request: LaneRequest, view, data: dict, at: datetime, replayed: bool = False):
    """The function's envelope around ``data``, with the time of its answer (``at``)."""
    body = {"code": 0, "msg": _success(view, request.language), "timestamp": clock.to_ms(at), "data": data}
    return 200, _function_body(body), (FUNCTION_HEADERS + REPLAYED) if replayed else FUNCTION_HEADERS


# What translation costs a cloud function, kept: the language its request asks for, by the two
# headers ``get_language_from_request`` reads (the language cookie, Accept-Language), and each view's
# success message in each language. Both follow the settings (cleared on ``setting_changed``).
# Parsing the headers, switching the active language and translating the message on every call
# cost more than a REST update's own work (bench/README.md).
_languages: dict[tuple, str] = {}
_messages: dict[tuple, str] = {}


def _function_language(request: LaneRequest) -> str:
    meta = request.META
    slot = (meta.get("HTTP_COOKIE"), meta.get("HTTP_ACCEPT_LANGUAGE"))
    language = _languages.get(slot)
    if language is None:
        language = translation.get_language_from_request(request)
        if len(slot[0] or "") + len(slot[1] or "") <= plans.MAX_PLANNED_BODY:
            plans.keep(_languages, slot, language)
    return language


def _success(view: type[functions.FunctionView], language: str) -> str:
    """``str(view.success_msg)`` in ``language``, the active one."""
    slot = (view, language)
    message = _messages.get(slot)
    if message is None:
        message = _messages[slot] = str(view.success_msg)
    return message


def _translation_forget(**_) -> None:
    _languages.clear()
    _messages.clear()


setting_changed.connect(_translation_forget, dispatch_uid="counters.fastlane.handlers.translation")


def _function_body(body: dict) -> bytes:
    """``orjson.dumps(functions._times(body))``: orjson hands each datetime to ``clock.iso_ms`` as it
    writes the reply, instead of Python copying the whole reply first to convert them."""
    return orjson.dumps(body, default=_iso_ms, option=orjson.OPT_PASSTHROUGH_DATETIME)


def _iso_ms(value) -> str:
    if isinstance(value, datetime):
        return clock.iso_ms(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _target(app_id: int, values: dict):
    return selectors.counter_get_typed(app_id=app_id, counter_type=values["counterType"], name=values["counterId"])


async def _get_counter(caller, app_id: int, values: dict, slot: tuple | None) -> dict:
    counter = _target(app_id, values)
    player_id = values.get("playerId", "")
    if caller.player is not None:
        player_id = player_id or caller.player.player_id
        own = counter.is_user_scoped and player_id == caller.player.player_id
        if not (own or (counter.public and not counter.is_user_scoped)):
            message = translation.gettext("A player token reads only that player's own values and public counters.")
            raise Forbidden(message)
    else:
        check_read(caller.key, counter)
    subject = functions._subject(counter, player_id)
    view = await lane.counter_value_get(counter=counter, subject=subject)
    if caller.player is None:  # a player token expires: checked every time
        plans.function_value_plan_keep(slot, counter, subject)
    return _counter_data(counter, view)


def _counter_data(counter, view) -> dict:
    """getCounter's data."""
    return {
        "counterId": counter.name,
        "counterType": selectors.counter_type_of(counter),
        "counterName": counter.display_name or counter.name,
        "currentValue": view.value,
        "maxValue": counter.max_value,
        "resetPeriod": counter.period,
        "lastResetTime": view.last_reset,
        "nextResetTime": view.window.end,
        "updateTime": view.last_updated,
        "metadata": {"description": counter.description, "unit": counter.unit},
    }


async def _increase_counter(caller, app_id: int, values: dict, idempotency, slot: tuple | None):
    counter = _target(app_id, values)
    key = check_write(caller.require_key(), counter)
    player_id = values.get("playerId", "")
    update = {
        "amount": values["increment"],
        "subject": functions._subject(counter, player_id),
        "user_id": player_id,
        "metadata": values.get("metadata"),
    }
    result = await lane.counter_update(counter=counter, actor=key.prefix, idempotency=idempotency, **update)
    plans.function_plan_keep(slot, key=key, counter=counter, allow_negative=False, **update)
    return await _increased(counter, values, result)


async def _increased(counter, values: dict, result):
    """increaseCounter's data, its time, and whether it was replayed."""
    marks = result.threshold_marks
    if result.duplicate and counter.thresholds and not result.replayed:
        marks = await lane.threshold_marks_get(counter=counter, subject=result.subject, window=result.window)
    data = {
        "counterId": counter.name,
        "oldValue": result.old_value,
        "newValue": result.new_value,
        "increment": values["increment"],
        "updateTime": result.updated_at,
        "hitThreshold": bool(result.crossed),
        "thresholds": [
            {"value": t.value, "triggered": t.id in marks, "triggerTime": marks.get(t.id)} for t in counter.thresholds
        ],
    }
    return data, result.updated_at, result.replayed


async def _decrease_counter(caller, app_id: int, values: dict, idempotency, slot: tuple | None):
    counter = _target(app_id, values)
    key = check_write(caller.require_key(), counter)
    player_id = values.get("playerId", "")
    update = {
        "amount": -values["decrement"],
        "subject": functions._subject(counter, player_id),
        "user_id": player_id,
        "metadata": values.get("metadata"),
    }
    allow_negative = values["allowNegative"] and Role.COUNTER_MANAGE in key.roles
    result = await lane.counter_update(
        counter=counter, actor=key.prefix, allow_negative=allow_negative, idempotency=idempotency, **update
    )
    plans.function_plan_keep(slot, key=key, counter=counter, allow_negative=allow_negative, **update)
    return await _decreased(counter, values, result)


async def _decreased(counter, values: dict, result):
    """decreaseCounter's data, its time, and whether it was replayed."""
    data = {
        "counterId": counter.name,
        "oldValue": result.old_value,
        "newValue": result.new_value,
        "decrement": values["decrement"],
        "updateTime": result.updated_at,
        "reachedMinimum": result.new_value <= counter.min_value,
    }
    return data, result.updated_at, result.replayed


async def get_counter(request: LaneRequest):
    return await _function(request, functions.GetCounterView, _get_counter)


async def increase_counter(request: LaneRequest):
    return await _function(request, functions.IncreaseCounterView, _increase_counter, _increased)


async def decrease_counter(request: LaneRequest):
    return await _function(request, functions.DecreaseCounterView, _decrease_counter, _decreased)


# --- routing and the one error path -----------------------------------------------------------

_NAME = r"(?P<name>[^/]+)"
# (method, path pattern) -> (handler, error shape); the same URLs as counterproject/urls.py.
ROUTES = [
    ("GET", re.compile(rf"/api/v1/counter/{_NAME}"), rest_read, "rest"),
    ("POST", re.compile(rf"/api/v1/counter/{_NAME}/increment"), rest_increment, "rest"),
    ("POST", re.compile(rf"/api/v1/counter/{_NAME}/decrement"), rest_decrement, "rest"),
    ("POST", re.compile(rf"/api/v1/counter/{_NAME}/heartbeat"), rest_heartbeat, "rest"),
    ("GET", re.compile(r"/api/v1/counters"), rest_read_many, "rest"),
    ("POST", re.compile(r"/api/v1/counters/batch"), rest_batch_update, "rest"),
    ("POST", re.compile(r"/api/v1/functions/getCounter"), get_counter, "function"),
    ("POST", re.compile(r"/api/v1/functions/increaseCounter"), increase_counter, "function"),
    ("POST", re.compile(r"/api/v1/functions/decreaseCounter"), decrease_counter, "function"),
]


# The routes of the hot paths seen (a game sends the same few over and over; emptied when full).
_routed: dict[tuple[str, str], tuple] = {}


def route(method: str, path: str):
    """``(handler, shape, path parameters)`` of a hot request, else None (the parameters are shared
    by the requests of one path: read them, never change them)."""
    found = _routed.get((method, path))
    if found is not None:
        return found
    if not path.startswith("/api/v1/"):
        return None
    for route_method, pattern, handler, shape in ROUTES:
        if method == route_method:
            match = pattern.fullmatch(path)
            if match is not None:
                if len(_routed) >= 1000:
                    _routed.clear()
                found = _routed[method, path] = (handler, shape, match.groupdict())
                return found
    return None


# The Django route name of each handler's requests (found once): the lane's requests are counted
# under the labels Django would give them, so a dashboard does not depend on which server answered.
_ENDPOINTS: dict = {}


def _endpoint(handler, path: str) -> str:
    name = _ENDPOINTS.get(handler)
    if name is None:
        try:
            match = resolve(path)
            name = match.url_name or match.view_name or UNMATCHED
        except Resolver404:
            name = UNMATCHED
        _ENDPOINTS[handler] = name
    return name


async def serve(scope, body: bytes, send, handler, shape: str, params: dict) -> None:
    """A hot request that came through the ASGI application."""
    watch = Stopwatch()
    status, payload, extra = await answer(scope, body, handler, shape, params)
    await send_json(send, status, payload, extra)
    record(scope, handler, status, watch)


async def answer(
    scope, body: bytes, handler, shape: str, params: dict, own_task: bool = False
) -> tuple[int, bytes, list]:
    """The reply to a hot request: status, JSON body and the headers beyond those every JSON reply has.

    ``scope`` needs only the ASGI keys method, path, query_string and headers (the web process's own
    HTTP protocol, ``counterproject.lane_protocol``, passes just those). ``own_task``: the caller
    runs this request in a task of its own, whose context (the active language) ends with it.
    """
    request = LaneRequest(scope, body)
    switch = False
    if shape == "function":
        # A cloud function answers in the language its request asks for (``FunctionView.dispatch``).
        language = request.language = _function_language(request)
        if language != translation.get_language():
            if own_task:
                translation.activate(language)  # no switch back: the context goes with the task
            else:
                switch = True
    with translation.override(language) if switch else contextlib.nullcontext():
        try:
            token = pinned.set(await current_snapshot())
            try:
                return await handler(request, **params)
            finally:
                pinned.reset(token)
        except Exception as exc:
            response = error_response(exc, shape)
            extra = [(k.lower().encode(), v.encode()) for k, v in response.items() if k.lower() != "content-type"]
            if shape == "function":
                extra += FUNCTION_HEADERS
            log_error_reply(response.status_code, response.reason_phrase, request.path)
            return response.status_code, response.content, extra


# The request meter of each handler and status: a handler's surface, route name and method are its own.
_meters: dict[tuple, RequestMeter] = {}


def record(scope, handler, status: int, watch: Stopwatch) -> None:
    """The request in the request metrics, under the labels Django would give it."""
    meter = _meters.get((handler, status))
    if meter is None:
        path = scope["path"]
        meter = _meters[handler, status] = request_meter(
            surface=surface_of(path), endpoint=_endpoint(handler, path), method=scope["method"], status=status
        )
    meter.record(watch.seconds)
