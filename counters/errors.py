"""Typed domain errors. Each carries the service's error code and an HTTP status; one exception
handler (``counters.api_errors``) renders them in the shape of the surface that was called.

Messages are translated when the error is raised, in the language the view activated (the cloud
functions follow Accept-Language; REST v1 answers in the default language)."""

from django.utils.translation import gettext_lazy as _


class CounterError(Exception):
    code = 5001
    status = 500
    default_message = _("Internal error.")

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        self.message = str(message or self.default_message)
        self.headers = headers or {}
        super().__init__(self.message)


class InvalidParameter(CounterError):
    code = 4001
    status = 400
    default_message = _("Invalid parameter.")


class RuleViolation(InvalidParameter):
    """A well-formed request that a rule of the service refuses, a rule depending on the counter's
    configuration or on several fields together (so the OpenAPI schema cannot state it). 409 rather
    than 400: a client generated from the schema can tell "my request is malformed" from "this
    counter does not allow it". Nothing is changed."""

    status = 409


class AuthenticationRequired(CounterError):
    code = 4003
    status = 401
    default_message = _("A valid API key is required (Authorization: Bearer <key> or X-API-Key).")


class Forbidden(CounterError):
    code = 4003
    status = 403
    default_message = _("This API key is not allowed to do that.")


class CounterNotFound(CounterError):
    code = 4004
    status = 404
    default_message = _("Counter not found.")


class OutOfLimits(CounterError):
    code = 4005
    status = 409
    default_message = _("The value would leave the counter's limits; nothing was changed.")


class IdempotencyConflict(CounterError):
    """The Idempotency-Key was already used for a different request: nothing was changed."""

    code = 4001
    status = 409
    default_message = _(
        "This Idempotency-Key was already used with a different request; nothing was changed. "
        "Use a new key for a new request."
    )


class MethodNotAllowed(CounterError):
    code = 4001
    status = 405


class ServiceReadOnly(CounterError):
    code = 5003
    status = 503
    default_message = _("The counter store is unavailable: the service is read-only for now. Retry later.")


class OutcomeUnknown(CounterError):
    """Redis timed out after the update was sent: it may or may not have been applied."""

    code = 5004
    status = 504
    default_message = _(
        "The counter store did not answer in time: the update may have been applied. "
        "Retry with the same Idempotency-Key: it is applied at most once. (Without a key, read the "
        "counter before retrying, or the update may count twice.)"
    )


class InternalError(CounterError):
    pass


class RequestTooLarge(CounterError):
    code = 4001
    status = 413
    default_message = _("The request body is too large.")
