"""The cloud functions: each reply's fields and types, every error code from a real request
(with nothing changed), app isolation, user counters and player tokens, bounds, resets, languages."""

import json
import re

import pytest
import time_machine
from django.test import Client
from django.utils import translation

from archive.models import ResetLog
from counters import config
from counters.errors import OutOfLimits
from counters.flush import counters_flush
from counters.models import App, Counter, CounterValue, OperationLog, Threshold
from counters.redis_store import breaker
from counters.services import counter_update

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("midday")]  # daily counters: a pinned clock

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def call(client: Client, name: str, body, key: str | None = None, raw: bool = False, **headers):
    if key is not None:
        headers["HTTP_AUTHORIZATION"] = key if key.startswith("Player ") else f"Bearer {key}"
    data = body if raw else json.dumps(body)
    return client.post(f"/api/v1/functions/{name}", data=data, content_type="application/json", **headers)


def ok(response) -> dict:
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"code", "msg", "timestamp", "data"}
    assert body["code"] == 0 and isinstance(body["msg"], str) and body["msg"]
    assert isinstance(body["timestamp"], int) and body["timestamp"] > 1_600_000_000_000
    return body["data"]


def error(response, status: int, code: int) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"code", "msg", "timestamp", "data"}
    assert body["code"] == code and body["data"] is None and body["msg"]
    assert "Traceback" not in body["msg"]
    return body


def is_time(value) -> bool:
    return isinstance(value, str) and bool(ISO_MS.match(value))


@pytest.fixture
def game(builtins, make_key):
    """App "game" with a daily counter, a weekly one, a user counter and a bounded one; keys by role."""
    app = App.objects.create(slug="game", name="Rhythm game")
    Counter.objects.create(
        app=app,
        name="daily_login",
        display_name="每日登录计数",
        description="统计每日登录用户数量",
        unit="人次",
        period="daily",
    )
    Counter.objects.create(app=app, name="weekly_games", period="weekly")
    Counter.objects.create(app=app, name="energy_points", scope="user", max_value=10, display_name="Energy")
    gold = Counter.objects.create(app=app, name="gold", max_value=100, log_operations=True)
    Threshold.objects.create(counter=gold, value=50)
    Threshold.objects.create(counter=gold, value=90)
    Counter.objects.create(app=app, name="capped", max_value=5, saturate=True)
    return {
        "write": make_key(("write",), app="game"),
        "manage": make_key(("write", "counter_manage"), app="game"),
        "view": make_key(("data_view",), app="game"),
        "global": make_key(("write", "global_admin"), app="game"),
    }


def target(name: str, counter_type: str = "app", **extra) -> dict:
    return {"appId": "game", "counterType": counter_type, "counterId": name, **extra}


def value_of(client, name, counter_type, key, **extra) -> int:
    return ok(call(client, "getCounter", target(name, counter_type, **extra), key))["currentValue"]


# --- replies: the documented fields and types ------------------------------------------------------


def test_get_counter_reply_has_the_documented_fields(client, game):
    data = ok(call(client, "getCounter", target("daily_login", "daily"), game["write"]))
    assert list(data) == [
        "counterId", "counterType", "counterName", "currentValue", "maxValue", "resetPeriod",
        "lastResetTime", "nextResetTime", "updateTime", "metadata",
    ]  # fmt: skip
    assert data["counterId"] == "daily_login" and data["counterType"] == "daily"
    assert data["counterName"] == "每日登录计数" and data["currentValue"] == 0 and data["maxValue"] is None
    assert data["resetPeriod"] == "daily"
    assert is_time(data["lastResetTime"]) and data["lastResetTime"].endswith("T00:00:00.000Z")
    assert is_time(data["nextResetTime"]) and data["updateTime"] is None
    assert data["metadata"] == {"description": "统计每日登录用户数量", "unit": "人次"}

    call(client, "increaseCounter", target("daily_login", "daily"), game["write"])
    data = ok(call(client, "getCounter", target("daily_login", "app"), game["write"]))
    assert data["currentValue"] == 1 and is_time(data["updateTime"]) and data["counterType"] == "daily"

    data = ok(call(client, "getCounter", target("energy_points", "user", playerId="p1"), game["write"]))
    assert (data["maxValue"], data["resetPeriod"], data["lastResetTime"], data["nextResetTime"]) == (
        10, "none", None, None
    )  # fmt: skip


