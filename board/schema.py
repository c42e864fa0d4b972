"""OpenAPI (drf-spectacular) description of the board's JSON endpoint."""

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers

from counters.rest_errors import RestError

from .views import BoardValuesView


class BoardCounter(serializers.Serializer):
    name = serializers.CharField()
    display_name = serializers.CharField()
    unit = serializers.CharField(allow_blank=True)
    value = serializers.IntegerField()
    last_updated = serializers.DateTimeField(allow_null=True)


class BoardReply(serializers.Serializer):
    app = serializers.CharField()
    degraded = serializers.BooleanField(help_text="True while values are read from PostgreSQL (Redis down).")
    counters = BoardCounter(many=True)


extend_schema_view(
    get=extend_schema(
        tags=["Board"],
        summary="Public counters of an app, for the live board",
        parameters=[OpenApiParameter("app", str, description="App slug (default app).")],
        responses={200: BoardReply, 404: OpenApiResponse(RestError, description="4004: no such app.")},
    )
)(BoardValuesView)
