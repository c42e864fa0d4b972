import re
from dataclasses import dataclass

import orjson
from django.conf import settings
from django.http import QueryDict
from django.utils.translation import gettext, gettext_lazy
from rest_framework import serializers

from . import keyspace
from .errors import InvalidParameter, RuleViolation
from .idempotency import idempotency_key_check
from .models import NAME_PATTERN
from .presence import MAX_BATCH_LEASES, Lease

SUBJECT_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")
SUBJECT_HELP = "1-64 letters, digits, '_', '.', ':', '@' or '-'"


class StrictIntegerField(serializers.Field):
    """A JSON integer (not a bool, float or string) within [min_value, max_value]."""

    def __init__(self, *, min_value: int, max_value: int = keyspace.MAX_SAFE_VALUE, **kwargs):
        self.min_value, self.max_value = min_value, max_value
        super().__init__(**kwargs)

    def to_internal_value(self, data) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        if not self.min_value <= data <= self.max_value:
            raise serializers.ValidationError(
                gettext("Must be an integer from %(min)d to %(max)d.") % {"min": self.min_value, "max": self.max_value}
            )
        return data

    def to_representation(self, value) -> int:
        return value

    default_error_messages = {"invalid": gettext_lazy("Must be an integer.")}


class StringOnly:
    """A JSON string only: DRF's text fields would otherwise turn 7 or 1.5 into "7" and "1.5",
    accepting what the schema (``type: string``) forbids."""

    def to_internal_value(self, data) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError(gettext("Must be a string."))
        return super().to_internal_value(data)


class StrictCharField(StringOnly, serializers.CharField):
    pass


class StrictRegexField(StringOnly, serializers.RegexField):
    pass


class QuerySerializer(serializers.Serializer):
    """Query parameters read as given: ``?user_id=`` is an empty value, refused where the schema asks
    for at least one character (DRF reads a QueryDict as an HTML form, where it means "absent")."""

    def __init__(self, instance=None, data=serializers.empty, **kwargs):
        if isinstance(data, QueryDict):
            data = data.dict()
        super().__init__(instance, data, **kwargs)


class SubjectField(serializers.CharField):
    def to_internal_value(self, data) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError(gettext("Must be a string of %(help)s.") % {"help": SUBJECT_HELP})
        if not SUBJECT_PATTERN.match(data):
            raise serializers.ValidationError(gettext("Use %(help)s.") % {"help": SUBJECT_HELP})
        return data


class MetadataField(serializers.Field):
    def __init__(self, **kwargs):
        # A size in bytes has no JSON Schema keyword: the schema says the limit in words.
        limit = f"At most {settings.COUNTER_METADATA_MAX_BYTES} bytes as JSON (4001 otherwise)."
        kwargs["help_text"] = f"{kwargs['help_text']} {limit}" if kwargs.get("help_text") else limit
        super().__init__(**kwargs)

    def to_internal_value(self, data) -> dict:
        if not isinstance(data, dict):
            raise serializers.ValidationError(gettext("Must be a JSON object."))
        size = len(orjson.dumps(data))
        if size > settings.COUNTER_METADATA_MAX_BYTES:
            raise serializers.ValidationError(
                gettext("Is %(size)d bytes as JSON; at most %(max)d are kept.")
                % {"size": size, "max": settings.COUNTER_METADATA_MAX_BYTES}
            )
        return data

    def to_representation(self, value) -> dict:
        return value


METADATA_HELP = (
    "Kept with the operation in the operation log of counters that log operations (`log_operations`); "
    "never interpreted. Counters that do not log operations, the built-in ones among them, check it and do "
    "not keep it (docs/cloud-functions.md, Operation log)."
)


class UpdateInputSerializer(serializers.Serializer):
    value = StrictIntegerField(min_value=1, default=1)
    user_id = SubjectField(required=False, help_text="Required by unique-member counters (daily_active_users).")
    metadata = MetadataField(required=False, help_text=METADATA_HELP)
    session_id = SubjectField(required=False, help_text="Presence counters: the session of a login or logout.")
    node_id = SubjectField(required=False, help_text="Presence counters: the game server carrying the player.")


_PLAIN_UPDATE_FIELDS = frozenset(("value", "user_id"))