def test_increase_reply_has_the_documented_fields_and_reports_thresholds(client, game):
    data = ok(call(client, "increaseCounter", target("gold", increment=49), game["write"]))
    assert list(data) == ["counterId", "oldValue", "newValue", "increment", "updateTime", "hitThreshold", "thresholds"]
    assert (data["counterId"], data["oldValue"], data["newValue"], data["increment"]) == ("gold", 0, 49, 49)
    assert is_time(data["updateTime"]) and data["hitThreshold"] is False
    assert data["thresholds"] == [
        {"value": 50, "triggered": False, "triggerTime": None},
        {"value": 90, "triggered": False, "triggerTime": None},
    ]
    data = ok(call(client, "increaseCounter", target("gold"), game["write"]))
    assert data["hitThreshold"] is True and data["newValue"] == 50
    first, second = data["thresholds"]
    assert first["triggered"] is True and first["triggerTime"] == data["updateTime"]
    assert second == {"value": 90, "triggered": False, "triggerTime": None}
    data = ok(call(client, "increaseCounter", target("gold"), game["write"]))
    assert data["hitThreshold"] is False and data["thresholds"][0]["triggered"] is True
    assert data["thresholds"][0]["triggerTime"] == first["triggerTime"]
    assert ok(call(client, "increaseCounter", target("daily_login", "daily"), game["write"]))["thresholds"] == []


def test_decrease_reply_has_the_documented_fields_and_reports_the_minimum(client, game):
    call(client, "increaseCounter", target("energy_points", "user", playerId="p1", increment=2), game["write"])
    data = ok(call(client, "decreaseCounter", target("energy_points", "user", playerId="p1"), game["write"]))
    assert list(data) == ["counterId", "oldValue", "newValue", "decrement", "updateTime", "reachedMinimum"]
    assert (data["counterId"], data["oldValue"], data["newValue"], data["decrement"]) == ("energy_points", 2, 1, 1)
    assert is_time(data["updateTime"]) and data["reachedMinimum"] is False
    data = ok(call(client, "decreaseCounter", target("energy_points", "user", playerId="p1"), game["write"]))
    assert data["newValue"] == 0 and data["reachedMinimum"] is True


def test_reset_reply_has_the_documented_fields_and_is_logged(client, game):
    call(client, "increaseCounter", target("daily_login", "daily", increment=1251), game["write"])
    body = target("daily_login", "daily", reason="日周期重置", operatorId="admin_123")
    data = ok(call(client, "resetCounter", body, game["manage"]))
    assert list(data) == ["counterId", "oldValue", "newValue", "resetTime", "reason", "operatorId"]
    assert (data["oldValue"], data["newValue"], data["reason"], data["operatorId"]) == (
        1251,
        0,
        "日周期重置",
        "admin_123",
    )
    assert is_time(data["resetTime"])
    log = ResetLog.objects.get()
    assert (log.value_before, log.value_after, log.reason, log.kind) == (1251, 0, "日周期重置", "manual")
    assert log.operator.startswith("admin_123 (api-key:ck_")

    data = ok(call(client, "resetCounter", target("daily_login", "daily", reason="r", resetValue=7), game["manage"]))
    assert (data["oldValue"], data["newValue"]) == (0, 7) and data["operatorId"].startswith("api-key:ck_")
    assert value_of(client, "daily_login", "daily", game["write"]) == 7


# --- error codes from real requests, nothing changed -----------------------------------------


