"""Who may do what with a counter. API keys belong to one app and carry roles."""

from django.utils.translation import gettext as _

from .config import CounterConfig, KeyConfig
from .errors import AuthenticationRequired, CounterNotFound, Forbidden
from .models import ApiKey

Role = ApiKey.Role


def _same_app_or_global(key: KeyConfig, counter: CounterConfig) -> None:
    if not counter.is_global and key.app_id != counter.app_id:
        # Never confirm that another app's counter exists.
        raise CounterNotFound(_("Counter '%(name)s' not found.") % {"name": counter.name})


def require_role(key: KeyConfig | None, role: str) -> KeyConfig:
    """The key, if there is one and it carries ``role`` (any app's counters: the caller scopes by app)."""
    if key is None:
        raise AuthenticationRequired()
    if role not in key.roles:
        raise Forbidden(_("This API key lacks the '%(role)s' role.") % {"role": role})
    return key


def _require(key: KeyConfig | None, counter: CounterConfig, role: str) -> KeyConfig:
    if key is None:
        raise AuthenticationRequired()
    _same_app_or_global(key, counter)
    require_role(key, role)
    if counter.is_global and Role.GLOBAL_ADMIN not in key.roles:
        raise Forbidden(
            _("Counter '%(name)s' is global: changing it needs the 'global_admin' role.") % {"name": counter.name}
        )
    return key


def check_write(key: KeyConfig | None, counter: CounterConfig) -> KeyConfig:
    return _require(key, counter, Role.WRITE)


def check_manage(key: KeyConfig | None, counter: CounterConfig) -> KeyConfig:
    return _require(key, counter, Role.COUNTER_MANAGE)


def check_read(key: KeyConfig | None, counter: CounterConfig) -> None:
    if counter.public:
        return
    if key is None:
        raise AuthenticationRequired(
            _("Counter '%(name)s' is not public: an API key is required.") % {"name": counter.name}
        )
    _same_app_or_global(key, counter)


def check_data_view(key: KeyConfig | None) -> KeyConfig:
    """Statistics of the key's own app (the caller resolves the app; other apps are never visible)."""
    return require_role(key, Role.DATA_VIEW)
