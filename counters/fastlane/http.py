"""The HTTP side of the fast lane: a request object the views' helpers accept, the Host check, and
replies with the headers Django's middleware gives the same replies on the Django path."""

import logging
from functools import cached_property

from django.conf import settings
from django.core.signals import setting_changed
from django.http import HttpRequest, HttpResponse, QueryDict
from django.http.cookie import parse_cookie
from django.http.request import split_domain_port, validate_host
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils.http import parse_header_parameters

request_logger = logging.getLogger("django.request")


class LaneRequest:
    """What the views' helpers read from Django's request (META, GET, COOKIES, the body), built lazily."""

    def __init__(self, scope, body: bytes) -> None:
        self.method = scope["method"]
        self.path = self.path_info = scope["path"]
        self._scope = scope
        self._body = body
        meta = {"REQUEST_METHOD": self.method, "QUERY_STRING": scope["query_string"].decode("latin-1")}
        for raw_name, raw_value in scope["headers"]:
            name = _META_NAMES.get(raw_name) or _meta_name(raw_name)
            value = raw_value.decode("latin-1")
            meta[name] = f"{meta[name]},{value}" if name in meta else value
        self.META = meta
        self.language: str | None = None  # a cloud function's, once ``handlers.answer`` found it

    @cached_property
    def content_type(self) -> str:
        return parse_header_parameters(self.META.get("CONTENT_TYPE", ""))[0]

    @cached_property
    def GET(self) -> "LaneQuery | QueryDict":
        raw = self._scope["query_string"]
        plain = raw.isascii() and b"%" not in raw and b"+" not in raw and raw.count(b"&") < 100
        return LaneQuery(raw) if plain else QueryDict(raw)

    @cached_property
    def COOKIES(self) -> dict:
        return parse_cookie(self.META.get("HTTP_COOKIE", ""))

    def read(self) -> bytes:
        return self._body


# Header name (as the server gives it, lower case) -> its META key, as Django's WSGI handler names it.
_META_NAMES: dict[bytes, str] = {}


def _meta_name(raw_name: bytes) -> str:
    name = raw_name.decode("latin-1").upper().replace("-", "_")
    if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        name = f"HTTP_{name}"
    if len(_META_NAMES) < 1000:  # the usual few dozen; a client inventing names does not grow it
        _META_NAMES[raw_name] = name
    return name


class LaneQuery:
    """``QueryDict.get`` for a plain query string (ASCII, nothing encoded, under 100 fields): the last
    value of a key, as Django gives it. Anything else is parsed by ``QueryDict`` itself (its field
    limit included); building one costs more than the rest of reading a counter."""

    def __init__(self, raw: bytes) -> None:
        values: dict[str, str] = {}
        for pair in raw.decode().split("&"):
            if pair:
                key, _, value = pair.partition("=")
                values[key] = value
        self._values = values

    def get(self, key: str, default=None):
        return self._values.get(key, default)


# Host header -> allowed, and the request body limit: read once (and again when a test changes a
# setting), as every lane request asks them.
_hosts: dict[bytes, bool] = {}
body_limit = settings.COUNTER_MAX_BODY_BYTES


def _settings_changed(**_) -> None:
    global body_limit
    _hosts.clear()
    body_limit = settings.COUNTER_MAX_BODY_BYTES


setting_changed.connect(_settings_changed, dispatch_uid="counters.fastlane.http")


def host_allowed(scope) -> bool:
    """Django's ``get_host`` check against ALLOWED_HOSTS (a refused host goes to Django, which answers 400)."""
    for name, value in scope["headers"]:
        if name == b"host":
            return host_value_allowed(value)
    return False


def host_value_allowed(raw: bytes | None) -> bool:
    """``host_allowed`` for the value of the request's first Host header (None: there was none)."""
    if raw is None:
        return False
    allowed = _hosts.get(raw)
    if allowed is None:
        if settings.USE_X_FORWARDED_HOST:
            return False
        domain, _port = split_domain_port(raw.decode("latin-1"))
        hosts = settings.ALLOWED_HOSTS
        if settings.DEBUG and not hosts:
            hosts = [".localhost", "127.0.0.1", "[::1]"]
        allowed = bool(domain) and validate_host(domain, hosts)
        if len(_hosts) < 1000:
            _hosts[raw] = allowed
    return allowed


def _middleware_headers() -> tuple[list, list]:
    """The headers Django's middleware adds to a JSON reply: those set before Content-Length and after.

    Computed once from the middleware itself, so they follow the settings (SECURE_*, X_FRAME_OPTIONS).
    """
    request = HttpRequest()
    request.method = "GET"
    request.META = {"SERVER_NAME": "localhost", "SERVER_PORT": "80"}
    response = HttpResponse(b"{}", content_type="application/json")
    names = settings.MIDDLEWARE
    if "django.middleware.clickjacking.XFrameOptionsMiddleware" in names:
        response = XFrameOptionsMiddleware(lambda r: response).process_response(request, response)
    before = [(k.lower().encode(), v.encode()) for k, v in response.items() if k.lower() != "content-type"]
    if "django.middleware.common.CommonMiddleware" in names:
        response = CommonMiddleware(lambda r: response).process_response(request, response)
    known = {k for k, _ in before} | {b"content-type", b"content-length"}
    if "django.middleware.security.SecurityMiddleware" in names:
        response = SecurityMiddleware(lambda r: response).process_response(request, response)
    after = [(k.lower().encode(), v.encode()) for k, v in response.items() if k.lower().encode() not in known]
    return before, after


BEFORE_LENGTH, AFTER_LENGTH = _middleware_headers()
JSON = (b"content-type", b"application/json")


async def send_json(send, status: int, body: bytes, extra: list) -> None:
    headers = [JSON, *extra, *BEFORE_LENGTH, (b"content-length", str(len(body)).encode()), *AFTER_LENGTH]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def log_error_reply(status: int, reason: str, path: str) -> None:
    """What Django's ``log_response`` writes for a 4xx/5xx reply."""
    if status >= 500:
        request_logger.error("%s: %s", reason, path, extra={"status_code": status})
    elif status >= 400:
        request_logger.warning("%s: %s", reason, path, extra={"status_code": status})
