"""Who is calling and what they named: the request helpers every surface (REST v1, cloud functions,
alerts, archive, board) shares."""

import re
from dataclasses import dataclass

from django.utils.translation import gettext as _

from . import selectors
from .config import KeyConfig
from .errors import AuthenticationRequired, CounterNotFound, Forbidden, InvalidParameter
from .models import NAME_PATTERN
from .player_tokens import PlayerToken, player_token_read

_NAME = re.compile(NAME_PATTERN)


def request_key(request, *, body_token: str | None = None) -> KeyConfig | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    raw = header[7:].strip() if header[:7].lower() == "bearer " else request.META.get("HTTP_X_API_KEY", "")
    raw = raw or body_token or ""
    if not raw:
        return None
    key = selectors.api_key_get(raw)
    if key is None:
        raise AuthenticationRequired("The API key is not valid.")
    return key


def request_app_id(request, key: KeyConfig | None) -> int | None:
    if key is not None:
        return key.app_id
    slug = request.GET.get("app")
    if slug:
        app_id = selectors.app_id_get(slug)
        if app_id is None:
            raise CounterNotFound(f"App {slug!r} not found.")
        return app_id
    return selectors.default_app_id()


def checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidParameter("Counter names are 1-64 letters, digits, '_', '.', ':' or '-'.")
    return name


@dataclass(frozen=True, slots=True)
class Caller:
    key: KeyConfig | None
    player: PlayerToken | None

    @property
    def app_id(self) -> int | None:
        if self.key is not None:
            return self.key.app_id
        return self.player.app_id if self.player is not None else None

    def require_key(self) -> KeyConfig:
        if self.player is not None:
            raise Forbidden(_("A player token may only read (getCounter)."))
        if self.key is None:
            raise AuthenticationRequired()
        return self.key


def request_caller(request) -> Caller:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header[:7].lower() == "player ":
        return Caller(key=None, player=player_token_read(header[7:].strip()))
    return Caller(key=request_key(request), player=None)
