"""Outgoing HTTP for alerts: JSON POSTs with a timeout, no redirects, optional HMAC signature."""

import hashlib
import hmac
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import orjson
from django.conf import settings

SIGNATURE_HEADER = "X-Counter-Signature"
TIMESTAMP_HEADER = "X-Counter-Timestamp"
DELIVERY_HEADER = "X-Counter-Delivery"
MAX_ERROR_BODY = 300


class DeliveryError(Exception):
    """One delivery attempt failed; ``status_code`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True, slots=True)
class HttpResult:
    status_code: int


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could turn the POST into a GET or send the signature elsewhere: it is a failure.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def sign(*, secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over ``timestamp + "." + body``, hex, as sent in the signature header."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def post_json(*, url: str, payload, secret: str = "", headers: dict[str, str] | None = None) -> HttpResult:
    body = orjson.dumps(payload)
    all_headers = {"Content-Type": "application/json", "User-Agent": "counter-service-alerts/1"}
    all_headers.update(headers or {})
    if secret:
        timestamp = str(int(time.time()))
        all_headers[TIMESTAMP_HEADER] = timestamp
        all_headers[SIGNATURE_HEADER] = sign(secret=secret, timestamp=timestamp, body=body)
    request = urllib.request.Request(url, data=body, headers=all_headers, method="POST")
    try:
        with _opener.open(request, timeout=settings.ALERTS_HTTP_TIMEOUT_SECONDS) as response:
            return HttpResult(response.status)
    except urllib.error.HTTPError as exc:
        detail = exc.read(MAX_ERROR_BODY).decode(errors="replace")
        raise DeliveryError(f"HTTP {exc.code}: {detail}".strip(), status_code=exc.code) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"{type(reason).__name__}: {reason}") from exc
