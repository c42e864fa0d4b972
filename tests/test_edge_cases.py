"""Edge cases found by trying the service as a new user would (issue 14, item 3): unique counters without
user_id, monthly counterType, levels in getCounterStats, last_reset after a manual reset."""

import json
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from counters.flush import counters_flush
from counters.models import App, Counter

from .http import post

pytestmark = pytest.mark.django_db

TEN = datetime(2023, 10, 1, 10, 0, tzinfo=UTC)


def call(client, name: str, body: dict, key: str, **headers):
    return client.post(
        f"/api/v1/functions/{name}", json.dumps(body), "application/json", HTTP_AUTHORIZATION=f"Bearer {key}", **headers
    )


@pytest.fixture
def game(builtins, make_key):
    app = App.objects.create(slug="game", name="Game")
    Counter.objects.create(app=app, name="season_games", period="monthly")
    Counter.objects.create(app=app, name="score")
    return {
        "write": make_key(("write", "counter_manage"), app="game"),
        "view": make_key(("data_view", "write"), app="game"),
    }


def test_counter_type_monthly_names_a_monthly_counter(client, game):
    target = {"appId": "game", "counterType": "monthly", "counterId": "season_games"}
    with time_machine.travel(TEN + timedelta(days=3), tick=False):
        reply = call(client, "increaseCounter", {**target, "increment": 3}, game["write"])
        assert reply.status_code == 200, reply.content
        got = call(client, "getCounter", target, game["write"]).json()["data"]
    assert got["currentValue"] == 3 and got["counterType"] == "monthly" and got["resetPeriod"] == "monthly"
    assert got["lastResetTime"] == "2023-10-01T00:00:00.000Z" and got["nextResetTime"] == "2023-11-01T00:00:00.000Z"
    # A type that does not match stays "not found", as for daily and weekly.
    wrong = call(client, "getCounter", {**target, "counterType": "weekly"}, game["write"])
    assert wrong.status_code == 404 and wrong.json()["code"] == 4004
    stats = call(client, "getCounterStats", {"appId": "game", "counterType": "monthly"}, game["view"])
    assert [c["counterId"] for c in stats.json()["data"]["counterList"]] == ["season_games"]


def test_time_series_value_is_the_level_at_the_end_of_each_slot(client, game):
    target = {"appId": "game", "counterType": "app", "counterId": "score"}
    with time_machine.travel(TEN - timedelta(minutes=50), tick=False):
        call(client, "increaseCounter", {**target, "increment": 1000}, game["write"])
    with time_machine.travel(TEN + timedelta(minutes=20), tick=False):
        call(client, "increaseCounter", {**target, "increment": 300}, game["write"])
    with time_machine.travel(TEN + timedelta(minutes=40), tick=False):
        call(client, "decreaseCounter", {**target, "decrement": 100}, game["write"])
    with time_machine.travel(TEN + timedelta(hours=1, minutes=5), tick=False):
        call(client, "increaseCounter", {**target, "increment": 51}, game["write"])
    counters_flush()
    body = {
        "appId": "game",
        "startDate": "2023-10-01T10:00:00Z",
        "endDate": "2023-10-01T13:00:00Z",
        "groupBy": "hour",
    }
    with time_machine.travel(TEN + timedelta(hours=3), tick=False):
        data = call(client, "getCounterStats", body, game["view"]).json()["data"]
    assert [(p["time"][11:16], p["value"], p["operations"]) for p in data["timeSeries"]] == [
        ("10:00", 1200, 2),
        ("11:00", 1251, 1),
        ("12:00", 1251, 0),  # no update: the level stays
    ]
    assert {c["counterId"]: c["currentValue"] for c in data["counterList"]}["score"] == 1251


def test_a_unique_member_increment_without_user_id_is_refused_and_changes_nothing(client, writer, store):
    url = "/api/v1/counter/daily_active_users/increment"
    assert post(client, url, {"user_id": "u1"}, writer).json()["current_value"] == 1
    for body in ({}, {"value": 1}, {"metadata": {"from": "lobby"}}):
        reply = post(client, url, body, writer)
        assert reply.status_code == 409, reply.content
        assert reply.json()["error"]["code"] == 4001 and "user_id" in reply.json()["error"]["message"]
    batch = post(client, "/api/v1/counters/batch", {"updates": [{"name": "daily_active_users"}]}, writer)
    assert batch.status_code == 409 and "updates[0]" in batch.json()["error"]["message"]
    target = {"appId": "default", "counterType": "daily", "counterId": "daily_active_users"}
    reply = post(client, "/api/v1/functions/increaseCounter", target, writer)
    assert reply.status_code == 409 and reply.json()["code"] == 4001
    assert client.get("/api/v1/counter/daily_active_users").json()["value"] == 1
    # With a player id the function counts the player, once.
    for _ in range(2):
        reply = post(client, "/api/v1/functions/increaseCounter", {**target, "playerId": "u2"}, writer)
    assert reply.json()["data"]["newValue"] == 2


def test_last_reset_shows_a_manual_reset_of_the_current_period(client, writer, store):
    from counters.redis_store import breaker

    get = "/api/v1/counter/total_games_played"
    target = {"appId": "default", "counterType": "daily", "counterId": "total_games_played"}
    with time_machine.travel(TEN, tick=False):
        post(client, "/api/v1/counter/total_games_played/increment", {"value": 5}, writer)
        assert client.get(get).json()["last_reset"] == "2023-10-01T00:00:00Z"
    with time_machine.travel(TEN + timedelta(minutes=30), tick=False):
        reply = post(client, "/api/v1/counter/total_games_played/reset", {"reason": "bad data"}, writer)
        assert reply.status_code == 200, reply.content
    with time_machine.travel(TEN + timedelta(hours=1), tick=False):
        assert client.get(get).json()["last_reset"] == "2023-10-01T10:30:00Z"
        got = post(client, "/api/v1/functions/getCounter", target, writer).json()["data"]
        assert got["lastResetTime"] == "2023-10-01T10:30:00.000Z"
        assert got["nextResetTime"] == "2023-10-02T00:00:00.000Z"
        # From PostgreSQL too: after Redis lost its data (hydration), and while it is down.
        counters_flush()
        store.flushdb()
        assert client.get(get).json()["last_reset"] == "2023-10-01T10:30:00Z"
        for _ in range(breaker.threshold):
            breaker.record_failure()
        degraded = client.get(get).json()
        assert degraded["degraded"] is True and degraded["last_reset"] == "2023-10-01T10:30:00Z"
        breaker.reset()
    with time_machine.travel(TEN + timedelta(days=1), tick=False):
        assert client.get(get).json()["last_reset"] == "2023-10-02T00:00:00Z"
    # A counter without a period shows a manual reset, and nothing before one.
    assert "last_reset" not in client.get("/api/v1/counter/matches_running").json()
    with time_machine.travel(TEN + timedelta(days=2), tick=False):
        post(client, "/api/v1/counter/matches_running/reset", {"reason": "restart"}, writer)
    assert client.get("/api/v1/counter/matches_running").json()["last_reset"] == "2023-10-03T10:00:00Z"
