"""The cloud functions (``POST /api/v1/functions/<name>``), the statistics' REST twin and
player tokens.

Every function replies ``{"code": 0, "msg", "timestamp", "data"}``; errors come from the one
exception handler in the same envelope with ``data: null``. ``msg`` follows Accept-Language
(zh-Hans, zh-Hant, en). See docs/cloud-functions.md.
"""

from dataclasses import dataclass
from datetime import datetime

from django.utils import translation
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from rest_framework.response import Response
from rest_framework.views import APIView

from . import clock, selectors, services, stats
from . import function_serializers as io
from .auth import Caller, request_caller, request_key
from .clock import iso_ms
from .config import CounterConfig
from .errors import CounterNotFound, Forbidden, RuleViolation
from .idempotency import REPLAYED_HEADERS, Idempotency, request_idempotency
from .permissions import Role, check_data_view, check_manage, check_read, check_write, require_role
from .player_tokens import player_token_issue


def _times(value):
    """Datetimes anywhere in a reply rendered in the cloud functions' format (``clock.iso_ms``)."""
    if isinstance(value, datetime):
        return iso_ms(value)
    if isinstance(value, dict):
        return {k: _times(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_times(v) for v in value]
    return value


def caller_app_id(caller: Caller, app_slug: str) -> int:
    """The app a request names; another app than the caller's is "not found", like an unknown one."""
    app_id = selectors.app_id_get(app_slug)
    if app_id is None or (caller.app_id is not None and caller.app_id != app_id):
        raise CounterNotFound(_("App '%(app)s' not found.") % {"app": app_slug})
    return app_id


def _subject(counter: CounterConfig, player_id: str) -> str:
    if not counter.is_user_scoped:
        return ""
    if not player_id:
        raise RuleViolation(_("playerId is required for user counters."))
    return player_id


@dataclass(frozen=True, slots=True)
class WriteReply:
    """A write function's data with the time of the write (the reply's ``timestamp``, so that a
    replay answers the first reply byte for byte) and whether it was replayed."""

    data: dict
    at: datetime
    replayed: bool


class FunctionView(APIView):
    """Base of the five functions: POST only, the function envelope, messages in the caller's language.

    The writes (``keyed``) take an Idempotency-Key in the header or as ``requestId`` in the body.
    """

    error_shape = "function"
    http_method_names = ["post", "options"]
    input_serializer: type = io.TargetSerializer
    success_msg = gettext_lazy("Success")
    keyed = False

    def dispatch(self, request, *args, **kwargs):
        with translation.override(translation.get_language_from_request(request)):
            return super().dispatch(request, *args, **kwargs)

    def post(self, request) -> Response:
        data = self.input_serializer(data=request.data)
        data.is_valid(raise_exception=True)
        caller = request_caller(request)
        values = data.validated_data
        app_id = caller_app_id(caller, values["appId"])
        if not self.keyed:
            result = self.call(caller, app_id, values)
            body = {"code": 0, "msg": str(self.success_msg), "timestamp": clock.to_ms(clock.now()), "data": result}
            return Response(_times(body))
        request_id = values.pop("requestId", None)
        parts = (type(self).__name__, dict(values))
        idempotency = request_idempotency(request, app_id=app_id, parts=parts, body_key=request_id)
        reply = self.call(caller, app_id, values, idempotency=idempotency)
        body = {"code": 0, "msg": str(self.success_msg), "timestamp": clock.to_ms(reply.at), "data": reply.data}
        return Response(_times(body), headers=REPLAYED_HEADERS if reply.replayed else None)

    def call(self, caller: Caller, app_id: int, values: dict, idempotency: Idempotency | None = None):
        raise NotImplementedError

    def target(self, app_id: int, values: dict) -> CounterConfig:
        return selectors.counter_get_typed(app_id=app_id, counter_type=values["counterType"], name=values["counterId"])


class GetCounterView(FunctionView):
    success_msg = gettext_lazy("Query succeeded")

    def call(self, caller: Caller, app_id: int, values: dict) -> dict:
        counter = self.target(app_id, values)
        player_id = values.get("playerId", "")
        if caller.player is not None:
            player_id = player_id or caller.player.player_id
            own = counter.is_user_scoped and player_id == caller.player.player_id
            if not (own or (counter.public and not counter.is_user_scoped)):
                raise Forbidden(_("A player token reads only that player's own values and public counters."))
        else:
            check_read(caller.key, counter)
        view = selectors.counter_value_get(counter=counter, subject=_subject(counter, player_id))
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


class IncreaseCounterView(FunctionView):
    input_serializer = io.IncreaseSerializer
    success_msg = gettext_lazy("Increased")
    keyed = True

    def call(self, caller: Caller, app_id: int, values: dict, idempotency: Idempotency | None = None) -> WriteReply:
        counter = self.target(app_id, values)
        key = check_write(caller.require_key(), counter)
        player_id = values.get("playerId", "")
        result = services.counter_update(
            counter=counter,
            amount=values["increment"],
            subject=_subject(counter, player_id),
            user_id=player_id,
            actor=key.prefix,
            metadata=values.get("metadata"),
            idempotency=idempotency,
        )
        marks = result.threshold_marks
        if result.duplicate and counter.thresholds and not result.replayed:
            marks = selectors.threshold_marks_get(counter=counter, subject=result.subject, window=result.window)
        data = {
            "counterId": counter.name,
            "oldValue": result.old_value,
            "newValue": result.new_value,
            "increment": values["increment"],
            "updateTime": result.updated_at,
            "hitThreshold": bool(result.crossed),
            "thresholds": [
                {"value": t.value, "triggered": t.id in marks, "triggerTime": marks.get(t.id)}
                for t in counter.thresholds
            ],
        }
        return WriteReply(data, result.updated_at, result.replayed)


class DecreaseCounterView(FunctionView):
    input_serializer = io.DecreaseSerializer
    success_msg = gettext_lazy("Decreased")
    keyed = True

    def call(self, caller: Caller, app_id: int, values: dict, idempotency: Idempotency | None = None) -> WriteReply:
        counter = self.target(app_id, values)
        key = check_write(caller.require_key(), counter)
        player_id = values.get("playerId", "")
        result = services.counter_update(
            counter=counter,
            amount=-values["decrement"],
            subject=_subject(counter, player_id),
            user_id=player_id,
            actor=key.prefix,
            metadata=values.get("metadata"),
            allow_negative=values["allowNegative"] and Role.COUNTER_MANAGE in key.roles,
            idempotency=idempotency,
        )
        data = {
            "counterId": counter.name,
            "oldValue": result.old_value,
            "newValue": result.new_value,
            "decrement": values["decrement"],
            "updateTime": result.updated_at,
            "reachedMinimum": result.new_value <= counter.min_value,
        }
        return WriteReply(data, result.updated_at, result.replayed)


class ResetCounterView(FunctionView):
    input_serializer = io.ResetSerializer
    success_msg = gettext_lazy("Reset done")
    keyed = True

    def call(self, caller: Caller, app_id: int, values: dict, idempotency: Idempotency | None = None) -> WriteReply:
        counter = self.target(app_id, values)
        key = check_manage(caller.require_key(), counter)
        operator = values.get("operatorId") or f"api-key:{key.prefix}"
        result = services.counter_reset(
            counter=counter,
            subject=_subject(counter, values.get("playerId", "")),
            value=values.get("resetValue"),
            reason=values["reason"],
            operator=operator if operator.startswith("api-key:") else f"{operator} (api-key:{key.prefix})",
            idempotency=idempotency,
        )
        data = {
            "counterId": counter.name,
            "oldValue": result.old_value,
            "newValue": result.new_value,
            "resetTime": result.reset_at,
            "reason": result.reason,
            "operatorId": operator,
        }
        return WriteReply(data, result.reset_at, result.replayed)


def _stats(caller: Caller, app_id: int, values: dict) -> dict:
    check_data_view(caller.require_key())
    counter_type = values.get("counterType")
    counters = stats.stats_counters(app_id=app_id, counter_type=counter_type)
    span = stats.stats_range(
        time_zone=selectors.app_time_zone_get(app_id),
        start=values.get("startDate"),
        end=values.get("endDate"),
        group_by=values["groupBy"],
    )
    return stats.counter_stats(counters=counters, span=span)


class GetCounterStatsView(FunctionView):
    input_serializer = io.StatsSerializer
    success_msg = gettext_lazy("Query succeeded")

    def call(self, caller: Caller, app_id: int, values: dict) -> dict:
        return _stats(caller, app_id, values)


class UnknownFunctionView(FunctionView):
    """Any other name under /api/v1/functions/: 4004 in the function envelope."""

    def post(self, request, name: str) -> Response:
        raise CounterNotFound(_("No such function: %(name)s.") % {"name": name})


class StatsView(APIView):
    """GET /api/v1/stats: the statistics of the key's app, in REST v1's error style."""

    error_shape = "rest"

    def get(self, request) -> Response:
        data = io.StatsQuerySerializer(data=request.query_params)
        data.is_valid(raise_exception=True)
        caller = Caller(key=request_key(request), player=None)
        key = check_data_view(caller.key)
        app_id = caller_app_id(caller, data.validated_data.get("appId") or key.app_slug)
        return Response(_times(_stats(caller, app_id, data.validated_data)))


class PlayerTokenView(APIView):
    """POST /api/v1/player-tokens {"player_id"} -> {"token", "player_id", "expires_at"}."""

    error_shape = "rest"

    def post(self, request) -> Response:
        data = io.PlayerTokenSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = require_role(request_key(request), Role.WRITE)
        player_id = data.validated_data["player_id"]
        token, expires_at = player_token_issue(key=key, player_id=player_id)
        return Response({"token": token, "player_id": player_id, "expires_at": iso_ms(expires_at)})
