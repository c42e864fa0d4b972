"""The circuit breaker against a real hanging Redis (SIGSTOP), counted in commands sent, not in seconds:
it opens after exactly REDIS_BREAKER_THRESHOLD failures, and once open no request touches the socket,
so none can wait for its timeout."""

import pytest
import redis
from django.test import override_settings

from counters import keyspace
from counters.models import Counter
from counters.redis_store import breaker

from .http import post

pytestmark = pytest.mark.django_db

INCREMENT = "/api/v1/counter/matches_running/increment"


@pytest.fixture
def sent(monkeypatch):
    """Every command (or pipeline) the service writes to a Redis socket."""
    commands = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        commands.append(command)
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return commands


@pytest.fixture
def frozen_store(private_redis, settings):
    """The service on a private redis-server that is then frozen: connected sockets get no reply."""
    options = {**settings.CACHES["default"]["OPTIONS"], "SOCKET_TIMEOUT": 0.2}
    caches = {"default": {**settings.CACHES["default"], "LOCATION": private_redis.url, "OPTIONS": options}}
    # Config is checked against Redis once a minute here, so each request meets the freeze once.
    with override_settings(CACHES=caches, COUNTER_CONFIG_CHECK_SECONDS=60):
        breaker.reset_seconds = 3600  # no probe while the test runs: every failure counts
        yield private_redis
        private_redis.thaw()
    breaker.reset_seconds = settings.REDIS_BREAKER_RESET_SECONDS


def test_the_breaker_opens_after_exactly_threshold_timeouts_and_then_sends_nothing(
    client, writer, frozen_store, sent, settings
):
    assert post(client, INCREMENT, {}, writer).json()["current_value"] == 1  # warm: hydrated, script loaded
    frozen_store.freeze()

    threshold = settings.REDIS_BREAKER_THRESHOLD
    for attempt in range(1, threshold + 1):
        sent.clear()
        reply = post(client, INCREMENT, {}, writer)
        # The command reached the frozen Redis and its reply timed out: it may run when Redis wakes.
        assert (reply.status_code, reply.json()["error"]["code"]) == (504, 5004), attempt
        # One command each, that waited for the timeout: the update, then the reconnections' HELLO.
        assert len(sent) == 1 and (b"EVALSHA" in sent[0][0]) is (attempt == 1), sent
        assert breaker.is_open is (attempt == threshold)

    for _ in range(5):
        sent.clear()
        reply = post(client, INCREMENT, {}, writer)
        assert (reply.status_code, reply.json()["error"]["code"]) == (503, 5003)
        assert int(reply["Retry-After"]) > 0
        assert sent == []  # refused before any socket was touched: nothing to wait for
    # Reads fall back to PostgreSQL without touching Redis either.
    sent.clear()
    read = client.get("/api/v1/counter/matches_running")
    assert read.status_code == 200 and read["X-Counter-Source"] == "database" and sent == []

    frozen_store.thaw()
    # The thawed Redis ran the update that timed out: "may have been applied" was true.
    online = Counter.objects.get(name="matches_running")
    value = redis.Redis(port=frozen_store.port).hget(keyspace.value_key(online.id, "", ""), "v")
    assert int(value) == 2
