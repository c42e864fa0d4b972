"""Idempotency-Key on every write: parse and check the key, fingerprint the request.

The check and the record happen in Redis, inside the update script (``keyspace.IDEMPOTENT_PROLOGUE``);
this module is the one place that reads a key from a request and says what "the same request" is,
for the DRF views and the fast lane alike. See docs/idempotency.md.
"""

import hashlib
import re
from dataclasses import dataclass

import orjson
from django.conf import settings
from django.utils.translation import gettext

from .errors import InvalidParameter

HEADER = "Idempotency-Key"
META_HEADER = "HTTP_IDEMPOTENCY_KEY"
REPLAYED_HEADER = "Idempotent-Replayed"
REPLAYED_HEADERS = {REPLAYED_HEADER: "true"}
# UUIDs, ULIDs, base64/base64url and hex tokens fit; no spaces, braces or '|' (part of a Redis
# key name and of nothing else). At least 8 characters: a short key collides between clients.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:@+/=-]{8,255}$")
KEY_HELP = "8-255 letters, digits, '_', '.', ':', '@', '+', '/', '=' or '-' (a UUID fits)"


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A write's Idempotency-Key, the app it belongs to and the fingerprint of its request."""

    key: str
    app_id: int | None
    fingerprint: str

    @property
    def ttl_ms(self) -> int:
        return settings.COUNTER_IDEMPOTENCY_KEY_SECONDS * 1000


def idempotency_key_check(raw, *, field: str = HEADER) -> str:
    """The key if it is well formed, else ``InvalidParameter`` (400, nothing changes)."""
    if not isinstance(raw, str) or not KEY_PATTERN.match(raw):
        raise InvalidParameter(gettext("%(field)s: use %(help)s.") % {"field": field, "help": KEY_HELP})
    return raw


def request_fingerprint(*parts) -> str:
    """What makes two requests "the same": the operation, the target and the parsed input (so
    whitespace, key order and defaults spelled out or left out do not matter)."""
    return hashlib.blake2b(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def idempotency_parse(raw, *, app_id: int | None, parts: tuple, field: str = HEADER) -> Idempotency | None:
    """The ``Idempotency`` of a write whose key is ``raw`` (None: no key sent), or a 400."""
    if raw is None:
        return None
    return Idempotency(idempotency_key_check(raw, field=field), app_id, request_fingerprint(*parts))


def request_idempotency(request, *, app_id: int | None, parts: tuple, body_key=None) -> Idempotency | None:
    """The Idempotency-Key of a Django/DRF request (header, or ``body_key`` from the body, e.g. the
    cloud functions' ``requestId``): both given must agree."""
    header = request.META.get(META_HEADER)
    if header is not None and body_key is not None and header != body_key:
        raise InvalidParameter(gettext("Idempotency-Key and requestId differ: send one, or the same in both."))
    if header is None and body_key is not None:
        return idempotency_parse(body_key, app_id=app_id, parts=parts, field="requestId")
    return idempotency_parse(header, app_id=app_id, parts=parts)
