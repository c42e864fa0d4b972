"""REST v1: the shapes of docs/requirements.md, byte for byte, and its errors."""

from datetime import UTC, datetime

import pytest
import time_machine

from counters.flush import counters_flush
from counters.models import CounterValue

from .http import post

pytestmark = pytest.mark.usefixtures("midday")  # daily counters on a pinned clock


@pytest.mark.django_db
def test_increment_decrement_and_read_have_the_spec_shapes(client, writer):
    body = {"value": 5, "user_id": "u123456", "metadata": {}}
    r = post(client, "/api/v1/counter/matches_running/increment", body, writer)
    assert r.status_code == 200
    assert r.content == b'{"success":true,"current_value":5}'
    r = post(client, "/api/v1/counter/matches_running/decrement", {"value": 1, "user_id": "u123456"}, writer)
    assert r.json() == {"success": True, "current_value": 4}
    r = post(client, "/api/v1/counter/matches_running/increment", {}, writer)
    assert r.json() == {"success": True, "current_value": 5}

    body = client.get("/api/v1/counter/matches_running").json()
    assert set(body) == {"name", "value", "last_updated"}
    assert body["name"] == "matches_running" and body["value"] == 5
    assert body["last_updated"].endswith("Z") and len(body["last_updated"]) == 20

    body = client.get("/api/v1/counters?names=matches_running,daily_active_users").json()
    assert body == {"counters": [{"name": "matches_running", "value": 5}, {"name": "daily_active_users", "value": 0}]}


@pytest.mark.django_db
@pytest.mark.in_process  # moves the clock of this process
def test_periodic_counter_says_when_it_resets(client, builtins):
    from counters.models import App, Counter

    app = App.objects.get(slug="default")
    Counter.objects.create(app=app, name="weekly_raids", period="weekly", time_zone="Asia/Shanghai", public=True)
    Counter.objects.create(app=app, name="monthly_quests", period="monthly", time_zone="America/New_York", public=True)
    # A Sunday evening in UTC: already Monday in Shanghai, still Sunday in New York.
    with time_machine.travel(datetime(2026, 3, 29, 18, 30, tzinfo=UTC), tick=False):
        daily = client.get("/api/v1/counter/total_games_played").json()
        weekly = client.get("/api/v1/counter/weekly_raids").json()
        monthly = client.get("/api/v1/counter/monthly_quests").json()
        plain = client.get("/api/v1/counter/matches_running").json()
    assert (daily["value"], daily["last_reset"], daily["next_reset"]) == (
        0, "2026-03-29T00:00:00Z", "2026-03-30T00:00:00Z"
    )  # fmt: skip
    assert (weekly["last_reset"], weekly["next_reset"]) == ("2026-03-29T16:00:00Z", "2026-04-05T16:00:00Z")
    assert (monthly["last_reset"], monthly["next_reset"]) == ("2026-03-01T05:00:00Z", "2026-04-01T04:00:00Z")
    assert "last_reset" not in plain and "next_reset" not in plain


@pytest.mark.django_db
def test_daily_active_users_counts_a_user_once(client, writer):
    for _ in range(50):
        r = post(client, "/api/v1/counter/daily_active_users/increment", {"user_id": "u1"}, writer)
        assert r.json() == {"success": True, "current_value": 1}
    for i in range(50):
        post(client, "/api/v1/counter/daily_active_users/increment", {"user_id": f"p{i}"}, writer)
    assert client.get("/api/v1/counter/daily_active_users").json()["value"] == 51
    counters_flush()
    row = CounterValue.objects.get(counter__name="daily_active_users")
    assert row.value == 51


@pytest.mark.django_db
def test_reset_needs_the_manage_role_and_keeps_the_value_before(client, builtins, make_key):
    writer_only = make_key(("write",))
    manager = make_key(("counter_manage",))
    post(client, "/api/v1/counter/matches_running/increment", {"value": 7}, {"HTTP_X_API_KEY": writer_only})
    r = post(client, "/api/v1/counter/matches_running/reset", {"admin_token": writer_only})
    assert r.status_code == 403 and r.json()["success"] is False
    r = post(client, "/api/v1/counter/matches_running/reset", {"admin_token": manager, "reason": "event over"})
    assert r.json() == {"success": True, "current_value": 0, "previous_value": 7}
    from archive.models import ResetLog

    log = ResetLog.objects.get()
    assert (log.value_before, log.value_after, log.reason, log.kind) == (7, 0, "event over", "manual")


