"""Failure modes with a real failure each: Redis killed or frozen under every write surface, expired
temporary counters, the bounds at their edges, and global counters across apps."""

import json
from datetime import timedelta

import pytest
import time_machine
from django.test import override_settings

from archive.models import ResetLog
from counters import clock, keyspace
from counters.flush import counters_flush
from counters.models import App, Counter, CounterValue, WrittenThroughValue
from counters.redis_store import breaker

from .http import post

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("midday")]


def call(client, name: str, body: dict, headers: dict):
    return client.post(f"/api/v1/functions/{name}", json.dumps(body), "application/json", **headers)


def target(name: str, counter_type: str = "app", **extra) -> dict:
    return {"appId": "default", "counterType": counter_type, "counterId": name, **extra}


@pytest.fixture
def manager(builtins, make_key) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'counter_manage', 'data_view'))}"}


@pytest.fixture
def outage(private_redis, settings, manager, client):
    """The service on a private redis-server with matches_running at 4 in PostgreSQL and 6 in Redis,
    then Redis killed -9. Yields the client's headers."""
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    assert post(client, "/api/v1/counter/matches_running/increment", {"value": 4}, manager).status_code == 200
    counters_flush()
    assert post(client, "/api/v1/counter/matches_running/increment", {"value": 2}, manager).status_code == 200
    private_redis.kill()
    return manager


def assert_read_only(reply, *, envelope: str) -> None:
    assert reply.status_code == 503, reply.content
    code = reply.json()["code"] if envelope == "function" else reply.json()["error"]["code"]
    assert code == 5003
    assert int(reply["Retry-After"]) > 0


# --- Redis down on every write surface (reject mode, the default) ----------------------------------


def test_cloud_functions_are_read_only_while_redis_is_down_and_read_postgresql(client, outage):
    for name, extra in [
        ("increaseCounter", {}),
        ("decreaseCounter", {}),
        ("resetCounter", {"reason": "outage"}),
    ]:
        assert_read_only(call(client, name, target("matches_running", **extra), outage), envelope="function")
    got = call(client, "getCounter", target("matches_running"), outage)
    # The value PostgreSQL has. (Unlike REST reads, the function's reply does not say it is degraded.)
    assert got.status_code == 200
    assert got.json()["data"]["currentValue"] == 4  # what PostgreSQL has: the unflushed 2 are out of sight
    assert not ResetLog.objects.exists()
    assert CounterValue.objects.get(counter__name="matches_running").value == 4


def test_rest_reset_batch_reset_and_batch_update_are_read_only_while_redis_is_down(client, outage):
    assert_read_only(post(client, "/api/v1/counter/matches_running/reset", {"reason": "x"}, outage), envelope="rest")
    batch = {"updates": [{"name": "matches_running"}, {"name": "total_games_played", "value": 2}]}
    assert_read_only(post(client, "/api/v1/counters/batch", batch, outage), envelope="rest")
    resets = {"counters": [{"name": "matches_running"}, {"name": "total_games_played"}], "reason": "x"}
    reply = post(client, "/api/v1/counters/reset", resets, outage)
    # Each reset stands alone once validated: the reply says, per counter, that it was not done.
    assert reply.status_code == 503 and int(reply["Retry-After"]) > 0
    assert [(r["success"], r["error"]["code"]) for r in reply.json()["results"]] == [(False, 5003)] * 2
    assert not ResetLog.objects.exists()
    assert CounterValue.objects.get(counter__name="matches_running").value == 4
    assert not CounterValue.objects.filter(counter__name="total_games_played").exists()


# --- write-through mode ----------------------------------------------------------------------------


def test_write_through_mode_resets_stay_refused_during_an_outage(client, outage, settings):
    settings.COUNTER_REDIS_DOWN_WRITES = "write_through"
    assert post(client, "/api/v1/counter/matches_running/increment", {}, outage).status_code == 200
    assert CounterValue.objects.get(counter__name="matches_running").value == 5  # written through
    assert_read_only(post(client, "/api/v1/counter/matches_running/reset", {"reason": "x"}, outage), envelope="rest")
    reply = call(client, "resetCounter", target("matches_running", reason="x"), outage)
    assert_read_only(reply, envelope="function")
    assert not ResetLog.objects.exists()
    assert CounterValue.objects.get(counter__name="matches_running").value == 5


def test_write_through_mode_never_writes_an_update_that_may_have_reached_redis(
    client, manager, private_redis, settings
):
    """Redis stops after receiving the command (SIGSTOP): the update may run when it wakes, so writing
    it through as well could count it twice. The answer is 5004 and PostgreSQL is left alone."""
    options = {**settings.CACHES["default"]["OPTIONS"], "SOCKET_TIMEOUT": 0.2}
    caches = {"default": {**settings.CACHES["default"], "LOCATION": private_redis.url, "OPTIONS": options}}
    settings.COUNTER_REDIS_DOWN_WRITES = "write_through"
    with override_settings(CACHES=caches, COUNTER_CONFIG_CHECK_SECONDS=60):
        assert post(client, "/api/v1/counter/matches_running/increment", {}, manager).status_code == 200
        counters_flush()
        private_redis.freeze()
        try:
            reply = post(client, "/api/v1/counter/matches_running/increment", {}, manager)
            assert (reply.status_code, reply.json()["error"]["code"]) == (504, 5004), reply.content
            assert "Retry-After" not in reply
            assert not WrittenThroughValue.objects.exists()
            assert CounterValue.objects.get(counter__name="matches_running").value == 1
        finally:
            private_redis.thaw()
        breaker.reset()
        online = Counter.objects.get(name="matches_running")
        value_key = keyspace.value_key(online.id, "", "")
        assert int(private_redis_client(private_redis).hget(value_key, "v")) == 2  # Redis ran it, once


