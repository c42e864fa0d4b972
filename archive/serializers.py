from rest_framework import serializers

from counters import keyspace
from counters.models import NAME_PATTERN
from counters.serializers import QuerySerializer, StrictCharField, StrictIntegerField, StrictRegexField, SubjectField

MAX_HISTORY_DAYS = 3660
MAX_BATCH_RESET = 50


class HistoryQuerySerializer(QuerySerializer):
    days = serializers.IntegerField(min_value=1, max_value=MAX_HISTORY_DAYS, default=7, help_text="Default: 7.")
    user_id = SubjectField(required=False, help_text="The player (user counters).")


class ResetItemSerializer(serializers.Serializer):
    name = StrictRegexField(NAME_PATTERN)
    user_id = SubjectField(required=False)
    reset_value = StrictIntegerField(min_value=-keyspace.MAX_SAFE_VALUE, required=False)


class BatchResetInputSerializer(serializers.Serializer):
    admin_token = StrictCharField(required=False, max_length=200)
    reason = StrictCharField(max_length=500)
    counters = ResetItemSerializer(many=True, allow_empty=False, max_length=MAX_BATCH_RESET)
