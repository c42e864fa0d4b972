"""The cloud functions of seed 001 (``POST /api/v1/functions/<name>``), the statistics' REST twin and
player tokens.

Every function replies ``{"code": 0, "msg", "timestamp", "data"}``; errors come from the one
exception handler in the same envelope with ``data: null``. ``msg`` follows Accept-Language
(zh-Hans, zh-Hant, en). See docs/cloud-functions.md.
"""

from dataclasses import dataclass
from datetime import UTC, datetime

from django.utils import translation
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework.response import Response
from rest_framework.views import APIView

from . import clock, selectors, services, stats
from . import function_serializers as io
from .apis import request_key
from .config import CounterConfig, KeyConfig
from .errors import AuthenticationRequired, CounterNotFound, Forbidden, InvalidParameter
from .idempotency import REPLAYED_HEADERS, Idempotency, request_idempotency
from .permissions import Role, check_data_view, check_manage, check_read, check_write
from .player_tokens import PlayerToken, player_token_issue, player_token_read


def iso_ms(moment: datetime | None) -> str | None:
    """The seed's time format: UTC with milliseconds, ``2023-10-01T10:30:00.000Z``."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _times(value):
    """Datetimes anywhere in a reply rendered in the seed's format."""
    if isinstance(value, datetime):
        return iso_ms(value)
    if isinstance(value, dict):
        return {k: _times(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_times(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Caller:
    key: KeyConfig | None
    player: PlayerToken | None

    @property
    def app_id(self) -> int | None:
        if self.key is not None:
            return self.key.app_id
        return self.player.app_id if self.player is not None else None

    def require_key(self) -> KeyConfig:
        if self.player is not None:
            raise Forbidden(_("A player token may only read (getCounter)."))
        if self.key is None:
            raise AuthenticationRequired()
        return self.key


def request_caller(request) -> Caller:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header[:7].lower() == "player ":
        return Caller(key=None, player=player_token_read(header[7:].strip()))
    return Caller(key=request_key(request), player=None)


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
        raise InvalidParameter(_("playerId is required for user counters."))
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


COMMON_ERRORS = {
    400: OpenApiResponse(io.FunctionError, description="4001: bad parameter or invalid counter id."),
    401: OpenApiResponse(io.FunctionError, description="4003: no valid API key or player token."),
    403: OpenApiResponse(io.FunctionError, description="4003: the key lacks a role for this."),
    404: OpenApiResponse(io.FunctionError, description="4004: no such counter (or app) visible to the caller."),
    405: OpenApiResponse(io.FunctionError, description="4001: functions are called with POST."),
    500: OpenApiResponse(io.FunctionError, description="5001: internal error (no details are leaked)."),
    503: OpenApiResponse(io.FunctionError, description="5003: the counter store is down; reads still work."),
}
OUT_OF_LIMITS = {
    409: OpenApiResponse(
        io.FunctionError,
        description="4005: out of limits; 4001: the Idempotency-Key (requestId) was used for another request. "
        "Nothing changed.",
    )
}
AUTH_NOTE = (
    "Authenticate with `Authorization: Bearer <API key>` (or `X-API-Key`); getCounter also accepts "
    "`Authorization: Player <token>` for a player's own values, and no credentials for public counters."
)


def _example(name: str, request: dict, reply: dict) -> list[OpenApiExample]:
    return [
        OpenApiExample(name, value=request, request_only=True),
        OpenApiExample(name, value=reply, response_only=True, status_codes=["200"]),
    ]


def _ok(msg: str, data: dict) -> dict:
    return {"code": 0, "msg": msg, "timestamp": 1696156200000, "data": data}


@extend_schema_view(
    post=extend_schema(
        tags=["cloud functions"],
        operation_id="getCounter",
        summary="getCounter: a counter's current value",
        description=AUTH_NOTE,
        request=io.TargetSerializer,
        responses={200: io.envelope("FnGetCounterReply", io.GetCounterData), **COMMON_ERRORS},
        examples=_example(
            "daily counter",
            {"appId": "default", "counterType": "daily", "counterId": "total_games_played"},
            _ok(
                "Query succeeded",
                {
                    "counterId": "total_games_played",
                    "counterType": "daily",
                    "counterName": "Games played today",
                    "currentValue": 1250,
                    "maxValue": None,
                    "resetPeriod": "daily",
                    "lastResetTime": "2023-10-01T00:00:00.000Z",
                    "nextResetTime": "2023-10-02T00:00:00.000Z",
                    "updateTime": "2023-10-01T10:30:00.000Z",
                    "metadata": {"description": "+1 per finished game; resets daily.", "unit": "games"},
                },
            ),
        ),
    )
)
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


@extend_schema_view(
    post=extend_schema(
        tags=["cloud functions"],
        operation_id="increaseCounter",
        summary="increaseCounter: add to a counter",
        description="Needs the `write` role (global counters: also `global_admin`). " + AUTH_NOTE,
        request=io.IncreaseSerializer,
        responses={200: io.envelope("FnIncreaseReply", io.IncreaseData), **COMMON_ERRORS, **OUT_OF_LIMITS},
        examples=_example(
            "increment",
            {"appId": "default", "counterType": "daily", "counterId": "total_games_played", "increment": 1},
            _ok(
                "Increased",
                {
                    "counterId": "total_games_played",
                    "oldValue": 1250,
                    "newValue": 1251,
                    "increment": 1,
                    "updateTime": "2023-10-01T10:30:00.000Z",
                    "hitThreshold": False,
                    "thresholds": [{"value": 1000, "triggered": True, "triggerTime": "2023-10-01T08:15:00.000Z"}],
                },
            ),
        ),
    )
)
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


@extend_schema_view(
    post=extend_schema(
        tags=["cloud functions"],
        operation_id="decreaseCounter",
        summary="decreaseCounter: subtract from a counter",
        description=(
            "Needs the `write` role (global counters: also `global_admin`). Below the counter's minimum is refused "
            "(4005) unless the counter allows negatives or the request says `allowNegative` with a key that has "
            "`counter_manage`. `reachedMinimum` is true when the new value is at (or below) the minimum. " + AUTH_NOTE
        ),
        request=io.DecreaseSerializer,
        responses={200: io.envelope("FnDecreaseReply", io.DecreaseData), **COMMON_ERRORS, **OUT_OF_LIMITS},
        examples=_example(
            "decrement",
            {"appId": "default", "counterType": "user", "counterId": "energy_points", "playerId": "p1", "decrement": 1},
            _ok(
                "Decreased",
                {
                    "counterId": "energy_points",
                    "oldValue": 5,
                    "newValue": 4,
                    "decrement": 1,
                    "updateTime": "2023-10-01T10:30:00.000Z",
                    "reachedMinimum": False,
                },
            ),
        ),
    )
)
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


@extend_schema_view(
    post=extend_schema(
        tags=["cloud functions"],
        operation_id="resetCounter",
        summary="resetCounter: set a counter's current value, with a reason",
        description=(
            "Needs `counter_manage` (global counters: also `global_admin`). `reason` is required; `resetValue` "
            "defaults to the counter's configured reset value (0 unless an operator changed it). The value "
            "before is kept in the reset log with the reason and operator. " + AUTH_NOTE
        ),
        request=io.ResetSerializer,
        responses={200: io.envelope("FnResetReply", io.ResetData), **COMMON_ERRORS, **OUT_OF_LIMITS},
        examples=_example(
            "reset",
            {"appId": "default", "counterType": "daily", "counterId": "total_games_played", "reason": "event over"},
            _ok(
                "Reset done",
                {
                    "counterId": "total_games_played",
                    "oldValue": 1251,
                    "newValue": 0,
                    "resetTime": "2023-10-01T10:30:00.000Z",
                    "reason": "event over",
                    "operatorId": "api-key:ck_AbCdEfGh",
                },
            ),
        ),
    )
)
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


STATS_EXAMPLE = {
    "summary": {"totalCounters": 3, "activeCounters": 2, "totalOperations": 156, "avgValue": 417.33},
    "counterList": [
        {
            "counterId": "total_games_played",
            "counterName": "Games played today",
            "currentValue": 1251,
            "peakValue": 1251,
            "operationCount": 150,
            "lastUpdateTime": "2023-10-01T10:30:00.000Z",
        }
    ],
    "timeSeries": [{"time": "2023-10-01T10:00:00.000Z", "value": 140, "operations": 156}],
    "topCounters": [{"counterId": "total_games_played", "value": 1251, "ranking": 1}],
}
STATS_DESCRIPTION = (
    "Needs `data_view`. Covers the app's own counters (`counterType` filters; `global` covers the global "
    "counters). Activity (operations, timeSeries, peakValue) comes from per-minute buckets flushed about "
    "every second; `timeSeries[].value` is the net change in the slot. Dates are in the app's time zone; "
    "a date-only `endDate` includes that day. At most 1000 slots."
)


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


@extend_schema_view(
    post=extend_schema(
        tags=["cloud functions"],
        operation_id="getCounterStats",
        summary="getCounterStats: summary, per-counter list, time series and top counters",
        description=STATS_DESCRIPTION,
        request=io.StatsSerializer,
        responses={200: io.envelope("FnStatsReply", io.StatsData), **COMMON_ERRORS},
        examples=_example(
            "last week by day", {"appId": "default", "groupBy": "day"}, _ok("Query succeeded", STATS_EXAMPLE)
        ),
    )
)
class GetCounterStatsView(FunctionView):
    input_serializer = io.StatsSerializer
    success_msg = gettext_lazy("Query succeeded")

    def call(self, caller: Caller, app_id: int, values: dict) -> dict:
        return _stats(caller, app_id, values)


@extend_schema(exclude=True)
class UnknownFunctionView(FunctionView):
    """Any other name under /api/v1/functions/: 4004 in the function envelope."""

    def post(self, request, name: str) -> Response:
        raise CounterNotFound(_("No such function: %(name)s.") % {"name": name})


@extend_schema_view(
    get=extend_schema(
        tags=["statistics"],
        operation_id="stats",
        summary="Statistics (REST twin of getCounterStats)",
        description=STATS_DESCRIPTION + " Answers the `data` object of getCounterStats, without the envelope.",
        parameters=[io.StatsQuerySerializer],
        responses={200: io.StatsData, **io.REST_ERRORS},
        examples=[OpenApiExample("last week by day", value=STATS_EXAMPLE, response_only=True)],
    )
)
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


@extend_schema_view(
    post=extend_schema(
        tags=["player tokens"],
        operation_id="issuePlayerToken",
        summary="A signed token with which one player reads its own values",
        description=(
            "Called by the game server with an API key that has `write`. The player's client then calls "
            "getCounter with `Authorization: Player <token>` and may read only its own user-counter values "
            "(and public counters). Tokens expire after COUNTER_PLAYER_TOKEN_SECONDS."
        ),
        request=io.PlayerTokenSerializer,
        responses={200: io.PlayerTokenOut, **io.REST_ERRORS},
    )
)
class PlayerTokenView(APIView):
    """POST /api/v1/player-tokens {"player_id"} -> {"token", "player_id", "expires_at"}."""

    error_shape = "rest"

    def post(self, request) -> Response:
        data = io.PlayerTokenSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = request_key(request)
        if key is None:
            raise AuthenticationRequired()
        if Role.WRITE not in key.roles:
            raise Forbidden(_("This API key lacks the '%(role)s' role.") % {"role": Role.WRITE})
        player_id = data.validated_data["player_id"]
        token, expires_at = player_token_issue(key=key, player_id=player_id)
        return Response({"token": token, "player_id": player_id, "expires_at": iso_ms(expires_at)})
