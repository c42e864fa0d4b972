"""REST v1: the exact request and response shapes of docs/requirements.md."""

import orjson
from django.db import connection
from django.http import HttpResponse, JsonResponse
from rest_framework import viewsets
from rest_framework.response import Response
from rest_framework.views import APIView

from . import clock, presence, selectors, services
from .api_errors import error_response
from .auth import checked_name, request_app_id, request_key
from .clock import iso_utc
from .config import KeyConfig
from .errors import AuthenticationRequired, CounterError, InvalidParameter, RuleViolation
from .idempotency import META_HEADER, REPLAYED_HEADER, REPLAYED_HEADERS, idempotency_parse, request_idempotency
from .permissions import check_manage, check_read, check_write
from .redis_store import StoreUnavailable, breaker, redis_call
from .rendering import json_response, request_json
from .serializers import (
    SUBJECT_PATTERN,
    ResetInputSerializer,
    batch_updates_parse,
    heartbeat_input_parse,
    presence_update_input_parse,
    update_input_parse,
)
from .values import UpdateResult


def checked_user_id(raw: str | None) -> str:
    if raw is None:
        return ""
    if not SUBJECT_PATTERN.match(raw):
        raise InvalidParameter("user_id: use 1-64 letters, digits, '_', '.', ':', '@' or '-'.")
    return raw


def read_response(body: dict, views: list[selectors.ValueView]) -> HttpResponse:
    """A read reply; when Redis was down, it says the values came from PostgreSQL."""
    if any(view.degraded for view in views):
        return json_response({**body, "degraded": True}, headers={"X-Counter-Source": "database"})
    return json_response(body)


def value_body(view: selectors.ValueView) -> dict:
    body = {"name": view.counter.name, "value": view.value, "last_updated": iso_utc(view.last_updated)}
    if view.last_reset is not None:
        body["last_reset"] = iso_utc(view.last_reset)
    if view.window.start is not None:
        body["next_reset"] = iso_utc(view.window.end)
    return body


def lean(handler):
    """Marks a handler that ``LeanDispatch`` calls with Django's own request."""
    handler.lean = True
    return handler


class LeanDispatch:
    """DRF views (so that the OpenAPI schema describes them) whose hot handlers skip DRF's cycle.

    DRF's dispatch wraps the request, negotiates the renderer, runs the authentication,
    permission, throttling and versioning hooks (all empty here) and finalizes a template
    response; on the hot path that cost as much as the Redis round trip (bench/README.md). A
    ``@lean`` handler gets Django's request, parses with ``request_json`` and answers with
    ``json_response``; its errors are rendered by the one error path. Everything else (reset,
    405, OPTIONS) goes through DRF as before.
    """

    error_shape = "rest"

    def dispatch(self, request, *args, **kwargs):
        handler = getattr(self, request.method.lower(), None)
        if not getattr(handler, "lean", False):
            return super().dispatch(request, *args, **kwargs)
        try:
            return handler(request, *args, **kwargs)
        except Exception as exc:
            return error_response(exc, self.error_shape)


