"""Input and output shapes of the cloud functions: parsing here, documented in the schema."""

import re
from datetime import date, datetime

from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from . import keyspace
from .idempotency import KEY_HELP, KEY_PATTERN
from .models import NAME_PATTERN
from .serializers import (
    METADATA_HELP,
    MetadataField,
    QuerySerializer,
    StrictCharField,
    StrictIntegerField,
    StrictRegexField,
    SubjectField,
)

COUNTER_TYPES = ["global", "app", "user", "daily", "weekly", "monthly"]
GROUP_BY = ["hour", "day", "week"]


class StrictBooleanField(serializers.BooleanField):
    """A JSON true/false only: "yes", 1 or "false" are refused rather than guessed."""

    def to_internal_value(self, data) -> bool:
        if not isinstance(data, bool):
            raise serializers.ValidationError(_("Must be true or false."))
        return data


class TargetSerializer(serializers.Serializer):
    appId = StrictRegexField(NAME_PATTERN, help_text="The app of the API key (its slug).")
    counterType = serializers.ChoiceField(COUNTER_TYPES)
    counterId = StrictRegexField(NAME_PATTERN, help_text="The counter's name.")
    playerId = SubjectField(
        required=False,
        help_text="Required for user counters (409 without it). On a unique-member counter (daily_active_users) "
        "it is the member counted once per period; other counters ignore it.",
    )


@extend_schema_field({"type": "string", "pattern": KEY_PATTERN.pattern})
class RequestIdField(serializers.CharField):
    """The Idempotency-Key in the body (a JSON string only: a number is refused, not converted)."""

    def to_internal_value(self, data) -> str:
        if not isinstance(data, str) or not KEY_PATTERN.match(data):
            raise serializers.ValidationError(_("Use %(help)s.") % {"help": KEY_HELP})
        return data


REQUEST_ID_HELP = (
    "The write's Idempotency-Key (or send the Idempotency-Key header): a retry with the same one is "
    "applied at most once and answers the first reply. See docs/idempotency.md."
)


class WriteSerializer(TargetSerializer):
    requestId = RequestIdField(required=False, help_text=REQUEST_ID_HELP)


class IncreaseSerializer(WriteSerializer):
    increment = StrictIntegerField(min_value=1, default=1)
    metadata = MetadataField(required=False, help_text=METADATA_HELP)


class DecreaseSerializer(WriteSerializer):
    decrement = StrictIntegerField(min_value=1, default=1)
    allowNegative = StrictBooleanField(
        default=False,
        help_text="Let this decrement go below the counter's minimum: honoured for keys with counter_manage "
        "(a counter configured to allow negatives allows them anyway).",
    )
    metadata = MetadataField(required=False, help_text=METADATA_HELP)


class ResetSerializer(WriteSerializer):
    resetValue = StrictIntegerField(min_value=-keyspace.MAX_SAFE_VALUE, required=False)
    reason = StrictCharField(max_length=500, trim_whitespace=True)
    operatorId = StrictCharField(
        max_length=100, required=False, help_text="Who asked for the reset (kept in the reset log with the key)."
    )


_RFC3339_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_RFC3339_DATE_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339_parse(raw: str) -> date | datetime | None:
    try:
        if _RFC3339_DATE.match(raw):
            return date.fromisoformat(raw)
        parts = _RFC3339_DATE_TIME.match(raw)
        if parts is None:
            return None
        day, clock_time, fraction, offset = parts.groups()
        offset = "+00:00" if offset in ("Z", "z") else offset
        # Python keeps microseconds: further digits of the fraction are dropped.
        return datetime.fromisoformat(f"{day}T{clock_time}{(fraction or '')[:7]}{offset}")
    except ValueError:
        return None


class StatsDateField(serializers.Field):
    """A date (``YYYY-MM-DD``: a whole day in the app's time zone) or a date and time with its offset:
    exactly the OpenAPI formats ``date`` and ``date-time`` (RFC 3339), as a ``date`` or an aware ``datetime``."""

    def to_internal_value(self, data) -> date | datetime:
        moment = _rfc3339_parse(data) if isinstance(data, str) else None
        if moment is None:
            raise serializers.ValidationError(_("Use YYYY-MM-DD or a date and time with its offset (RFC 3339)."))
        return moment

    def to_representation(self, value) -> str:
        return value.isoformat()


class StatsSerializer(serializers.Serializer):
    appId = StrictRegexField(NAME_PATTERN)
    counterType = serializers.ChoiceField(COUNTER_TYPES, required=False)
    startDate = StatsDateField(
        required=False, help_text="A date (in the app's time zone) or date-time; default: 7 days ago."
    )
    endDate = StatsDateField(required=False, help_text="A date (that whole day included) or date-time; default: now.")
    groupBy = serializers.ChoiceField(GROUP_BY, default="day")