def test_every_error_code_comes_from_a_real_request_and_changes_nothing(client, game, make_key):
    for _ in range(3):
        call(client, "increaseCounter", target("gold"), game["write"])
    call(client, "increaseCounter", target("energy_points", "user", playerId="p1", increment=10), game["write"])
    no_roles = make_key((), app="game")
    cases = [
        # 4001: bad parameters and invalid ids
        (call(client, "increaseCounter", {"counterType": "app", "counterId": "gold"}, game["write"]), 400, 4001),
        (call(client, "increaseCounter", target("gold", "hourly"), game["write"]), 400, 4001),
        (call(client, "increaseCounter", target("go ld"), game["write"]), 400, 4001),
        (call(client, "increaseCounter", target("gold", increment=0), game["write"]), 400, 4001),
        (call(client, "increaseCounter", target("gold", increment=1.5), game["write"]), 400, 4001),
        (call(client, "increaseCounter", target("gold", increment="1"), game["write"]), 400, 4001),
        (call(client, "increaseCounter", target("gold", metadata=[1]), game["write"]), 400, 4001),
        (call(client, "increaseCounter", '{"appId": ', game["write"], raw=True), 400, 4001),
        (call(client, "increaseCounter", "[1]", game["write"], raw=True), 400, 4001),
        # 4001 as 409: well-formed, refused by a rule of the counter (a user counter needs playerId)
        (call(client, "increaseCounter", target("energy_points", "user"), game["write"]), 409, 4001),
        (call(client, "decreaseCounter", target("gold", allowNegative="yes"), game["write"]), 400, 4001),
        (call(client, "resetCounter", target("gold"), game["manage"]), 400, 4001),
        (call(client, "resetCounter", target("gold", reason="  "), game["manage"]), 400, 4001),
        (call(client, "getCounterStats", {"appId": "game", "groupBy": "minute"}, game["view"]), 400, 4001),
        (call(client, "getCounterStats", {"appId": "game", "startDate": "yesterday"}, game["view"]), 400, 4001),
        (client.get("/api/v1/functions/getCounter"), 405, 4001),
        # 4003: no key, a bad key, a missing role
        (call(client, "increaseCounter", target("gold")), 401, 4003),
        (call(client, "increaseCounter", target("gold"), "ck_wrong"), 401, 4003),
        (call(client, "getCounter", target("gold")), 401, 4003),
        (call(client, "increaseCounter", target("gold"), no_roles), 403, 4003),
        (call(client, "resetCounter", target("gold", reason="x"), game["write"]), 403, 4003),
        (call(client, "getCounterStats", {"appId": "game"}, game["write"]), 403, 4003),
        (call(client, "increaseCounter", target("online_players", "global"), game["write"]), 404, 4004),
        # 4004: unknown counters, a type that does not match, an unknown app or function
        (call(client, "increaseCounter", target("nope"), game["write"]), 404, 4004),
        (call(client, "increaseCounter", target("daily_login", "weekly"), game["write"]), 404, 4004),
        (call(client, "increaseCounter", target("gold", "user", playerId="p1"), game["write"]), 404, 4004),
        (call(client, "increaseCounter", {**target("gold"), "appId": "nope"}, game["write"]), 404, 4004),
        (call(client, "frobnicate", target("gold"), game["write"]), 404, 4004),
        # 4005: above the maximum, below the minimum
        (call(client, "increaseCounter", target("gold", increment=98), game["write"]), 409, 4005),
        (call(client, "decreaseCounter", target("gold", decrement=4), game["write"]), 409, 4005),
        (call(client, "decreaseCounter", target("gold", decrement=4, allowNegative=True), game["write"]), 409, 4005),
        (call(client, "increaseCounter", target("energy_points", "user", playerId="p1"), game["write"]), 409, 4005),
        (call(client, "resetCounter", target("gold", reason="x", resetValue=101), game["manage"]), 409, 4005),
    ]
    for response, status, code in cases:
        error(response, status, code)
    assert value_of(client, "gold", "app", game["write"]) == 3
    assert value_of(client, "energy_points", "user", game["write"], playerId="p1") == 10
    assert not ResetLog.objects.exists()
    counters_flush()
    assert OperationLog.objects.filter(counter__name="gold").count() == 3