class CounterViewSet(LeanDispatch, viewsets.ViewSet):
    """One counter: read it, increment, decrement, reset."""

    def _counter(self, request, name: str, key: KeyConfig | None):
        return selectors.counter_get(app_id=request_app_id(request, key), name=checked_name(name))

    @lean
    def retrieve(self, request, name: str) -> HttpResponse:
        key = request_key(request)
        counter = self._counter(request, name, key)
        check_read(key, counter)
        user_id = checked_user_id(request.GET.get("user_id"))
        subject = user_id if counter.is_user_scoped else ""
        view = selectors.counter_value_get(counter=counter, subject=subject)
        return read_response(value_body(view), [view])

    def _update(self, request, name: str, sign: int) -> HttpResponse:
        key = request_key(request)
        counter = self._counter(request, checked_name(name), key)
        check_write(key, counter)
        if counter.is_presence:
            # A malformed Idempotency-Key is refused as anywhere; a valid one is not needed here.
            request_idempotency(request, app_id=key.app_id, parts=("presence", counter.id))
            lease, metadata = presence_update_input_parse(request_json(request))
            result = presence.presence_update(
                counter=counter,
                op=presence.LOGIN if sign > 0 else presence.LOGOUT,
                leases=[lease],
                actor=key.prefix,
                metadata=metadata,
            )
            return json_response({"success": True, "current_value": result.update.new_value})
        value, user_id, metadata = update_input_parse(request_json(request))
        idempotency = request_idempotency(
            request, app_id=key.app_id, parts=update_fingerprint_parts(counter, sign * value, user_id, metadata)
        )
        result = services.counter_update(
            counter=counter,
            amount=sign * value,
            subject=user_id if counter.is_user_scoped else "",
            user_id=user_id,
            actor=key.prefix,
            metadata=metadata,
            idempotency=idempotency,
        )
        body = {"success": True, "current_value": result.new_value}
        return json_response(body, headers=REPLAYED_HEADERS if result.replayed else None)

    @lean
    def increment(self, request, name: str) -> HttpResponse:
        return self._update(request, name, 1)

    @lean
    def decrement(self, request, name: str) -> HttpResponse:
        return self._update(request, name, -1)

    @lean
    def heartbeat(self, request, name: str) -> HttpResponse:
        """Renew (or open again) presence leases: one player's, or a game server's players and node."""
        key = request_key(request)
        counter = self._counter(request, name, key)
        check_write(key, counter)
        presence.presence_check(counter=counter)
        leases, lease_seconds = heartbeat_input_parse(request_json(request))
        result = presence.presence_update(
            counter=counter, op=presence.HEARTBEAT, leases=leases, lease_seconds=lease_seconds, actor=key.prefix
        )
        body = {"success": True, "current_value": result.update.new_value, "lease_seconds": result.lease_seconds}
        return json_response({**body, "expires_at": iso_utc(result.expires_at)})

    def reset(self, request, name: str) -> Response:
        data = ResetInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = request_key(request, body_token=data.validated_data.get("admin_token"))
        counter = self._counter(request, name, key)
        check_manage(key, counter)
        user_id = data.validated_data.get("user_id", "")
        reset_value, reason = data.validated_data.get("reset_value"), data.validated_data["reason"]
        parts = ("reset", counter.id, user_id, reset_value, reason)
        result = services.counter_reset(
            counter=counter,
            subject=user_id if counter.is_user_scoped else "",
            value=reset_value,
            reason=reason,
            operator=f"api-key:{key.prefix}",
            idempotency=request_idempotency(request, app_id=key.app_id, parts=parts),
        )
        body = {"success": True, "current_value": result.new_value, "previous_value": result.old_value}
        return Response(body, headers=REPLAYED_HEADERS if result.replayed else None)


class CounterBatchView(LeanDispatch, APIView):
    """GET /api/v1/counters?names=a,b (1 to 10 names)."""

    @lean
    def get(self, request) -> HttpResponse:
        counters = read_many_targets(request)
        views = selectors.counter_values_get(items=[(c, "") for c in counters])
        return read_response({"counters": [{"name": v.counter.name, "value": v.value} for v in views]}, views)


def read_many_targets(request) -> list:
    """The counters of GET /api/v1/counters?names=a,b, checked in the view's order: names, app,
    counters, permission, per-player counters refused (the fast lane and the streams use it too)."""
    key = request_key(request)
    app_id = request_app_id(request, key)
    names = [checked_name(n) for n in selectors.parse_names(request.GET.get("names", ""))]
    now = clock.now()
    counters = [selectors.counter_get(app_id=app_id, name=n, now=now) for n in names]
    for counter in counters:
        check_read(key, counter)
        if counter.is_user_scoped:
            raise RuleViolation(f"Counter {counter.name!r} is per player: read it with GET /counter/{{name}}.")
    return counters


def stream_targets(request) -> tuple[list, int]:
    """The counters a stream (GET /api/v1/stream) watches and the id its events continue from.

    Exactly the checks of GET /api/v1/counters (names, app, permissions, per-player counters),
    then the ``Last-Event-ID`` a reconnecting client sends (the last id it saw; 0 without one).
    """
    return read_many_targets(request), stream_last_event_id(request.META.get("HTTP_LAST_EVENT_ID"))


STREAM_MAX_EVENT_ID = 2**53 - 1


def stream_last_event_id(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16 and int(raw) <= STREAM_MAX_EVENT_ID):
        raise InvalidParameter("Last-Event-ID: give the id of the last event received (an integer).")
    return int(raw)


def stream_event(event_id: int, name: str, value: int, *, degraded: bool = False) -> bytes:
    """One server-sent event: a counter's value, with the id a reconnecting client resumes from."""
    data = {"name": name, "value": value, "degraded": True} if degraded else {"name": name, "value": value}
    return b"id: %d\ndata: %s\n\n" % (event_id, orjson.dumps(data))


STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
# Served by Django (the fast lane off): the current values, then the stream ends and the browser
# reconnects after this long (EventSource's ``retry``), which makes it a poll.
STREAM_RETRY_MS = 1000


class CounterStreamView(LeanDispatch, APIView):
    """GET /api/v1/stream?names=a,b: server-sent events, the current values then every change.

    The web process serves it live from ``counters.fastlane.streams``; this view answers when
    Django serves it (fast lane off, tests' live server): the current values and a ``retry``, so an
    EventSource polls.
    """

    @lean
    def get(self, request) -> HttpResponse:
        counters, last_id = stream_targets(request)
        views = selectors.counter_values_get(items=[(c, "") for c in counters])
        body = stream_polled_body(views, last_id)
        return HttpResponse(body, content_type="text/event-stream", headers=STREAM_HEADERS)


def stream_polled_body(views, last_id: int) -> bytes:
    """A stream answered once: a ``retry`` (the EventSource reconnects, with the last id) and the values."""
    body = [b"retry: %d\n\n" % STREAM_RETRY_MS]
    for i, view in enumerate(views, start=last_id + 1):
        body.append(stream_event(i, view.counter.name, view.value, degraded=view.degraded))
    return b"".join(body)


class CounterBatchUpdateView(LeanDispatch, APIView):
    """POST /api/v1/counters/batch: many increments/decrements, of several counters, in one request.

    The whole request is checked first (shape, names, permissions: any error refuses it all and
    changes nothing); then every item applies in order in one Redis round trip. A bounds refusal
    (4005) is per item: the item changes nothing, the others apply.

    Idempotency is per item: an item's ``id`` is its Idempotency-Key (checked and recorded in its
    counter's script, so a batch stays one script per counter slot). A retried batch replays the
    items that carry an id and applies the others; ``Idempotent-Replayed: true`` when every item
    was replayed. The Idempotency-Key header is refused here (it would name the whole batch).
    """

    @lean
    def post(self, request) -> HttpResponse:
        key = request_key(request)
        if key is None:
            raise AuthenticationRequired()
        if META_HEADER in request.META:
            raise InvalidParameter(
                'A batch takes an idempotency key per item (its "id"), not the Idempotency-Key header.'
            )
        app_id = request_app_id(request, key)
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
            parts = update_fingerprint_parts(counter, item.amount, item.user_id, item.metadata)
            idempotency = idempotency_parse(item.id, app_id=key.app_id, parts=parts, field=f"updates[{index}].id")
            updates.append(
                services.UpdateRequest(counter, item.amount, subject, item.user_id, item.metadata, idempotency)
            )
        results = services.counter_update_many(updates=updates, actor=key.prefix)
        bodies = [batch_result_body(u.counter.name, r) for u, r in zip(updates, results, strict=True)]
        replayed = all(_replayed(r) for r in results)
        return json_response({"success": True, "results": bodies}, headers=REPLAYED_HEADERS if replayed else None)


def _replayed(result: UpdateResult | CounterError) -> bool:
    if isinstance(result, CounterError):
        return REPLAYED_HEADER in result.headers
    return result.replayed


def update_fingerprint_parts(counter, amount: int, user_id: str, metadata: dict | None) -> tuple:
    """What makes two REST updates (single or batch item) the same request for an Idempotency-Key."""
    return ("update", counter.id, amount, user_id, metadata or None)


def batch_result_body(name: str, result: UpdateResult | CounterError) -> dict:
    if isinstance(result, CounterError):
        return {"name": name, "success": False, "error": {"code": result.code, "message": result.message}}
    return {"name": name, "success": True, "current_value": result.new_value}


def healthz(request) -> JsonResponse:
    """Liveness and dependencies: 200 while PostgreSQL answers (Redis down means degraded)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        postgres = "ok"
    except Exception:
        postgres = "down"
    try:
        redis_call(lambda r: r.ping())
        redis = "ok"
    except StoreUnavailable:
        redis = "down"
    status = "ok" if postgres == redis == "ok" else ("degraded" if postgres == "ok" else "down")
    body = {"status": status, "postgres": postgres, "redis": redis, "circuit_open": breaker.is_open}
    return JsonResponse(body, status=200 if postgres == "ok" else 503)
