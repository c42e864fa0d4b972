import os
import secrets
import tempfile
from functools import partial
from pathlib import Path

import pytest
import redis
import redis.cluster
import time_machine
from django.conf import settings

from counters import config, keyspace, redis_store
from counters.builtins import ensure_builtins
from counters.config import CounterConfig
from counters.models import ApiKey, App, Counter
from counters.redis_store import breakers_reset

from .clock import ServerClock, midday_utc, start_of_test, zone_at_midday
from .processes import PrivateCluster, PrivateRedis

# The cluster run: TEST_REDIS_CLUSTER=1 (``make test-cluster``) runs the suites against a Redis Cluster
# of 3 primaries and 3 replicas started for the session on free ports (docs/cluster.md).
CLUSTER_RUN = os.environ.get("TEST_REDIS_CLUSTER") == "1"


# Started when this module loads, before any test module is imported (some connect at import time).
_CLUSTER = PrivateCluster() if CLUSTER_RUN else None
if _CLUSTER is not None:
    settings.REDIS_URL = _CLUSTER.url
    redis_store.client_forget()


def pytest_unconfigure(config):
    if _CLUSTER is not None:
        redis_store.client_forget()
        _CLUSTER.close()


@pytest.fixture(scope="session")
def redis_cluster():
    """The session's Redis Cluster in a cluster run (the hot store of the tests and of the processes
    they start), else None."""
    return _CLUSTER


class ClusterStore(redis.cluster.RedisCluster):
    """The tests' cluster client: KEYS looks on every primary (redis-py asks one node only)."""

    def keys(self, pattern="*", **kwargs):
        kwargs.setdefault("target_nodes", self.PRIMARIES)
        return super().keys(pattern, **kwargs)


def store_client():
    """A client of the tests' own for the hot store: a plain Redis, or a cluster client in a cluster run."""
    if CLUSTER_RUN:
        return redis_store.cluster_connect(settings.REDIS_URL, cls=ClusterStore)
    return redis.Redis.from_url(settings.REDIS_URL)


@pytest.fixture(autouse=True)
def test_clock():
    """The clock each test starts with: the real one, or TEST_CLOCK_UTC's time of day (tests/clock.py)."""
    start = start_of_test()
    if start is None:
        yield
        return
    with time_machine.travel(start, tick=True):
        yield


@pytest.fixture
def midday(test_clock):
    """In-process clock at 12:00 UTC and running: a test of daily counters never meets their midnight."""
    with time_machine.travel(midday_utc(), tick=True):
        yield


@pytest.fixture(autouse=True)
def clean_store():
    """Every test starts with an empty Redis database of its own and a closed circuit."""
    store = store_client()
    if CLUSTER_RUN:
        for node in store.get_primaries():
            store.get_redis_connection(node).flushdb()
    else:
        store.flushdb()
    if CONTRACT_RUN:
        # A generation the server has never seen: after a flush, counting up from nothing again
        # would repeat the previous test's numbers and the server would keep its old snapshot.
        store.set(keyspace.CONFIG_GENERATION_KEY, secrets.randbits(48))
    breakers_reset()
    config.cache.invalidate()
    yield
    breakers_reset()
    config.cache.invalidate()
    if CLUSTER_RUN:
        store.close()


@pytest.fixture
def store():
    return store_client()


# online_players is a presence counter (docs/presence.md): tests of plain counting use this one.
PLAIN_COUNTER = {"name": "matches_running", "display_name": "Matches running", "unit": "matches", "public": True}


@pytest.fixture
def builtins(db):
    """The default and global apps with the built-in counters (transactional tests truncate them),
    and ``matches_running``, a public counter of the default app without period."""
    ensure_builtins(App, Counter)
    Counter.objects.get_or_create(
        app=App.objects.get(slug="default"), name=PLAIN_COUNTER["name"], defaults=PLAIN_COUNTER
    )
    config.cache.invalidate()


@pytest.fixture
def daily_far_from_midnight(builtins):
    """The default app's daily counters in a time zone where it is about noon now (tests/clock.py): the
    processes a test starts keep the real clock, and no midnight of these counters falls in the test."""
    App.objects.filter(slug="default").update(time_zone=zone_at_midday())
    config.cache.invalidate()


@pytest.fixture
def plain_flushed_first(builtins):
    """matches_running before daily_active_users in the flusher's order (counter ids), as
    online_players was: the crash tests kill a flusher right after its first batch."""
    Counter.objects.filter(app__slug="default", name="daily_active_users").delete()
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


# The contract run: COUNTER_CONTRACT_SERVER=1 sends every ``client`` request of the suites it runs
# to a real server (gunicorn + uvicorn workers, the production config) instead of Django's test
# client; the data the server must see is committed (transactional tests).
CONTRACT_RUN = os.environ.get("COUNTER_CONTRACT_SERVER") == "1"


def pytest_collection_modifyitems(config, items):
    if CLUSTER_RUN:
        # Tests that point the store at a single private redis-server (to kill, freeze or empty it)
        # are single-Redis tests; tests/test_cluster.py kills the cluster's own nodes instead.
        single = pytest.mark.skip(reason="drives a single private Redis (cluster run)")
        for item in items:
            if "private_redis" in getattr(item, "fixturenames", ()) or item.get_closest_marker("single_redis"):
                item.add_marker(single)
    if not CONTRACT_RUN:
        return
    in_process = pytest.mark.skip(reason="needs the service in the test's own process")
    for item in items:
        if item.get_closest_marker("in_process"):
            item.add_marker(in_process)
        item.add_marker(pytest.mark.django_db(transaction=True), append=False)


# The contract server's wall clock, which a test moves with its own (``server_clock``).
SERVER_CLOCK = ServerClock(Path(tempfile.mkdtemp(prefix="server-clock-")) / "now") if CONTRACT_RUN else None


@pytest.fixture
def server_clock():
    """The clock of the server the requests go to when it is another process (the contract run),
    else None (the test's own clock is the service's); the real clock again after the test."""
    yield SERVER_CLOCK
    if SERVER_CLOCK is not None:
        SERVER_CLOCK.release()


@pytest.fixture
def server_url(request):
    """Where a test sends real HTTP requests: the contract server in the contract run, else Django's
    live server in this process."""
    if CONTRACT_RUN:
        return request.getfixturevalue("contract_server").url
    return request.getfixturevalue("live_server").url


if CONTRACT_RUN:

    @pytest.fixture(scope="session")
    def contract_server(django_db_setup, django_db_blocker):
        from .processes import Gunicorn

        web = Gunicorn(workers=2, env=SERVER_CLOCK.env())
        yield web
        web.stop()
        SERVER_CLOCK.release()
        SERVER_CLOCK.path.parent.rmdir()

    @pytest.fixture
    def client(contract_server):
        from .http import ServerClient

        return ServerClient(contract_server.url)