def test_global_counters_need_global_admin_to_write(client, game, builtins):
    Counter.objects.create(app=App.objects.get(slug="global"), name="servers", scope="global")
    body = target("servers", "global")
    error(call(client, "increaseCounter", body, game["write"]), 403, 4003)
    assert ok(call(client, "increaseCounter", body, game["global"]))["newValue"] == 1
    assert value_of(client, "servers", "global", game["write"]) == 1
    error(call(client, "getCounter", target("servers", "app"), game["write"]), 404, 4004)


def test_an_internal_error_is_5001_without_details(client, game):
    # A broken configuration row (written around the model's validation) makes the service fail.
    Counter.objects.filter(name="daily_login").update(time_zone="Mars/Olympus_Mons")
    config.bump_generation()
    body = error(call(client, "increaseCounter", target("daily_login", "daily"), game["write"]), 500, 5001)
    assert "Mars" not in body["msg"] and "Error" not in body["msg"]


# --- allowNegative and saturation ----------------------------------------------------------


def test_allow_negative_is_honoured_for_managers_only(client, game):
    body = target("gold", decrement=2, allowNegative=True)
    error(call(client, "decreaseCounter", body, game["write"]), 409, 4005)
    data = ok(call(client, "decreaseCounter", body, game["manage"]))
    assert (data["newValue"], data["reachedMinimum"]) == (-2, True)
    assert value_of(client, "gold", "app", game["write"]) == -2


def test_a_saturating_counter_clamps_at_its_maximum(client, game):
    data = ok(call(client, "increaseCounter", target("capped", increment=7), game["write"]))
    assert (data["oldValue"], data["newValue"]) == (0, 5)
    error(call(client, "increaseCounter", target("capped"), game["write"]), 409, 4005)


# --- isolation: another app's counters are not found, whatever the function ----------------------


