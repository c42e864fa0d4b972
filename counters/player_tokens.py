"""Player tokens: a game server (API key with ``write``) gets a signed token for one of its players;
the player's client sends it as ``Authorization: Player <token>`` and may read only its own values.

Tokens are signed with the project's secret (``django.core.signing``), carry the app and the player
and expire after ``COUNTER_PLAYER_TOKEN_SECONDS``; nothing is stored, so issuing one writes nothing.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core import signing
from django.utils.translation import gettext as _

from . import clock
from .config import KeyConfig
from .errors import AuthenticationRequired

SALT = "counters.player-token"


@dataclass(frozen=True, slots=True)
class PlayerToken:
    app_id: int
    player_id: str


def player_token_issue(*, key: KeyConfig, player_id: str) -> tuple[str, datetime]:
    token = signing.dumps({"a": key.app_id, "p": player_id}, salt=SALT, compress=False)
    return token, clock.now() + timedelta(seconds=settings.COUNTER_PLAYER_TOKEN_SECONDS)


def player_token_read(raw: str) -> PlayerToken:
    try:
        payload = signing.loads(raw, salt=SALT, max_age=settings.COUNTER_PLAYER_TOKEN_SECONDS)
    except signing.SignatureExpired as exc:
        raise AuthenticationRequired(_("The player token has expired: ask the game server for a new one.")) from exc
    except signing.BadSignature as exc:
        raise AuthenticationRequired(_("The player token is not valid.")) from exc
    return PlayerToken(app_id=int(payload["a"]), player_id=str(payload["p"]))
