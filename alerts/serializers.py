from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from rest_framework import serializers

from counters import keyspace
from counters.models import Threshold
from counters.serializers import QuerySerializer, StrictIntegerField

MAX_COOLDOWN_SECONDS = 366 * 86400


class StrictBooleanField(serializers.Field):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data

    def to_representation(self, value) -> bool:
        return value


class StrictBooleanFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "alerts.serializers.StrictBooleanField"

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "boolean"}


class ThresholdInputSerializer(serializers.Serializer):
    value = StrictIntegerField(min_value=-keyspace.MAX_SAFE_VALUE)
    direction = serializers.ChoiceField(choices=Threshold.Direction.choices, default=Threshold.Direction.UP)
    level = serializers.ChoiceField(choices=Threshold.Level.choices, default=Threshold.Level.INFO)
    enabled = StrictBooleanField(default=True)
    cooldown_seconds = StrictIntegerField(min_value=0, max_value=MAX_COOLDOWN_SECONDS, default=0)
    rearm = StrictBooleanField(default=False)


class ThresholdOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    value = serializers.IntegerField()
    direction = serializers.CharField()
    level = serializers.CharField()
    enabled = serializers.BooleanField()
    cooldown_seconds = serializers.IntegerField()
    rearm = serializers.BooleanField()


class MessageQuerySerializer(QuerySerializer):
    counter = serializers.RegexField(r"^[A-Za-z0-9_.:-]{1,64}$", required=False)
    limit = serializers.IntegerField(min_value=1, max_value=200, default=50)


class MessageOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    counter = serializers.CharField(source="counter.name")
    level = serializers.CharField()
    title = serializers.CharField()
    body = serializers.CharField()
    event_id = serializers.IntegerField()
    created_at = serializers.DateTimeField()
