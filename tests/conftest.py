from functools import partial

import pytest
import redis
from django.conf import settings

from counters import config
from counters.builtins import ensure_builtins
from counters.config import CounterConfig
from counters.models import ApiKey, App, Counter
from counters.redis_store import breaker

from .processes import PrivateRedis


@pytest.fixture(autouse=True)
def clean_store():
    """Every test starts with an empty Redis database of its own and a closed circuit."""
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    breaker.reset()
    config.cache.invalidate()
    yield
    breaker.reset()
    config.cache.invalidate()


@pytest.fixture
def store():
    return redis.Redis.from_url(settings.REDIS_URL)


@pytest.fixture
def builtins(db):
    """The default and global apps with the three built-in counters (transactional tests truncate them)."""
    ensure_builtins(App, Counter)
    config.cache.invalidate()


@pytest.fixture
def make_key(db):
    def make(roles=("write",), app: str = "default") -> str:
        app_obj, _ = App.objects.get_or_create(slug=app, defaults={"name": app})
        _, raw = ApiKey.generate(app=app_obj, roles=list(roles))
        return raw

    return make


@pytest.fixture
def make_counter():
    """Create a counter (of the default app unless ``app``); returns its config, as services take it."""

    def make(name: str = "boss_kills", *, app: str = "default", **fields) -> CounterConfig:
        app_obj = App.objects.get(slug=app)
        Counter.objects.create(app=app_obj, name=name, **fields)
        config.cache.invalidate()
        return config.cache.get().counters[(app_obj.id, name)]

    return make


@pytest.fixture
def make_daily_counter(make_counter):
    """``make_counter`` with daily periods in Taipei (UTC+8, no DST), as the period and archive tests use."""
    return partial(make_counter, period="daily", time_zone="Asia/Taipei")


@pytest.fixture
def writer(builtins, make_key):
    """Headers of a key of the default app that may write and manage."""
    return {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'counter_manage', 'data_view'))}"}


@pytest.fixture
def private_redis():
    server = PrivateRedis()
    yield server
    server.close()
