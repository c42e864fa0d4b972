"""The hot path does no database query and one Redis round trip once warm (a batch: one command per counter)."""

import json

import pytest
import redis
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

pytestmark = pytest.mark.usefixtures("midday")  # daily counters on a pinned clock

# Commands a request could send itself; the server's counts also include the script's own calls.
CLIENT_COMMANDS = ("evalsha", "eval", "script|load", "script|exists", "hmget", "get", "mget")


def commands(server: redis.Redis) -> dict[str, int]:
    stats = server.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in CLIENT_COMMANDS}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in CLIENT_COMMANDS if after[name] != before[name]}


@pytest.fixture
def round_trips(monkeypatch):
    """Counts every write of the service's Redis client (a pipeline is one)."""
    sent = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command)
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


@pytest.fixture
def private_store(private_redis, settings):
    """The service on a Redis of its own, so every command the server counts is this test's."""
    caches = {"default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    with override_settings(CACHES=caches, COUNTER_CONFIG_CHECK_SECONDS=60):
        yield redis.Redis.from_url(private_redis.url)


@pytest.mark.django_db
def test_warm_updates_and_reads_query_no_database_and_make_one_redis_round_trip(
    client, writer, private_store, round_trips
):
    increment = "/api/v1/counter/matches_running/increment"
    dau = "/api/v1/counter/daily_active_users/increment"
    batch = {"updates": [{"name": "matches_running"}, {"name": "total_games_played", "value": 2}] * 3}
    warm_up = [
        lambda: client.post(increment, "{}", content_type="application/json", **writer),
        lambda: client.post(dau, '{"user_id": "u0"}', content_type="application/json", **writer),
        lambda: client.get("/api/v1/counter/matches_running"),
        lambda: client.get("/api/v1/counters?names=matches_running,total_games_played"),
        lambda: client.post("/api/v1/counters/batch", json.dumps(batch), content_type="application/json", **writer),
    ]
    for call in warm_up:
        assert call().status_code == 200

    cases = [
        (lambda: client.post(increment, '{"value": 2}', content_type="application/json", **writer), {"evalsha": 1}),
        (lambda: client.post(dau, '{"user_id": "u1"}', content_type="application/json", **writer), {"evalsha": 1}),
        (lambda: client.get("/api/v1/counter/matches_running"), {"hmget": 1}),
        (lambda: client.get("/api/v1/counters?names=matches_running,total_games_played"), {"hmget": 2}),
        (
            lambda: client.post("/api/v1/counters/batch", json.dumps(batch), content_type="application/json", **writer),
            {"evalsha": 2},
        ),
    ]
    for call, expected in cases:
        before = commands(private_store)
        round_trips.clear()
        with CaptureQueriesContext(connection) as queries:
            response = call()
        assert response.status_code == 200, response.content
        assert len(round_trips) == 1
        assert [q["sql"] for q in queries.captured_queries] == []
        sent = delta(before, commands(private_store))
        if "evalsha" in expected:
            # The update script reads the value hash with HMGET itself: the server counts those too.
            sent.pop("hmget", None)
        assert sent == expected
    assert client.get("/api/v1/counter/matches_running").json()["value"] == 1 + 3 + 2 + 3
