import re

import orjson
from django.conf import settings
from django.utils.translation import gettext, gettext_lazy
from rest_framework import serializers

from . import keyspace

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


class SubjectField(serializers.CharField):
    def to_internal_value(self, data) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError(gettext("Must be a string of %(help)s.") % {"help": SUBJECT_HELP})
        if not SUBJECT_PATTERN.match(data):
            raise serializers.ValidationError(gettext("Use %(help)s.") % {"help": SUBJECT_HELP})
        return data


class MetadataField(serializers.Field):
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


class UpdateInputSerializer(serializers.Serializer):
    value = StrictIntegerField(min_value=1, default=1)
    user_id = SubjectField(required=False)
    metadata = MetadataField(required=False)


class ResetInputSerializer(serializers.Serializer):
    admin_token = serializers.CharField(required=False, max_length=200)
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500, default="")
    reset_value = StrictIntegerField(min_value=-keyspace.MAX_SAFE_VALUE, required=False)
    user_id = SubjectField(required=False)
