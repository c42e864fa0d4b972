"""OpenAPI (drf-spectacular) descriptions of what the views cannot say themselves: the project's own
serializer fields and the REST v1 views (documented here so that their module stays about behaviour)."""

from drf_spectacular.extensions import OpenApiSerializerExtension, OpenApiSerializerFieldExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers

from .apis import CounterBatchUpdateView, CounterBatchView, CounterStreamView, CounterViewSet
from .idempotency import KEY_PATTERN
from .keyspace import MAX_SAFE_VALUE
from .models import Counter
from .presence import MAX_BATCH_LEASES
from .rest_errors import (
    REST_ERRORS,
    RULE_BATCH_READ,
    RULE_BOUNDS,
    RULE_IDEMPOTENCY_CONFLICT,
    RULE_PER_PLAYER,
    RULE_PRESENCE,
    RULE_UNIQUE_DECREMENT,
    RULE_UNIQUE_NEEDS_USER,
    RestErrorDetail,
    refused_by_rules,
)
from .serializers import (
    BATCH_UPDATE_LIMIT,
    METADATA_HELP,
    SUBJECT_PATTERN,
    MetadataField,
    ResetInputSerializer,
    SubjectField,
    UpdateInputSerializer,
)

NO_NUL = r"^[^\u0000]*$"
NOT_BLANK_NO_NUL = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"


class StrictIntegerFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "counters.serializers.StrictIntegerField"

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "integer", "minimum": self.target.min_value, "maximum": self.target.max_value}


class MetadataFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "counters.serializers.MetadataField"

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "object", "additionalProperties": True}


class StrictCharFieldSchema(OpenApiSerializerFieldExtension):
    """Text without NUL characters (DRF refuses them) and, unless blank is allowed, with something
    besides white space (DRF trims it before checking)."""

    target_class = "counters.serializers.StrictCharField"

    def map_serializer_field(self, auto_schema, direction):
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        # drf-spectacular says "blank allowed" as oneOf(the string, an empty string): "" matches both,
        # so oneOf would refuse it. The pattern below says it alone.
        schema = schema["oneOf"][0] if "oneOf" in schema else schema
        blank_ok = self.target.allow_blank or not self.target.trim_whitespace
        schema["pattern"] = NO_NUL if blank_ok else NOT_BLANK_NO_NUL
        return schema


class StatsDateFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "counters.function_serializers.StatsDateField"

    def map_serializer_field(self, auto_schema, direction):
        return {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}


class ListSerializerSchema(OpenApiSerializerFieldExtension):
    """A nested list's item limits (``allow_empty``, ``min_length``, ``max_length``), which
    drf-spectacular leaves out of the schema although the server enforces them."""

    target_class = "rest_framework.serializers.ListSerializer"
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        if direction != "request":
            return schema
        fewest = max(self.target.min_length or 0, 0 if self.target.allow_empty else 1)
        if fewest:
            schema["minItems"] = fewest
        if self.target.max_length is not None:
            schema["maxItems"] = self.target.max_length
        return schema


class SubjectFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "counters.serializers.SubjectField"

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "string", "pattern": SUBJECT_PATTERN.pattern}


class UpdateReply(serializers.Serializer):
    success = serializers.BooleanField()
    current_value = serializers.IntegerField()


class ResetReply(UpdateReply):
    previous_value = serializers.IntegerField()


class ValueReply(serializers.Serializer):
    name = serializers.CharField()
    value = serializers.IntegerField()
    last_updated = serializers.DateTimeField(allow_null=True)
    last_reset = serializers.DateTimeField(
        required=False,
        help_text="When the value was last reset: a manual reset in the current period, else the period's start. "
        "Periodic counters, and others once manually reset.",
    )
    next_reset = serializers.DateTimeField(required=False, help_text="Periodic counters only.")


class BatchItem(serializers.Serializer):
    name = serializers.CharField()
    value = serializers.IntegerField()


class BatchReply(serializers.Serializer):
    counters = BatchItem(many=True)


NAME = OpenApiParameter("name", str, OpenApiParameter.PATH, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
USER_ID = OpenApiParameter("user_id", str, description="The player (user counters).", pattern=SUBJECT_PATTERN.pattern)
APP = OpenApiParameter("app", str, description="App slug for anonymous reads of public counters (default app).")
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    description="Optional. A retry with the same key is applied at most once and answers the first reply "
    "(with `Idempotent-Replayed: true`); kept 24 h by default. See docs/idempotency.md.",
    pattern=KEY_PATTERN.pattern,
)

AUTH = "Authenticate with `Authorization: Bearer <API key>` or `X-API-Key`."


# An object whose unknown fields the server refuses (``batch_updates_parse``): the schema says so.
class ClosedSerializer(serializers.Serializer):
    pass