def private_redis_client(server):
    import redis

    return redis.Redis(port=server.port)


# --- expired temporary counters --------------------------------------------------------------------


def test_an_expired_temporary_counter_refuses_updates_reads_404_and_leaves_stats_and_board(client, manager):
    app = App.objects.get(slug="default")
    ends = clock.now() + timedelta(hours=1)
    Counter.objects.create(app=app, name="event_kills", public=True, expires_at=ends)
    assert post(client, "/api/v1/counter/event_kills/increment", {"value": 3}, manager).status_code == 200
    counters_flush()

    def listed() -> tuple[bool, bool]:
        stats = call(client, "getCounterStats", {"appId": "default"}, manager).json()["data"]
        board = client.get("/board/values").json()
        return (
            "event_kills" in {c["counterId"] for c in stats["counterList"]},
            "event_kills" in {c["name"] for c in board["counters"]},
        )

    assert listed() == (True, True)
    with time_machine.travel(ends + timedelta(seconds=1), tick=False):
        refused = post(client, "/api/v1/counter/event_kills/increment", {}, manager)
        assert refused.status_code in (404, 409) and refused.json()["success"] is False
        assert refused.json()["error"]["code"] in (4004, 4005)
        read = client.get("/api/v1/counter/event_kills", **manager)
        assert (read.status_code, read.json()["error"]["code"]) == (404, 4004)
        function = call(client, "getCounter", target("event_kills"), manager)
        assert (function.status_code, function.json()["code"]) == (404, 4004)
        assert listed() == (False, False)
    assert CounterValue.objects.get(counter__name="event_kills").value == 3


# --- bounds at their edges, over REST ----------------------------------------------------------------


def test_the_largest_safe_value_is_reached_by_increments_and_not_passed(client, manager):
    url = "/api/v1/counter/matches_running/increment"
    assert post(client, url, {"value": keyspace.MAX_SAFE_VALUE - 1}, manager).status_code == 200
    assert post(client, url, {}, manager).json() == {"success": True, "current_value": 2**53 - 1}
    refused = post(client, url, {}, manager)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, 4005)
    assert client.get("/api/v1/counter/matches_running").json()["value"] == 2**53 - 1
    counters_flush()
    assert CounterValue.objects.get(counter__name="matches_running").value == 2**53 - 1


def test_a_non_zero_minimum_and_allow_negative_hold_over_rest(client, manager):
    app = App.objects.get(slug="default")
    Counter.objects.create(app=app, name="lives", public=True, min_value=3)
    Counter.objects.create(app=app, name="balance", public=True, allow_negative=True)
    lives = "/api/v1/counter/lives"
    assert post(client, f"{lives}/increment", {"value": 5}, manager).json()["current_value"] == 5
    assert post(client, f"{lives}/decrement", {"value": 2}, manager).json()["current_value"] == 3
    refused = post(client, f"{lives}/decrement", {}, manager)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, 4005)
    assert client.get(lives).json()["value"] == 3
    assert post(client, "/api/v1/counter/balance/decrement", {"value": 7}, manager).json()["current_value"] == -7
    assert post(client, "/api/v1/counter/matches_running/decrement", {}, manager).status_code == 409
    counters_flush()
    values = dict(CounterValue.objects.values_list("counter__name", "value"))
    assert (values["lives"], values["balance"]) == (3, -7)


# --- global counters across apps ---------------------------------------------------------------------


def test_global_counters_reset_needs_manage_and_global_admin_and_every_app_reads_them(client, builtins, make_key):
    Counter.objects.create(app=App.objects.get(slug="global"), name="servers", scope="global")
    App.objects.create(slug="game")
    admin = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'global_admin'), app='game')}"}
    body = {"appId": "game", "counterType": "global", "counterId": "servers"}
    assert call(client, "increaseCounter", {**body, "increment": 5}, admin).json()["data"]["newValue"] == 5

    for roles in [("write", "counter_manage"), ("write", "global_admin")]:
        key = {"HTTP_AUTHORIZATION": f"Bearer {make_key(roles, app='game')}"}
        reply = call(client, "resetCounter", {**body, "reason": "x"}, key)
        assert (reply.status_code, reply.json()["code"]) == (403, 4003), roles
    assert not ResetLog.objects.exists()
    both = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('counter_manage', 'global_admin'), app='game')}"}
    assert call(client, "resetCounter", {**body, "reason": "x"}, both).json()["data"]["oldValue"] == 5

    assert call(client, "increaseCounter", {**body, "increment": 2}, admin).status_code == 200
    for app in ("default", "other"):
        reader = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('data_view',), app=app)}"}
        got = call(client, "getCounter", {**body, "appId": app}, reader)
        assert got.status_code == 200 and got.json()["data"]["currentValue"] == 2, app
