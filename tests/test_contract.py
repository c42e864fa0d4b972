"""The fast lane and the DRF views cannot drift: the REST v1, cloud-function and presence suites run
through the real server (gunicorn + uvicorn workers, the production config, its clock moved with the
test's), and every hot endpoint answers the same bytes and headers with the fast lane as with Django
alone."""

import os
import re
import subprocess
import sys

import pytest
import requests
from django.conf import settings

from counters import config
from counters.models import App, Counter, CounterValue, Threshold

from .processes import ROOT, Gunicorn

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_the_rest_v1_and_cloud_function_suites_pass_through_the_real_server():
    env = {
        **os.environ,
        "COUNTER_CONTRACT_SERVER": "1",
        # A database of its own: this run's test database is in use by this process.
        "DJANGO_TEST_DATABASE_NAME": settings.DATABASES["default"]["NAME"] + "_contract",
        "TEST_REDIS_URL": settings.REDIS_URL,
        "TEST_BROKER_URL": settings.CELERY_BROKER_URL,
    }
    suites = ["tests/test_rest_v1.py", "tests/test_functions.py", "tests/test_presence_api.py", "tests/test_split.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider", "--create-db"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    # Every test but those that need the service in the test's own process (marked in_process).
    assert passed >= 40 and "failed" not in summary, summary


# --- the same requests with and without the fast lane ------------------------------------------

TIMES = [
    (
        re.compile(
            rb'"(last_updated|last_reset|next_reset|updateTime|lastResetTime|nextResetTime|expires_at)":"[^"]+"'
        ),
        rb'"\1":"T"',
    ),
    (re.compile(rb'"timestamp":\d+'), rb'"timestamp":0'),
]


def _normalized(body: bytes) -> bytes:
    for pattern, replacement in TIMES:
        body = pattern.sub(replacement, body)
    return body


def _exchange(url: str, key: str, player: str) -> list:
    """Every hot endpoint: successes, each kind of refusal, other languages; what came back."""
    bearer = {"Authorization": f"Bearer {key}"}
    rest, fn = f"{url}/api/v1", f"{url}/api/v1/functions"
    target = {"appId": "game", "counterType": "app", "counterId": "gold"}
    calls = [
        ("POST", f"{rest}/counter/gold/increment", b'{"value": 5}', bearer),
        ("POST", f"{rest}/counter/gold/increment", b"", bearer),
        ("POST", f"{rest}/counter/gold/decrement", b'{"value": 2, "user_id": "u1"}', bearer),
        ("POST", f"{rest}/counter/gold/decrement", b'{"value": 99}', bearer),
        ("POST", f"{rest}/counter/gold/increment", b'{"value": 1.5}', bearer),
        ("POST", f"{rest}/counter/gold/increment", b'{"value": ', bearer),
        ("POST", f"{rest}/counter/gold/increment", b'{"value": 1}', {}),
        ("POST", f"{rest}/counter/gold/increment", b'{"value": 1}', {"X-API-Key": "nope"}),
        ("POST", f"{rest}/counter/nope/increment", b"{}", bearer),
        ("POST", f"{rest}/counter/b$d/increment", b"{}", bearer),
        ("POST", f"{rest}/counter/gold/increment", b'{"metadata": [1]}', bearer),
        ("GET", f"{rest}/counter/gold", None, bearer),
        ("GET", f"{rest}/counter/gold", None, {}),
        ("GET", f"{rest}/counter/daily?app=game", None, {}),
        ("GET", f"{rest}/counter/energy?user_id=p1", None, bearer),
        ("GET", f"{rest}/counters?names=gold,daily", None, bearer),
        ("GET", f"{rest}/counters?names=gold,nope", None, bearer),
        ("GET", f"{rest}/counters?names=", None, bearer),
        ("GET", f"{rest}/counters?names=energy", None, bearer),
        (
            "POST",
            f"{rest}/counters/batch",
            b'{"updates": [{"name": "gold", "op": "increment", "value": 2}, '
            b'{"name": "daily", "op": "decrement", "value": 1}, {"name": "energy", "user_id": "p1"}]}',
            bearer,
        ),
        ("POST", f"{rest}/counters/batch", b'{"updates": [{"name": "nope"}]}', bearer),
        ("POST", f"{rest}/counters/batch", b'{"updates": []}', bearer),
        ("POST", f"{rest}/counters/batch", b'{"updates": [{"name": "gold"}]}', {}),
        ("POST", f"{fn}/increaseCounter", orjson_dumps({**target, "increment": 3}), bearer),
        ("POST", f"{fn}/increaseCounter", orjson_dumps({**target, "increment": 300}), bearer),
        ("POST", f"{fn}/increaseCounter", orjson_dumps({**target, "increment": "1"}), bearer),
        ("POST", f"{fn}/decreaseCounter", orjson_dumps({**target, "decrement": 1}), bearer),
        ("POST", f"{fn}/decreaseCounter", orjson_dumps({**target, "decrement": 1, "allowNegative": "y"}), bearer),
        ("POST", f"{fn}/getCounter", orjson_dumps(target), bearer),
        ("POST", f"{fn}/getCounter", orjson_dumps(target), {"Accept-Language": "zh-Hans"}),
        (
            "POST",
            f"{fn}/getCounter",
            orjson_dumps({**target, "counterId": "nope"}),
            {**bearer, "Accept-Language": "zh-Hant"},
        ),
        (
            "POST",
            f"{fn}/getCounter",
            orjson_dumps({**target, "counterType": "user", "counterId": "energy"}),
            {"Authorization": f"Player {player}"},
        ),
        ("POST", f"{fn}/getCounter", orjson_dumps(target), {"Authorization": f"Player {player}"}),
        ("POST", f"{fn}/increaseCounter", orjson_dumps(target), {"Authorization": f"Player {player}"}),
        ("POST", f"{fn}/getCounter", orjson_dumps({**target, "appId": "other"}), bearer),
        ("POST", f"{fn}/getCounter", b"[1]", bearer),
        ("POST", f"{fn}/getCounter", b"appId=game", {**bearer, "Content-Type": "application/x-www-form-urlencoded"}),
    ]
    online = {**target, "counterId": "online", "playerId": "p7"}
    calls += [  # the presence counter "online": logins, heartbeats, logouts, reads and their refusals
        ("POST", f"{rest}/counter/online/increment", b'{"user_id": "u1"}', bearer),
        ("POST", f"{rest}/counter/online/increment", b'{"user_id": "u2", "session_id": "s1", "node_id": "n1"}', bearer),
        ("POST", f"{rest}/counter/online/increment", b'{"user_id": "u3", "metadata": {"level": 3}}', bearer),
        ("POST", f"{rest}/counter/online/increment", b"{}", bearer),
        ("POST", f"{rest}/counter/online/increment", b'{"user_id": "u1", "value": 2}', bearer),
        ("POST", f"{rest}/counter/online/increment", b'{"user_id": "u1", "node_id": ""}', bearer),
        ("POST", f"{rest}/counter/online/increment", b'{"user_id": "u1"}', {**bearer, "Idempotency-Key": "a b"}),
        ("POST", f"{rest}/counter/online/heartbeat", b'{"user_id": "u1"}', bearer),
        ("POST", f"{rest}/counter/online/heartbeat", b'{"user_ids": ["g1", "g2"], "node_id": "n2"}', bearer),
        ("POST", f"{rest}/counter/online/heartbeat", b'{"node_id": "n2", "lease_seconds": 120}', bearer),
        ("POST", f"{rest}/counter/online/heartbeat", b"{}", bearer),
        ("POST", f"{rest}/counter/online/heartbeat", b'{"user_ids": "g1"}', bearer),
        ("POST", f"{rest}/counter/online/heartbeat", b'{"user_id": "u1", "lease_seconds": 4}', bearer),
        ("POST", f"{rest}/counter/online/heartbeat", b'{"user_id": "u1", "colour": "red"}', bearer),
        ("POST", f"{rest}/counter/online/heartbeat", b'{"user_id": "u1"}', {}),
        ("POST", f"{rest}/counter/gold/heartbeat", b'{"user_id": "u1"}', bearer),
        ("POST", f"{rest}/counter/nope/heartbeat", b'{"user_id": "u1"}', bearer),
        ("POST", f"{rest}/counter/online/decrement", b'{"user_id": "u3"}', bearer),
        ("GET", f"{rest}/counter/online", None, bearer),
        ("GET", f"{rest}/counters?names=online,gold,daily", None, bearer),
        ("POST", f"{rest}/counters/batch", b'{"updates": [{"name": "gold"}, {"name": "online"}]}', bearer),
        ("POST", f"{fn}/increaseCounter", orjson_dumps({**online, "increment": 1}), bearer),
        ("POST", f"{fn}/increaseCounter", orjson_dumps({**online, "increment": 2}), bearer),
        ("POST", f"{fn}/increaseCounter", orjson_dumps({**target, "counterId": "online", "increment": 1}), bearer),
        ("POST", f"{fn}/decreaseCounter", orjson_dumps({**online, "decrement": 1}), bearer),
        ("POST", f"{fn}/getCounter", orjson_dumps({**target, "counterId": "online"}), bearer),
    ]
    seen = []
    for method, address, body, headers in calls:
        headers = {"Content-Type": "application/json", **headers} if body is not None else headers
        reply = requests.request(method, address, data=body, headers=headers, timeout=10)
        kept = [(k.lower(), v) for k, v in reply.headers.items() if k.lower() not in ("date", "server")]
        seen.append((method, address[len(url) :], reply.status_code, kept, _normalized(reply.content)))
    return seen


def orjson_dumps(value) -> bytes:
    import orjson

    return orjson.dumps(value)


def _game(make_key) -> str:
    app = App.objects.create(slug="game")
    gold = Counter.objects.create(app=app, name="gold", max_value=100, public=False)
    Threshold.objects.create(counter=gold, value=10)
    Counter.objects.create(app=app, name="daily", period="daily", allow_negative=True, public=True)
    Counter.objects.create(app=app, name="energy", scope="user")
    Counter.objects.create(app=app, name="online", kind="presence")
    return make_key(("write",), app="game")


def _reset_values(store) -> None:
    store.flushdb()
    CounterValue.objects.all().delete()
    config.bump_generation()


def test_every_hot_endpoint_answers_the_same_bytes_with_and_without_the_fast_lane(builtins, make_key, store):
    key = _game(make_key)
    answers = []
    # The lane in the worker's HTTP protocol (counterproject.lane_protocol), the lane as an ASGI
    # application under uvicorn's own protocol, and Django alone.
    for lane, protocol in (("1", "1"), ("1", "0"), ("0", "1")):
        _reset_values(store)
        web = Gunicorn(workers=1, env={"COUNTER_FAST_LANE": lane, "WEB_LANE_PROTOCOL": protocol})
        try:
            token = requests.post(
                f"{web.url}/api/v1/player-tokens",
                json={"player_id": "p1"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            ).json()["token"]
            answers.append(_exchange(web.url, key, token))
            assert ("answered in the HTTP protocol" in web.output()) == (lane == protocol == "1")
        finally:
            web.stop()
    lane, lane_asgi, django = answers
    assert len(lane) == len(lane_asgi) == len(django) > 60
    for with_lane, through_asgi, without in zip(lane, lane_asgi, django, strict=True):
        assert with_lane == through_asgi == without
    # The exchange covers successes and every refusal the hot endpoints give.
    assert {status for _, _, status, _, _ in lane} >= {200, 400, 401, 403, 404, 409, 415}


def test_the_host_header_is_checked_and_a_large_body_refused_on_the_fast_lane(builtins, make_key, store):
    key = make_key(("write",))
    web = Gunicorn(workers=1, env={"COUNTER_MAX_BODY_BYTES": "2000"})
    bearer = {"Authorization": f"Bearer {key}"}
    increment = f"{web.url}/api/v1/counter/matches_running/increment"
    try:
        assert requests.post(increment, json={"value": 2}, headers=bearer, timeout=10).json()["current_value"] == 2
        evil = requests.post(increment, json={}, headers={**bearer, "Host": "evil.example"}, timeout=10)
        big = requests.post(increment, json={"metadata": {"x": "a" * 3000}}, headers=bearer, timeout=10)
        big_fn = requests.post(
            f"{web.url}/api/v1/functions/increaseCounter", data=b"{" + b" " * 3000 + b"}", headers=bearer, timeout=10
        )
        big_django = requests.post(f"{web.url}/api/v1/player-tokens", data=b" " * 3000, headers=bearer, timeout=10)
        value = requests.get(f"{web.url}/api/v1/counter/matches_running", timeout=10).json()["value"]
    finally:
        web.stop()
    # A Host outside ALLOWED_HOSTS gets Django's own 400 and changes nothing.
    assert evil.status_code == 400 and b"Bad Request" in evil.content
    assert big.status_code == 413 and big.json()["error"]["code"] == 4001
    assert big_fn.status_code == 413 and big_fn.json()["code"] == 4001 and big_fn.json()["data"] is None
    assert big_django.status_code == 413
    assert value == 2
