"""OpenAPI (drf-spectacular) descriptions of the cloud functions, the statistics' REST twin and player
tokens, kept here so that ``functions.py`` is about behaviour. Registered when the app is ready."""

from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema, extend_schema_view

from . import function_serializers as io
from .functions import (
    DecreaseCounterView,
    GetCounterStatsView,
    GetCounterView,
    IncreaseCounterView,
    PlayerTokenView,
    ResetCounterView,
    StatsView,
    UnknownFunctionView,
)
from .rest_errors import (
    REST_ERRORS,
    RULE_BOUNDS,
    RULE_IDEMPOTENCY_CONFLICT,
    RULE_PER_PLAYER,
    RULE_STATS_RANGE,
    RULE_UNIQUE_DECREMENT,
    RULE_UNIQUE_NEEDS_USER,
    refused_by_rules,
)

COMMON_ERRORS = {
    400: OpenApiResponse(io.FunctionError, description="4001: bad parameter or invalid counter id."),
    401: OpenApiResponse(io.FunctionError, description="4003: no valid API key or player token."),
    403: OpenApiResponse(io.FunctionError, description="4003: the key lacks a role for this."),
    404: OpenApiResponse(io.FunctionError, description="4004: no such counter (or app) visible to the caller."),
    405: OpenApiResponse(io.FunctionError, description="4001: functions are called with POST."),
    500: OpenApiResponse(io.FunctionError, description="5001: internal error (no details are leaked)."),
    503: OpenApiResponse(io.FunctionError, description="5003: the counter store is down; reads still work."),
}
UPDATE_RULES = refused_by_rules(
    RULE_BOUNDS, RULE_PER_PLAYER, RULE_UNIQUE_NEEDS_USER, RULE_IDEMPOTENCY_CONFLICT, shape=io.FunctionError
)
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


extend_schema_view(
    post=extend_schema(
        tags=["cloud functions"],
        operation_id="getCounter",
        summary="getCounter: a counter's current value",
        description=AUTH_NOTE,
        request=io.TargetSerializer,
        responses={
            200: io.envelope("FnGetCounterReply", io.GetCounterData),
            **COMMON_ERRORS,
            **refused_by_rules(RULE_PER_PLAYER, shape=io.FunctionError),
        },
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
)(GetCounterView)

extend_schema_view(
    post=extend_schema(
        tags=["cloud functions"],
        operation_id="increaseCounter",
        summary="increaseCounter: add to a counter",
        description="Needs the `write` role (global counters: also `global_admin`). " + AUTH_NOTE,
        request=io.IncreaseSerializer,
        responses={200: io.envelope("FnIncreaseReply", io.IncreaseData), **COMMON_ERRORS, **UPDATE_RULES},
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
)(IncreaseCounterView)

extend_schema_view(
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
        responses={
            200: io.envelope("FnDecreaseReply", io.DecreaseData),
            **COMMON_ERRORS,
            **refused_by_rules(
                RULE_BOUNDS,
                RULE_PER_PLAYER,
                RULE_UNIQUE_DECREMENT,
                RULE_UNIQUE_NEEDS_USER,
                RULE_IDEMPOTENCY_CONFLICT,
                shape=io.FunctionError,
            ),
        },
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
)(DecreaseCounterView)

extend_schema_view(
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
        responses={200: io.envelope("FnResetReply", io.ResetData), **COMMON_ERRORS, **UPDATE_RULES},
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
)(ResetCounterView)

extend_schema_view(
    post=extend_schema(
        tags=["cloud functions"],
        operation_id="getCounterStats",
        summary="getCounterStats: summary, per-counter list, time series and top counters",
        description=STATS_DESCRIPTION,
        request=io.StatsSerializer,
        responses={
            200: io.envelope("FnStatsReply", io.StatsData),
            **COMMON_ERRORS,
            **refused_by_rules(RULE_STATS_RANGE, shape=io.FunctionError),
        },
        examples=_example(
            "last week by day", {"appId": "default", "groupBy": "day"}, _ok("Query succeeded", STATS_EXAMPLE)
        ),
    )
)(GetCounterStatsView)

extend_schema(exclude=True)(UnknownFunctionView)

extend_schema_view(
    get=extend_schema(
        tags=["statistics"],
        operation_id="stats",
        summary="Statistics (REST twin of getCounterStats)",
        description=STATS_DESCRIPTION + " Answers the `data` object of getCounterStats, without the envelope.",
        parameters=[io.StatsQuerySerializer],
        responses={200: io.StatsData, **REST_ERRORS, **refused_by_rules(RULE_STATS_RANGE)},
        examples=[OpenApiExample("last week by day", value=STATS_EXAMPLE, response_only=True)],
    )
)(StatsView)

extend_schema_view(
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
        responses={200: io.PlayerTokenOut, **REST_ERRORS},
    )
)(PlayerTokenView)
