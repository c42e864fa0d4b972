"""Thresholds of a counter for managers (``counter_manage``), and the in-system alert messages."""

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from counters import selectors as counter_selectors
from counters.auth import checked_name, request_app_id, request_key
from counters.models import NAME_PATTERN, ApiKey
from counters.permissions import check_manage, require_role
from counters.rest_errors import REST_ERRORS

from . import selectors, services
from .serializers import (
    MessageOutputSerializer,
    MessageQuerySerializer,
    ThresholdInputSerializer,
    ThresholdOutputSerializer,
)


class ThresholdReply(serializers.Serializer):
    success = serializers.BooleanField()
    threshold = ThresholdOutputSerializer()


class ThresholdListReply(serializers.Serializer):
    success = serializers.BooleanField()
    thresholds = ThresholdOutputSerializer(many=True)


class MessageListReply(serializers.Serializer):
    success = serializers.BooleanField()
    messages = MessageOutputSerializer(many=True)


class DeletedReply(serializers.Serializer):
    success = serializers.BooleanField()


NAME = OpenApiParameter("name", str, OpenApiParameter.PATH, pattern=NAME_PATTERN)
THRESHOLD_ID = OpenApiParameter("threshold_id", int, OpenApiParameter.PATH)
MANAGE = "Needs the `counter_manage` role on the counter's app (global counters: also `global_admin`)."
TAGS = ["Thresholds and alerts"]


def _managed_counter(request, name: str):
    key = request_key(request)
    counter = counter_selectors.counter_get(app_id=request_app_id(request, key), name=checked_name(name))
    check_manage(key, counter)
    return counter


@extend_schema_view(
    get=extend_schema(
        tags=TAGS,
        summary="List a counter's thresholds",
        description=MANAGE,
        parameters=[NAME],
        responses={200: ThresholdListReply, **REST_ERRORS},
    ),
    post=extend_schema(
        tags=TAGS,
        summary="Add a threshold",
        description=MANAGE,
        parameters=[NAME],
        request=ThresholdInputSerializer,
        responses={201: ThresholdReply, **REST_ERRORS},
    ),
)
class ThresholdListView(APIView):
    """GET /api/v1/counter/{name}/thresholds lists them; POST adds one."""

    error_shape = "rest"

    def get(self, request, name: str) -> Response:
        counter = _managed_counter(request, name)
        thresholds = selectors.thresholds_list(counter=counter)
        return Response({"success": True, "thresholds": ThresholdOutputSerializer(thresholds, many=True).data})

    def post(self, request, name: str) -> Response:
        counter = _managed_counter(request, name)
        data = ThresholdInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        threshold = services.threshold_create(counter=counter, **data.validated_data)
        return Response({"success": True, "threshold": ThresholdOutputSerializer(threshold).data}, status=201)


@extend_schema_view(
    patch=extend_schema(
        tags=TAGS,
        summary="Change a threshold (only the fields given)",
        description=MANAGE,
        parameters=[NAME, THRESHOLD_ID],
        request=ThresholdInputSerializer(partial=True),
        responses={200: ThresholdReply, **REST_ERRORS},
    ),
    delete=extend_schema(
        tags=TAGS,
        summary="Delete a threshold (and its events)",
        description=MANAGE,
        parameters=[NAME, THRESHOLD_ID],
        responses={200: OpenApiResponse(DeletedReply), **REST_ERRORS},
    ),
)
class ThresholdDetailView(APIView):
    """PATCH /api/v1/counter/{name}/thresholds/{id} changes the fields given; DELETE removes it."""

    error_shape = "rest"

    def patch(self, request, name: str, threshold_id: int) -> Response:
        counter = _managed_counter(request, name)
        data = ThresholdInputSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        threshold = services.threshold_update(counter=counter, threshold_id=threshold_id, changes=data.validated_data)
        return Response({"success": True, "threshold": ThresholdOutputSerializer(threshold).data})

    def delete(self, request, name: str, threshold_id: int) -> Response:
        counter = _managed_counter(request, name)
        services.threshold_delete(counter=counter, threshold_id=threshold_id)
        return Response({"success": True})


@extend_schema_view(
    get=extend_schema(
        tags=TAGS,
        summary="In-system alert messages of the key's app, newest first",
        description="Needs the `counter_manage` role.",
        parameters=[MessageQuerySerializer],
        responses={200: MessageListReply, **REST_ERRORS},
    ),
)
class MessageListView(APIView):
    """GET /api/v1/alerts/messages?counter=<name>&limit=<n>: the key's app's in-system messages."""

    error_shape = "rest"

    def get(self, request) -> Response:
        key = require_role(request_key(request), ApiKey.Role.COUNTER_MANAGE)
        query = MessageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        counter_id = None
        if "counter" in query.validated_data:
            counter_id = counter_selectors.counter_get(app_id=key.app_id, name=query.validated_data["counter"]).id
        limit = query.validated_data["limit"]
        messages = selectors.messages_list(app_id=key.app_id, counter_id=counter_id, limit=limit)
        return Response({"success": True, "messages": MessageOutputSerializer(messages, many=True).data})
