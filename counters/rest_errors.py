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
    400: OpenApiResponse(RestError, description="4001: bad parameter."),
    401: OpenApiResponse(RestError, description="4003: no valid API key."),
    403: OpenApiResponse(RestError, description="4003: the key lacks a role for this."),
    404: OpenApiResponse(RestError, description="4004: not found (or another app's)."),
    405: OpenApiResponse(RestError, description="4001: wrong method."),
    503: OpenApiResponse(RestError, description="5003: the counter store is down: read-only."),
}