def update_input_parse(data) -> tuple[int, str, dict | None]:
    """``(value, user_id, metadata)`` of an increment/decrement body, as ``UpdateInputSerializer`` checks it.

    The common body (a valid ``value`` and/or ``user_id``, no metadata) is checked here directly:
    the serializer costs more than a tenth of the request. Anything else goes through the
    serializer, so every refusal keeps its exact message.
    """
    if type(data) is dict and data.keys() <= _PLAIN_UPDATE_FIELDS:
        value, user_id = data.get("value", 1), data.get("user_id")
        if (
            type(value) is int
            and 1 <= value <= keyspace.MAX_SAFE_VALUE
            and ("user_id" not in data or (type(user_id) is str and SUBJECT_PATTERN.match(user_id)))
        ):
            return value, user_id or "", None
    serializer = UpdateInputSerializer(data=data)
    serializer.is_valid(raise_exception=True)
    valid = serializer.validated_data
    return valid["value"], valid.get("user_id", ""), valid.get("metadata")


class ResetInputSerializer(serializers.Serializer):
    admin_token = StrictCharField(required=False, max_length=200)
    reason = StrictCharField(required=False, allow_blank=True, max_length=500, default="")
    reset_value = StrictIntegerField(min_value=-keyspace.MAX_SAFE_VALUE, required=False)
    user_id = SubjectField(required=False)


BATCH_UPDATE_LIMIT = 1000
_BATCH_ITEM_FIELDS = frozenset(("name", "op", "value", "user_id", "metadata", "id"))
_BATCH_OPS = {"increment": 1, "decrement": -1}
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class BatchItem:
    name: str
    amount: int
    user_id: str
    metadata: dict | None
    id: str | None = None