BAD_UPDATES = [
    ("not json", '{"value": ', 400, 4001),
    ("float", '{"value": 1.5}', 400, 4001),
    ("string", '{"value": "1"}', 400, 4001),
    ("bool", '{"value": true}', 400, 4001),
    ("zero", '{"value": 0}', 400, 4001),
    ("negative", '{"value": -3}', 400, 4001),
    ("over 64 bits", '{"value": 99999999999999999999999}', 400, 4001),
    ("over the safe range", '{"value": 9007199254740992}', 400, 4001),
    ("metadata not an object", '{"metadata": [1, 2]}', 400, 4001),
    ("metadata too big", '{"metadata": {"x": "' + "a" * 5000 + '"}}', 400, 4001),
    ("bad user id", '{"user_id": "a b"}', 400, 4001),
    ("body is a list", "[1]", 400, 4001),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_UPDATES, ids=[c[0] for c in BAD_UPDATES])
def test_bad_updates_are_refused_with_a_code_and_change_nothing(client, writer, case, body, status, code):
    post(client, "/api/v1/counter/matches_running/increment", {"value": 3}, writer)
    r = post(client, "/api/v1/counter/matches_running/increment", body, writer, raw=True)
    assert r.status_code == status, r.content
    assert r.json()["success"] is False and r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert client.get("/api/v1/counter/matches_running").json()["value"] == 3


@pytest.mark.django_db
def test_request_errors_have_codes_and_change_nothing(client, writer, builtins):
    post(client, "/api/v1/counter/matches_running/increment", {"value": 2}, writer)
    cases = [
        (post(client, "/api/v1/counter/nope/increment", {}, writer), 404, 4004),
        (post(client, "/api/v1/counter/b$d/increment", {}, writer), 400, 4001),
        (post(client, "/api/v1/counter/matches_running/increment", {}), 401, 4003),
        (post(client, "/api/v1/counter/matches_running/increment", {}, {"HTTP_X_API_KEY": "wrong"}), 401, 4003),
        (post(client, "/api/v1/counter/matches_running/decrement", {"value": 3}, writer), 409, 4005),
        (client.get("/api/v1/counter/matches_running/increment"), 405, 4001),
        (client.get("/api/v1/counters?names=" + ",".join(f"c{i}" for i in range(11))), 400, 4001),
        (client.get("/api/v1/counters?names="), 400, 4001),
        (client.get("/api/v1/counters?names=matches_running,nope"), 404, 4004),
        (post(client, "/api/v1/counter/matches_running/increment", "x=1", writer, raw=True), 400, 4001),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.content
        assert response.json()["success"] is False
        assert response.json()["error"]["code"] == code
    assert "POST" in cases[5][0].json()["error"]["message"]
    assert client.get("/api/v1/counter/matches_running").json()["value"] == 2


@pytest.mark.django_db
def test_private_counters_need_a_key_of_their_app(client, builtins, make_key):
    from counters.models import App, Counter

    other = App.objects.create(slug="other")
    Counter.objects.create(app=other, name="secret_gold", public=False)
    other_key = make_key(("write",), app="other")
    default_key = make_key(("write",))
    post(client, "/api/v1/counter/secret_gold/increment", {"value": 4}, {"HTTP_X_API_KEY": other_key})
    assert client.get("/api/v1/counter/secret_gold", HTTP_X_API_KEY=other_key).json()["value"] == 4
    assert client.get("/api/v1/counter/secret_gold?app=other").status_code == 401
    r = client.get("/api/v1/counter/secret_gold", HTTP_X_API_KEY=default_key)
    assert r.status_code == 404 and r.json()["error"]["code"] == 4004
    r = post(client, "/api/v1/counter/secret_gold/increment", {}, {"HTTP_X_API_KEY": default_key})
    assert r.status_code == 404
    assert client.get("/api/v1/counter/secret_gold", HTTP_X_API_KEY=other_key).json()["value"] == 4


def test_healthz_reports_both_stores(client, db):
    assert client.get("/healthz").json() == {"status": "ok", "postgres": "ok", "redis": "ok", "circuit_open": False}