class StatsQuerySerializer(QuerySerializer, StatsSerializer):
    appId = StrictRegexField(NAME_PATTERN, required=False, help_text="Default: the API key's app.")


# --- replies (schema and examples only: the views build plain dicts) ---------------------------


class CounterMetadataOut(serializers.Serializer):
    description = serializers.CharField()
    unit = serializers.CharField()


class GetCounterData(serializers.Serializer):
    counterId = serializers.CharField()
    counterType = serializers.ChoiceField(COUNTER_TYPES)
    counterName = serializers.CharField()
    currentValue = serializers.IntegerField()
    maxValue = serializers.IntegerField(allow_null=True)
    resetPeriod = serializers.ChoiceField(["none", "daily", "weekly", "monthly"])
    lastResetTime = serializers.DateTimeField(
        allow_null=True, help_text="A manual reset in the current period, else the period's start (null: never)."
    )
    nextResetTime = serializers.DateTimeField(allow_null=True)
    updateTime = serializers.DateTimeField(allow_null=True)
    metadata = CounterMetadataOut()


class ThresholdOut(serializers.Serializer):
    value = serializers.IntegerField()
    triggered = serializers.BooleanField()
    triggerTime = serializers.DateTimeField(allow_null=True)


class IncreaseData(serializers.Serializer):
    counterId = serializers.CharField()
    oldValue = serializers.IntegerField()
    newValue = serializers.IntegerField()
    increment = serializers.IntegerField()
    updateTime = serializers.DateTimeField()
    hitThreshold = serializers.BooleanField()
    thresholds = ThresholdOut(many=True)


class DecreaseData(serializers.Serializer):
    counterId = serializers.CharField()
    oldValue = serializers.IntegerField()
    newValue = serializers.IntegerField()
    decrement = serializers.IntegerField()
    updateTime = serializers.DateTimeField()
    reachedMinimum = serializers.BooleanField()


class ResetData(serializers.Serializer):
    counterId = serializers.CharField()
    oldValue = serializers.IntegerField()
    newValue = serializers.IntegerField()
    resetTime = serializers.DateTimeField()
    reason = serializers.CharField()
    operatorId = serializers.CharField()


class StatsSummaryOut(serializers.Serializer):
    totalCounters = serializers.IntegerField()
    activeCounters = serializers.IntegerField()
    totalOperations = serializers.IntegerField()
    avgValue = serializers.FloatField()


class StatsCounterOut(serializers.Serializer):
    counterId = serializers.CharField()
    counterName = serializers.CharField()
    currentValue = serializers.IntegerField()
    peakValue = serializers.IntegerField()
    operationCount = serializers.IntegerField()
    lastUpdateTime = serializers.DateTimeField(allow_null=True)


class StatsPointOut(serializers.Serializer):
    time = serializers.DateTimeField()
    value = serializers.IntegerField(
        help_text="Level of the selected counters (the sum of their values) at the end of this slot "
        "(e.g. 1200 at 10:00 for a counter now at 1251); per-player counters are not part of it."
    )
    operations = serializers.IntegerField(help_text="Operations of the selected counters in this slot.")


class StatsTopOut(serializers.Serializer):
    counterId = serializers.CharField()
    value = serializers.IntegerField()
    ranking = serializers.IntegerField()


class StatsData(serializers.Serializer):
    summary = StatsSummaryOut()
    counterList = StatsCounterOut(many=True)
    timeSeries = StatsPointOut(many=True)
    topCounters = StatsTopOut(many=True)


def envelope(name: str, data: type[serializers.Serializer]) -> type[serializers.Serializer]:
    """The ``{code, msg, timestamp, data}`` reply around one function's data, for the schema."""
    fields = {
        "code": serializers.IntegerField(help_text="0 on success."),
        "msg": serializers.CharField(help_text="Translated by Accept-Language (zh-Hans, zh-Hant, en)."),
        "timestamp": serializers.IntegerField(help_text="Server time, ms since the epoch."),
        "data": data(),
    }
    return type(name, (serializers.Serializer,), fields)


class FunctionError(serializers.Serializer):
    code = serializers.ChoiceField([4001, 4003, 4004, 4005, 5001, 5003])
    msg = serializers.CharField()
    timestamp = serializers.IntegerField()
    data = serializers.JSONField(allow_null=True, help_text="Always null on errors.")


class PlayerTokenSerializer(serializers.Serializer):
    player_id = SubjectField()


class PlayerTokenOut(serializers.Serializer):
    token = serializers.CharField()
    player_id = serializers.CharField()
    expires_at = serializers.DateTimeField()
