"""OpenAPI (drf-spectacular) descriptions of the history and batch-reset endpoints."""

from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_view,
)
from rest_framework import serializers

from counters.rest_errors import REST_ERRORS, RestError
from counters.schema import AUTH, NAME, USER_ID

from .apis import CounterBatchResetView, CounterHistoryView
from .serializers import MAX_HISTORY_DAYS, BatchResetInputSerializer


class CurrentPeriod(serializers.Serializer):
    period = serializers.CharField()
    value = serializers.IntegerField()
    last_updated = serializers.DateTimeField(allow_null=True)
    last_reset = serializers.DateTimeField()
    next_reset = serializers.DateTimeField()


class ClosedPeriod(serializers.Serializer):
    period = serializers.CharField(help_text="Local date of the period's start (YYYY-MM-DD).")
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    value = serializers.IntegerField(help_text="Final value.")
    peak = serializers.IntegerField()
    operations = serializers.IntegerField()


class HistoryReply(serializers.Serializer):
    name = serializers.CharField()
    period = serializers.ChoiceField(choices=["daily", "weekly", "monthly"])
    time_zone = serializers.CharField()
    days = serializers.IntegerField()
    current = CurrentPeriod()
    history = ClosedPeriod(many=True)


class ResetErrorDetail(serializers.Serializer):
    code = serializers.IntegerField()
    message = serializers.CharField()


class ResetResultItem(serializers.Serializer):
    name = serializers.CharField()
    success = serializers.BooleanField()
    user_id = serializers.CharField(required=False)
    previous_value = serializers.IntegerField(required=False)
    current_value = serializers.IntegerField(required=False)
    error = ResetErrorDetail(required=False)


class BatchResetReply(serializers.Serializer):
    success = serializers.BooleanField()
    reason = serializers.CharField()
    results = ResetResultItem(many=True)


def _refused(description: str) -> OpenApiResponse:
    """A request refused whole (an error body) or per counter (the results, with the first error's status)."""
    either = PolymorphicProxySerializer(
        component_name="BatchResetRefused", serializers=[RestError, BatchResetReply], resource_type_field_name=None
    )
    return OpenApiResponse(either, description=description)


extend_schema_view(
    get=extend_schema(
        tags=["REST v1"],
        summary="History of a periodic counter",
        description="The current period and the closed ones of the last `days` days, newest first, from the "
        f"archive. Counters without a period answer 400. Public counters need no key. {AUTH}",
        parameters=[
            NAME,
            OpenApiParameter("days", int, description=f"1 to {MAX_HISTORY_DAYS}; default 7."),
            USER_ID,
        ],
        responses={200: HistoryReply, **REST_ERRORS},
        examples=[
            OpenApiExample(
                "two days",
                response_only=True,
                value={
                    "name": "total_games_played",
                    "period": "daily",
                    "time_zone": "UTC",
                    "days": 7,
                    "current": {
                        "period": "2026-11-23",
                        "value": 12,
                        "last_updated": "2026-11-23T10:30:00Z",
                        "last_reset": "2026-11-23T00:00:00Z",
                        "next_reset": "2026-11-24T00:00:00Z",
                    },
                    "history": [
                        {
                            "period": "2026-11-22",
                            "start": "2026-11-22T00:00:00Z",
                            "end": "2026-11-23T00:00:00Z",
                            "value": 340,
                            "peak": 340,
                            "operations": 340,
                        }
                    ],
                },
            )
        ],
    )
)(CounterHistoryView)

extend_schema_view(
    post=extend_schema(
        tags=["REST v1"],
        summary="Reset several counters with one reason",
        description="Needs `counter_manage` (the key may be given as `admin_token`). Every entry is checked "
        "before anything changes; the reply has one result per counter, and a failed entry's status.",
        request=BatchResetInputSerializer,
        responses={
            200: BatchResetReply,
            **REST_ERRORS,
            400: _refused("4001: bad request or entry."),
            409: _refused("4005: a reset value outside a counter's bounds."),
            503: _refused("5003: the counter store is down."),
        },
        examples=[
            OpenApiExample(
                "event over",
                request_only=True,
                value={"reason": "event over", "counters": [{"name": "event_kills"}, {"name": "event_deaths"}]},
            )
        ],
    )
)(CounterBatchResetView)
