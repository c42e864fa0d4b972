"""SMS: a small pluggable backend interface (``ALERTS_SMS_BACKEND``, a dotted path).

Shipped: ``HttpGatewayBackend`` (POSTs ``{"to": [...], "text": ...}`` to ``ALERTS_SMS_GATEWAY_URL``
with an optional bearer token) and ``LoggingBackend`` (development: writes the text to the log).
A provider-specific backend subclasses ``SmsBackend`` and raises ``DeliveryError`` on failure.
"""

import logging

from django.conf import settings
from django.utils.module_loading import import_string

from .http import DeliveryError, post_json

logger = logging.getLogger(__name__)


class SmsBackend:
    def send(self, *, to: list[str], text: str) -> int | None:
        """Send ``text`` to each number; return the provider's HTTP status if there is one."""
        raise NotImplementedError


class LoggingBackend(SmsBackend):
    def send(self, *, to: list[str], text: str) -> int | None:
        logger.info("SMS to %s: %s", ", ".join(to), text)
        return None


class HttpGatewayBackend(SmsBackend):
    def send(self, *, to: list[str], text: str) -> int | None:
        url = settings.ALERTS_SMS_GATEWAY_URL
        if not url:
            raise DeliveryError("ALERTS_SMS_GATEWAY_URL is not set.")
        token = settings.ALERTS_SMS_GATEWAY_TOKEN
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return post_json(url=url, payload={"to": to, "text": text}, headers=headers).status_code


def sms_backend() -> SmsBackend:
    return import_string(settings.ALERTS_SMS_BACKEND)()
