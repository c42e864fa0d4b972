"""REST v1's error shape ``{"success": false, "error": {"code", "message"}}`` and its documented responses.

Every REST endpoint (counters, alerts, archive, board) lists ``REST_ERRORS`` in its OpenAPI description.
"""

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class RestErrorDetail(serializers.Serializer):
    code = serializers.IntegerField()
    message = serializers.CharField()


class RestError(serializers.Serializer):
    """REST v1's error shape."""

    success = serializers.BooleanField()
    error = RestErrorDetail()


REST_ERRORS = {
    400: OpenApiResponse(RestError, description="4001: the request breaks this schema (shape, type, pattern, range)."),
    401: OpenApiResponse(RestError, description="4003: no valid API key."),
    403: OpenApiResponse(RestError, description="4003: the key lacks a role for this."),
    404: OpenApiResponse(RestError, description="4004: not found (or another app's)."),
    405: OpenApiResponse(RestError, description="4001: wrong method."),
    503: OpenApiResponse(RestError, description="5003: the counter store is down: read-only."),
}


# The rules a schema cannot state (they depend on the counter's configuration or on several fields
# together): a well-formed request that breaks one is refused with 409 and changes nothing. Both
# surfaces document them; the cloud functions pass their own error shape.
RULE_BOUNDS = "4005: the value would leave the counter's bounds"
RULE_PER_PLAYER = "4001: a per-player (user) counter needs the player's id; the others take none"
RULE_UNIQUE_DECREMENT = "4001: a unique-member counter (like daily_active_users) is not decremented per user"
RULE_HAS_PERIOD = "4001: only a counter with a reset period has a history"
RULE_THRESHOLD_COUNT = "4001: a counter has at most ALERTS_MAX_THRESHOLDS_PER_COUNTER thresholds (default 20)"
RULE_STATS_RANGE = "4001: startDate before endDate, both in the years 1970 to 9998, at most 1000 slots of groupBy"
RULE_ONCE_PER_BATCH = "4001: each counter (and player) at most once per request"
RULE_IDEMPOTENCY_CONFLICT = "4001: the Idempotency-Key was already used for another request"
RULE_UNIQUE_NEEDS_USER = "4001: a unique-member counter (like daily_active_users) needs the user_id it counts"
RULE_PRESENCE = (
    "4001: a presence counter (like online_players) takes one user_id per login or logout, value 1, and "
    "no reset or batch update; a heartbeat needs a presence counter and a user_id, user_ids or node_id"
)
RULE_BATCH_READ = "4001: a per-player counter is read one at a time (GET /api/v1/counter/{name})"


def refused_by_rules(*rules: str, shape: type[serializers.Serializer] = RestError) -> dict[int, OpenApiResponse]:
    """The documented 409 of an operation: the rules its well-formed requests may still break."""
    listed = "; ".join(rules)
    return {409: OpenApiResponse(shape, description=f"Refused by a rule, nothing changed: {listed}.")}