def test_a_key_of_another_app_gets_4004_for_every_function_and_endpoint(client, game, make_key):
    other = make_key(("write", "counter_manage", "data_view", "global_admin"), app="other")
    call(client, "increaseCounter", target("gold", increment=4), game["write"])
    for counter_type, name, extra in [("app", "gold", {}), ("daily", "daily_login", {}), ("user", "energy_points", {})]:
        extra = {"playerId": "p1"} if counter_type == "user" else extra
        body = target(name, counter_type, **extra)
        for function, more in [
            ("getCounter", {}),
            ("increaseCounter", {}),
            ("decreaseCounter", {}),
            ("resetCounter", {"reason": "x"}),
        ]:
            error(call(client, function, {**body, **more}, other), 404, 4004)
            # Naming its own app does not reach app "game"'s counters either.
            error(call(client, function, {**body, **more, "appId": "other"}, other), 404, 4004)
    error(call(client, "getCounterStats", {"appId": "game"}, other), 404, 4004)
    r = client.get("/api/v1/stats?appId=game", HTTP_AUTHORIZATION=f"Bearer {other}")
    assert r.status_code == 404 and r.json()["error"]["code"] == 4004
    for path in ["/api/v1/counter/gold", "/api/v1/counters?names=gold"]:
        r = client.get(path, HTTP_AUTHORIZATION=f"Bearer {other}")
        assert r.status_code == 404 and r.json()["error"]["code"] == 4004
    for verb, body in [("increment", {}), ("decrement", {}), ("reset", {"reason": "x"})]:
        r = client.post(
            f"/api/v1/counter/gold/{verb}", json.dumps(body), "application/json", HTTP_AUTHORIZATION=f"Bearer {other}"
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == 4004
    # An existing counter of another app and a name that exists nowhere answer alike.
    unknown = call(client, "getCounter", target("no_such_counter"), other).json()
    known = call(client, "getCounter", target("gold"), other).json()
    assert unknown["msg"].replace("no_such_counter", "X") == known["msg"].replace("gold", "X")
    assert value_of(client, "gold", "app", game["write"]) == 4


# --- user counters and player tokens -------------------------------------------------------


def test_user_counters_are_independent_and_a_player_token_reads_only_its_own(client, game):
    for player, amount in [("p1", 3), ("p2", 7)]:
        call(
            client, "increaseCounter", target("energy_points", "user", playerId=player, increment=amount), game["write"]
        )
    assert value_of(client, "energy_points", "user", game["write"], playerId="p1") == 3
    assert value_of(client, "energy_points", "user", game["write"], playerId="p2") == 7
    assert value_of(client, "energy_points", "user", game["write"], playerId="p3") == 0

    r = client.post(
        "/api/v1/player-tokens", {"player_id": "p1"}, "application/json", HTTP_AUTHORIZATION=f"Bearer {game['write']}"
    )
    assert r.status_code == 200 and set(r.json()) == {"token", "player_id", "expires_at"}
    token = "Player " + r.json()["token"]
    assert value_of(client, "energy_points", "user", token, playerId="p1") == 3
    assert value_of(client, "energy_points", "user", token) == 3
    error(call(client, "getCounter", target("energy_points", "user", playerId="p2"), token), 403, 4003)
    error(call(client, "getCounter", target("gold"), token), 403, 4003)
    error(call(client, "increaseCounter", target("energy_points", "user", playerId="p1"), token), 403, 4003)
    error(call(client, "getCounter", {**target("energy_points", "user"), "appId": "default"}, token), 404, 4004)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    error(call(client, "getCounter", target("energy_points", "user"), tampered), 401, 4003)
    assert value_of(client, "energy_points", "user", game["write"], playerId="p1") == 3


@pytest.mark.in_process  # moves the clock of this process
def test_a_player_token_expires(client, game, settings):
    with time_machine.travel("2024-03-01 12:00:00+00:00", tick=False) as traveller:
        r = client.post(
            "/api/v1/player-tokens",
            {"player_id": "p1"},
            "application/json",
            HTTP_AUTHORIZATION=f"Bearer {game['write']}",
        )
        token = "Player " + r.json()["token"]
        assert r.json()["expires_at"] == "2024-03-02T12:00:00.000Z"
        ok(call(client, "getCounter", target("energy_points", "user"), token))
        traveller.shift(settings.COUNTER_PLAYER_TOKEN_SECONDS + 1)
        body = error(call(client, "getCounter", target("energy_points", "user"), token), 401, 4003)
        assert "expired" in body["msg"]


def test_issuing_a_player_token_needs_a_write_key(client, game):
    r = client.post("/api/v1/player-tokens", {"player_id": "p1"}, "application/json")
    assert r.status_code == 401 and r.json()["error"]["code"] == 4003
    r = client.post(
        "/api/v1/player-tokens", {"player_id": "p1"}, "application/json", HTTP_AUTHORIZATION=f"Bearer {game['view']}"
    )
    assert r.status_code == 403
    r = client.post(
        "/api/v1/player-tokens", {"player_id": "a b"}, "application/json", HTTP_AUTHORIZATION=f"Bearer {game['write']}"
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == 4001


# --- operation log -------------------------------------------------------------------------


def test_updates_of_a_logged_counter_keep_actor_player_values_and_metadata(client, game):
    call(client, "increaseCounter", target("gold", increment=5, playerId="p9", metadata={"order": "A1"}), game["write"])
    call(client, "decreaseCounter", target("gold", decrement=2, metadata={"refund": True}), game["write"])
    call(client, "increaseCounter", target("daily_login", "daily"), game["write"])
    assert not OperationLog.objects.exists()
    counters_flush()
    first, second = OperationLog.objects.order_by("id")
    assert (first.user_id, first.old_value, first.new_value, first.metadata) == ("p9", 0, 5, {"order": "A1"})
    assert (second.old_value, second.new_value, second.metadata) == (5, 3, {"refund": True})
    assert first.actor == game["write"][:11]
    assert OperationLog.objects.count() == 2


# --- languages -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "success", "not_found"),
    [
        ("zh-CN,zh;q=0.9", "查询成功", "不存在"),
        ("zh-Hans", "查询成功", "不存在"),
        ("zh-TW", "查詢成功", "不存在"),
        ("zh-Hant", "查詢成功", "不存在"),
        ("en-US,en;q=0.8", "Query succeeded", "not found"),
        ("", "Query succeeded", "not found"),
    ],
)
def test_msg_follows_accept_language(client, game, language, success, not_found):
    headers = {"HTTP_ACCEPT_LANGUAGE": language} if language else {}
    r = call(client, "getCounter", target("gold"), game["write"], **headers)
    assert r.json()["msg"] == success
    assert not_found in call(client, "getCounter", target("nope"), game["write"], **headers).json()["msg"]


@pytest.mark.parametrize(
    ("function", "zh_hans", "zh_hant"),
    [("increaseCounter", "增加成功", "增加成功"), ("decreaseCounter", "减少成功", "減少成功")],
)
def test_update_messages_are_translated(client, game, function, zh_hans, zh_hant):
    call(client, "increaseCounter", target("gold", increment=5), game["write"])
    assert call(client, function, target("gold"), game["write"], HTTP_ACCEPT_LANGUAGE="zh-CN").json()["msg"] == zh_hans
    assert call(client, function, target("gold"), game["write"], HTTP_ACCEPT_LANGUAGE="zh-TW").json()["msg"] == zh_hant
    body = target("gold", reason="x")
    assert call(client, "resetCounter", body, game["manage"], HTTP_ACCEPT_LANGUAGE="zh-CN").json()["msg"] == "重置成功"


def test_error_messages_are_translated(client, game):
    zh = {"HTTP_ACCEPT_LANGUAGE": "zh-CN"}
    assert "整数" in call(client, "increaseCounter", target("gold", increment="1"), game["write"], **zh).json()["msg"]
    body = call(client, "resetCounter", target("gold", reason="x"), game["write"], **zh).json()
    assert "counter_manage" in body["msg"] and "缺少" in body["msg"]
    body = call(client, "decreaseCounter", target("gold"), game["write"], **zh).json()
    assert body["code"] == 4005 and "不允许" in body["msg"]
    body = call(client, "increaseCounter", target("gold"), None, **zh).json()
    assert body["code"] == 4003 and "API" in body["msg"] and "需要" in body["msg"]


@pytest.mark.in_process  # moves the clock of this process
def test_the_operation_log_keeps_its_retention(client, game, settings):
    settings.COUNTER_OPERATION_LOG_RETENTION_DAYS = 30
    for day in ["2024-01-01", "2024-01-20", "2024-02-15"]:
        with time_machine.travel(f"{day} 12:00:00+00:00", tick=False):
            call(client, "increaseCounter", target("gold"), game["write"])
            counters_flush()
    with time_machine.travel("2024-02-16 12:00:00+00:00", tick=False):  # keeps 30 days: from 2024-01-17
        from counters.tasks import trim_operation_log

        assert trim_operation_log() == 1
        assert trim_operation_log() == 0
    kept = sorted(entry.created_at.date().isoformat() for entry in OperationLog.objects.all())
    assert kept == ["2024-01-20", "2024-02-15"]


def test_a_write_through_refusal_speaks_the_callers_language_like_the_redis_path(make_counter, builtins, settings):
    """Redis down, writes going to PostgreSQL: going below the minimum is refused in the caller's language."""
    settings.COUNTER_REDIS_DOWN_WRITES = "write_through"
    counter = make_counter("lives")
    for _ in range(settings.REDIS_BREAKER_THRESHOLD):
        breaker.record_failure()
    with translation.override("zh-hans"), pytest.raises(OutOfLimits) as refused:
        counter_update(counter=counter, amount=-1)
    assert refused.value.message.startswith("计数器“lives”当前为 0") and "不允许低于 0" in refused.value.message
    assert not CounterValue.objects.filter(counter_id=counter.id).exclude(value=0, operations=0).exists()