def _batch_item(index: int, raw) -> BatchItem:
    where = f"updates[{index}]"
    if not isinstance(raw, dict):
        raise InvalidParameter(f"{where}: must be an object with name, op, value, user_id.")
    unknown = raw.keys() - _BATCH_ITEM_FIELDS
    if unknown:
        raise InvalidParameter(f"{where}: unknown field {sorted(unknown)[0]!r}.")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidParameter(f"{where}.name: 1-64 letters, digits, '_', '.', ':' or '-'.")
    op = raw.get("op", "increment")
    sign = _BATCH_OPS.get(op) if isinstance(op, str) else None
    if sign is None:
        raise InvalidParameter(f"{where}.op: 'increment' or 'decrement'.")
    value = raw.get("value", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= keyspace.MAX_SAFE_VALUE:
        raise InvalidParameter(f"{where}.value: must be an integer from 1 to {keyspace.MAX_SAFE_VALUE}.")
    user_id = raw.get("user_id", "")
    if "user_id" in raw and (not isinstance(user_id, str) or not SUBJECT_PATTERN.match(user_id)):
        raise InvalidParameter(f"{where}.user_id: use {SUBJECT_HELP}.")
    metadata = raw.get("metadata")
    if "metadata" in raw:
        try:
            metadata = MetadataField().to_internal_value(metadata)
        except serializers.ValidationError as exc:
            raise InvalidParameter(f"{where}.metadata: {exc.detail[0]}") from exc
    item_id = raw.get("id")
    if item_id is not None:
        item_id = idempotency_key_check(item_id, field=f"{where}.id")
    return BatchItem(name, sign * value, user_id, metadata, item_id)


def batch_updates_parse(data) -> list[BatchItem]:
    """``{"updates": [{"name", "op", "value", "user_id", "metadata", "id"}, ...]}`` (1 to BATCH_UPDATE_LIMIT items;
    ``id``: the item's Idempotency-Key, unique within the batch).

    Hand-written rather than a nested DRF serializer: for 100 items that one costs more than the
    whole Redis round trip (see bench/README.md); the checks and messages are the same as for a
    single update.
    """
    if not isinstance(data, dict) or not isinstance(data.get("updates"), list):
        raise InvalidParameter('The body must be {"updates": [{"name": ..., "op": "increment", "value": 1}, ...]}.')
    if data.keys() - {"updates"}:
        raise InvalidParameter(f"Unknown field {sorted(data.keys() - {'updates'})[0]!r}.")
    updates = data["updates"]
    if not 1 <= len(updates) <= BATCH_UPDATE_LIMIT:
        raise InvalidParameter(f"Send 1 to {BATCH_UPDATE_LIMIT} updates per request ({len(updates)} given).")
    items = [_batch_item(i, raw) for i, raw in enumerate(updates)]
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.id is not None:
            if item.id in seen:
                raise InvalidParameter(f"updates[{index}].id: {item.id!r} appears twice in the batch.")
            seen.add(item.id)
    return items


_HEARTBEAT_FIELDS = frozenset(("user_id", "user_ids", "session_id", "node_id", "lease_seconds"))


def _presence_id(data: dict, field: str) -> str:
    """The id in ``field``, "" when the field is absent; given, it must be an id (an empty one is
    refused as the schema refuses it, not taken as absent)."""
    if field not in data:
        return ""
    raw = data[field]
    if not isinstance(raw, str) or not SUBJECT_PATTERN.match(raw):
        raise InvalidParameter(f"{field}: use {SUBJECT_HELP}.")
    return raw


def _presence_fields(data, allowed: frozenset[str]) -> dict:
    if not isinstance(data, dict):
        raise InvalidParameter("The body must be a JSON object.")
    unknown = data.keys() - allowed
    if unknown:
        raise InvalidParameter(f"Unknown field {sorted(unknown)[0]!r}.")
    return data


def presence_update_input_parse(data) -> tuple[Lease, dict | None]:
    """The lease of a login (increment) or logout (decrement) of a presence counter, and its metadata.

    ``{"user_id": "u1", "session_id": "s1", "node_id": "n1"}``: a user_id is required; ``value``
    may only be 1 (a lease is there or not); session_id and node_id are optional.
    """
    if not isinstance(data, dict):
        raise InvalidParameter("The body must be a JSON object.")
    value = data.get("value", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= keyspace.MAX_SAFE_VALUE:
        raise InvalidParameter(f"value: must be an integer from 1 to {keyspace.MAX_SAFE_VALUE}.")
    if value != 1:
        raise RuleViolation("value: a presence counter counts leases, a login or logout is always 1.")
    user_id = _presence_id(data, "user_id")
    if not user_id:
        raise RuleViolation("user_id: required by a presence counter (whose lease is it?).")
    metadata = None
    if "metadata" in data:  # given, it must be an object (null too is refused, as the schema says)
        try:
            metadata = MetadataField().to_internal_value(data["metadata"])
        except serializers.ValidationError as exc:
            raise InvalidParameter(f"metadata: {exc.detail[0]}") from exc
    return Lease(user_id, _presence_id(data, "session_id"), _presence_id(data, "node_id")), metadata


def heartbeat_input_parse(data) -> tuple[list[Lease], int | None]:
    """The leases a heartbeat renews and the lease it asks for (None: the counter's).

    ``{"user_id": "u1", "session_id": "s1", "node_id": "n1"}`` for one player,
    ``{"user_ids": [...], "node_id": "n1"}`` for a game server's players (at most
    ``MAX_BATCH_LEASES``), ``{"node_id": "n1"}`` to renew a node alone.
    """
    data = _presence_fields(data, _HEARTBEAT_FIELDS)
    node_id, session_id = _presence_id(data, "node_id"), _presence_id(data, "session_id")
    if "user_ids" in data:
        if "user_id" in data or session_id:
            raise RuleViolation("user_ids: send either user_ids (a batch, no session_id) or user_id.")
        user_ids = data["user_ids"]
        if not isinstance(user_ids, list) or not 1 <= len(user_ids) <= MAX_BATCH_LEASES:
            raise InvalidParameter(f"user_ids: a list of 1 to {MAX_BATCH_LEASES} user ids.")
        for index, user_id in enumerate(user_ids):
            if not isinstance(user_id, str) or not SUBJECT_PATTERN.match(user_id):
                raise InvalidParameter(f"user_ids[{index}]: use {SUBJECT_HELP}.")
        leases = [Lease(user_id, "", node_id) for user_id in user_ids]
    else:
        user_id = _presence_id(data, "user_id")
        if not user_id and (session_id or not node_id):
            raise RuleViolation("user_id: required (or user_ids, or node_id alone to renew a node).")
        leases = [Lease(user_id, session_id, node_id)]
    return leases, data.get("lease_seconds")
