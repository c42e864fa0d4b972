from rest_framework import serializers

from counters import keyspace
from counters.serializers import StrictIntegerField, SubjectField

MAX_HISTORY_DAYS = 3660
MAX_BATCH_RESET = 50


class HistoryQuerySerializer(serializers.Serializer):
    days = serializers.IntegerField(min_value=1, max_value=MAX_HISTORY_DAYS, default=7)
    user_id = SubjectField(required=False)


class ResetItemSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=64)
    user_id = SubjectField(required=False)
    reset_value = StrictIntegerField(min_value=-keyspace.MAX_SAFE_VALUE, required=False)


class BatchResetInputSerializer(serializers.Serializer):
    admin_token = serializers.CharField(required=False, max_length=200)
    reason = serializers.CharField(max_length=500)
    counters = ResetItemSerializer(many=True, allow_empty=False, max_length=MAX_BATCH_RESET)
