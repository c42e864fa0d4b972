"""Who may do what with a counter. API keys belong to one app and carry roles."""

from .config import CounterConfig, KeyConfig
from .errors import AuthenticationRequired, CounterNotFound, Forbidden
from .models import ApiKey

Role = ApiKey.Role


def _same_app_or_global(key: KeyConfig, counter: CounterConfig) -> None:
    if not counter.is_global and key.app_id != counter.app_id:
        # Never confirm that another app's counter exists.
        raise CounterNotFound(f"Counter {counter.name!r} not found.")


def _require(key: KeyConfig | None, counter: CounterConfig, role: str) -> KeyConfig:
    if key is None:
        raise AuthenticationRequired()
    _same_app_or_global(key, counter)
    if role not in key.roles:
        raise Forbidden(f"This API key lacks the '{role}' role.")
    if counter.is_global and Role.GLOBAL_ADMIN not in key.roles:
        raise Forbidden(f"Counter {counter.name!r} is global: changing it needs the 'global_admin' role.")
    return key


def check_write(key: KeyConfig | None, counter: CounterConfig) -> KeyConfig:
    return _require(key, counter, Role.WRITE)


def check_manage(key: KeyConfig | None, counter: CounterConfig) -> KeyConfig:
    return _require(key, counter, Role.COUNTER_MANAGE)


def check_read(key: KeyConfig | None, counter: CounterConfig) -> None:
    if counter.public:
        return
    if key is None:
        raise AuthenticationRequired(f"Counter {counter.name!r} is not public: an API key is required.")
    _same_app_or_global(key, counter)
