"""The one error path: typed domain errors (and DRF's own) rendered in each surface's shape.

REST v1 answers ``{"success": false, "error": {"code", "message"}}``; the cloud functions answer
``{"code", "msg", "timestamp", "data": null}``. A view says which with ``error_shape``.
"""

import logging
import time

from django.http import HttpResponse, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from .errors import (
    AuthenticationRequired,
    CounterError,
    Forbidden,
    InternalError,
    InvalidParameter,
    MethodNotAllowed,
    OutcomeUnknown,
    ServiceReadOnly,
)
from .redis_store import StoreUnavailable
from .rendering import json_response

logger = logging.getLogger(__name__)

READ_ONLY_RETRY_AFTER_SECONDS = 5


def _from_drf(exc: drf_exceptions.APIException) -> CounterError:
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        allowed = "POST" if exc.detail and "GET" in str(exc.detail) else "the documented method"
        return MethodNotAllowed(f"{exc.detail} Use {allowed}.")
    if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
        return AuthenticationRequired()
    if isinstance(exc, drf_exceptions.PermissionDenied):
        return Forbidden()
    if isinstance(exc, drf_exceptions.NotFound):
        error = CounterError(str(exc.detail))
        error.code, error.status = 4004, 404
        return error
    if isinstance(exc, drf_exceptions.ValidationError):
        return InvalidParameter(_first_message(exc.detail))
    error = InvalidParameter(str(exc.detail))
    error.status = exc.status_code
    return error


def _first_message(detail, field: str = "") -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = field if key == "non_field_errors" else key
            return _first_message(value, name)
    if isinstance(detail, list) and detail:
        return _first_message(detail[0], field)
    return f"{field}: {detail}" if field else str(detail)


def as_counter_error(exc: Exception) -> CounterError:
    if isinstance(exc, CounterError):
        return exc
    if isinstance(exc, StoreUnavailable):
        if exc.maybe_applied:
            return OutcomeUnknown()
        return ServiceReadOnly(headers={"Retry-After": str(READ_ONLY_RETRY_AFTER_SECONDS)})
    if isinstance(exc, drf_exceptions.APIException):
        return _from_drf(exc)
    logger.exception("unhandled error", exc_info=exc)
    return InternalError()


def rest_body(error: CounterError) -> dict:
    return {"success": False, "error": {"code": error.code, "message": error.message}}


def function_body(error: CounterError) -> dict:
    return {"code": error.code, "msg": error.message, "timestamp": int(time.time() * 1000), "data": None}


def exception_handler(exc: Exception, context: dict) -> Response:
    error = as_counter_error(exc)
    body = _body(error, getattr(context.get("view"), "error_shape", "rest"))
    return Response(body, status=error.status, headers=error.headers)


def error_response(exc: Exception, shape: str) -> HttpResponse:
    """The same answer as ``exception_handler``, for the lean views that skip DRF's response cycle."""
    error = as_counter_error(exc)
    return json_response(_body(error, shape), status=error.status, headers=error.headers)


def _body(error: CounterError, shape: str) -> dict:
    return function_body(error) if shape == "function" else rest_body(error)


def not_found(request, exception=None) -> JsonResponse:
    error = CounterError(f"No such endpoint: {request.path}")
    error.code, error.status = 4004, 404
    return JsonResponse(rest_body(error), status=404)


def server_error(request) -> JsonResponse:
    return JsonResponse(rest_body(InternalError()), status=500)