class ClosedSerializerSchema(OpenApiSerializerExtension):
    target_class = ClosedSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        return {**auto_schema._map_basic_serializer(self.target, direction), "additionalProperties": False}


class HeartbeatInput(ClosedSerializer):
    user_id = serializers.RegexField(SUBJECT_PATTERN.pattern, required=False, help_text="One player...")
    session_id = serializers.RegexField(SUBJECT_PATTERN.pattern, required=False, help_text="...on this session.")
    user_ids = serializers.ListField(
        child=serializers.RegexField(SUBJECT_PATTERN.pattern),
        min_length=1,
        max_length=MAX_BATCH_LEASES,
        required=False,
        help_text="Or a game server's players (instead of user_id and session_id).",
    )
    node_id = serializers.RegexField(
        SUBJECT_PATTERN.pattern, required=False, help_text="The game server carrying them; alone: renew the node."
    )
    lease_seconds = serializers.IntegerField(
        min_value=Counter.MIN_LEASE_SECONDS,
        max_value=Counter.MAX_LEASE_SECONDS,
        required=False,
        help_text="Default: the counter's lease.",
    )


class HeartbeatReply(UpdateReply):
    lease_seconds = serializers.IntegerField()
    expires_at = serializers.DateTimeField()


PRESENCE = (
    " On a presence counter (`online_players`, docs/presence.md) an increment logs a player in and a "
    "decrement logs them out: `user_id` is required, `value` may only be 1, `session_id` and `node_id` "
    "are optional."
)


def _update(verb: str, example_value: int, *rules: str):
    return extend_schema(
        tags=["REST v1"],
        summary=f"{verb.capitalize()} a counter",
        description=f"Needs the `write` role (global counters: also `global_admin`). {AUTH}{PRESENCE}",
        parameters=[NAME, IDEMPOTENCY_KEY],
        request=UpdateInputSerializer,
        responses={
            200: UpdateReply,
            **REST_ERRORS,
            **refused_by_rules(
                RULE_BOUNDS, RULE_PER_PLAYER, RULE_UNIQUE_NEEDS_USER, RULE_PRESENCE, RULE_IDEMPOTENCY_CONFLICT, *rules
            ),
        },
        examples=[
            OpenApiExample(verb, value={"value": 1, "user_id": "u123456", "metadata": {}}, request_only=True),
            OpenApiExample(verb, value={"success": True, "current_value": example_value}, response_only=True),
        ],
    )


# The viewset's custom actions are routed by hand, so each method is annotated in place.
for method, annotation in dict(
    retrieve=extend_schema(
        tags=["REST v1"],
        summary="Read a counter",
        description=f"Public counters need no key; private ones a key of their app. {AUTH}",
        parameters=[NAME, USER_ID, APP],
        responses={200: ValueReply, **REST_ERRORS, **refused_by_rules(RULE_PER_PLAYER)},
        examples=[
            OpenApiExample(
                "online_players",
                value={"name": "online_players", "value": 12344, "last_updated": "2024-01-15T10:30:00Z"},
                response_only=True,
            )
        ],
    ),
    increment=_update("increment", 12345),
    decrement=_update("decrement", 12344, RULE_UNIQUE_DECREMENT),
    heartbeat=extend_schema(
        tags=["REST v1"],
        summary="Renew presence leases",
        description="Presence counters only (docs/presence.md): renews, or opens again, the leases of one "
        f"player or of up to {MAX_BATCH_LEASES} players of a game server, in one Redis round trip. "
        f"Needs the `write` role. {AUTH}",
        parameters=[NAME],
        request=HeartbeatInput,
        responses={200: HeartbeatReply, **REST_ERRORS, **refused_by_rules(RULE_PRESENCE)},
        examples=[
            OpenApiExample("one player", value={"user_id": "u123456", "session_id": "phone"}, request_only=True),
            OpenApiExample(
                "a game server", value={"user_ids": ["u1", "u2", "u3"], "node_id": "eu-7"}, request_only=True
            ),
            OpenApiExample(
                "heartbeat",
                value={
                    "success": True,
                    "current_value": 12345,
                    "lease_seconds": 90,
                    "expires_at": "2024-01-15T10:31:30Z",
                },
                response_only=True,
            ),
        ],
    ),
    reset=extend_schema(
        tags=["REST v1"],
        summary="Reset a counter (administrator only)",
        description="Needs `counter_manage`; the key may also be given as `admin_token` in the body.",
        parameters=[NAME, IDEMPOTENCY_KEY],
        request=ResetInputSerializer,
        responses={
            200: ResetReply,
            **REST_ERRORS,
            **refused_by_rules(RULE_BOUNDS, RULE_PER_PLAYER, RULE_IDEMPOTENCY_CONFLICT),
        },
        examples=[
            OpenApiExample("reset", value={"admin_token": "secret_token", "reason": "event over"}, request_only=True),
            OpenApiExample(
                "reset", value={"success": True, "current_value": 0, "previous_value": 7}, response_only=True
            ),
        ],
    ),
).items():
    annotation(getattr(CounterViewSet, method))

extend_schema_view(
    get=extend_schema(
        tags=["REST v1"],
        summary="Read up to 10 counters",
        parameters=[
            OpenApiParameter(
                "names",
                str,
                required=True,
                description="Comma-separated, 1 to 10 names.",
                pattern=r"^[A-Za-z0-9_.:-]{1,64}(,[A-Za-z0-9_.:-]{1,64}){0,9}$",
            ),
            APP,
        ],
        responses={200: BatchReply, **REST_ERRORS, **refused_by_rules(RULE_BATCH_READ)},
        examples=[
            OpenApiExample(
                "two counters",
                value={
                    "counters": [
                        {"name": "online_players", "value": 12344},
                        {"name": "daily_active_users", "value": 45678},
                    ]
                },
                response_only=True,
            )
        ],
    )
)(CounterBatchView)


class BatchUpdateInputItem(ClosedSerializer):
    name = serializers.RegexField(r"^[A-Za-z0-9_.:-]{1,64}$")
    op = serializers.ChoiceField(["increment", "decrement"], required=False, help_text="Default: increment.")
    value = serializers.IntegerField(min_value=1, max_value=MAX_SAFE_VALUE, required=False, help_text="Default: 1.")
    user_id = SubjectField(required=False)
    metadata = MetadataField(required=False, help_text=METADATA_HELP)
    id = serializers.RegexField(
        KEY_PATTERN.pattern,
        required=False,
        help_text="The item's Idempotency-Key (unique within the batch): a retried batch replays the item's "
        "first result instead of applying it again.",
    )


class BatchUpdateInput(ClosedSerializer):
    updates = BatchUpdateInputItem(many=True, min_length=1, max_length=BATCH_UPDATE_LIMIT)


class BatchUpdateResult(serializers.Serializer):
    name = serializers.CharField()
    success = serializers.BooleanField()
    current_value = serializers.IntegerField(required=False)
    error = RestErrorDetail(required=False, help_text="4005: out of limits; this item changed nothing.")


class BatchUpdateReply(serializers.Serializer):
    success = serializers.BooleanField()
    results = BatchUpdateResult(many=True)


extend_schema_view(
    post=extend_schema(
        tags=["REST v1"],
        summary=f"Apply up to {BATCH_UPDATE_LIMIT} increments/decrements in one request",
        description="The whole request is checked first (shape, names, permissions): any error refuses it all "
        "and changes nothing. Items then apply in order; a bounds refusal (4005) is reported per item. " + AUTH,
        request=BatchUpdateInput,
        responses={200: BatchUpdateReply, **REST_ERRORS, **refused_by_rules(RULE_PER_PLAYER, RULE_UNIQUE_DECREMENT)},
    )
)(CounterBatchUpdateView)


NAMES = OpenApiParameter(
    "names",
    str,
    required=True,
    description="Comma-separated, 1 to 10 names.",
    pattern=r"^[A-Za-z0-9_.:-]{1,64}(,[A-Za-z0-9_.:-]{1,64}){0,9}$",
)

extend_schema_view(
    get=extend_schema(
        tags=["REST v1"],
        summary="Stream values as server-sent events",
        description=(
            "`text/event-stream` (for `EventSource`): first one event per counter with its current value, "
            "then an event whenever a value changes, at most one per counter per 250 ms "
            "(`COUNTER_STREAM_MIN_INTERVAL_MS`; the last value always follows). Each event is "
            '`id: <n>` and `data: {"name": ..., "value": ...}`; a comment line (`: heartbeat`) keeps an idle '
            "stream open. A client that reconnects with `Last-Event-ID` gets the current values again, its ids "
            "continuing from that one. The same names, app and permission rules and the same errors as "
            "GET /api/v1/counters. Served live by the web process's ASGI layer; where Django serves it (fast "
            "lane off) the reply holds the current values and a `retry: 1000`, so an EventSource polls. "
            f"See docs/streams.md. {AUTH}"
        ),
        parameters=[
            NAMES,
            APP,
            OpenApiParameter(
                "Last-Event-ID",
                str,
                OpenApiParameter.HEADER,
                description="The id of the last event received (EventSource sends it when it reconnects).",
                pattern=r"^[0-9]{1,16}$",
            ),
        ],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                response=OpenApiTypes.STR,
                description="Server-sent events.",
                examples=[
                    OpenApiExample(
                        "current values, then a change",
                        value='id: 1\ndata: {"name":"online_players","value":12344}\n\n'
                        'id: 2\ndata: {"name":"online_players","value":12345}\n\n',
                        response_only=True,
                    )
                ],
            ),
            **REST_ERRORS,
            **refused_by_rules(RULE_BATCH_READ),
        },
    )
)(CounterStreamView)
