"""Presence over HTTP: logins, heartbeats and logouts of online_players through the REST v1 and
cloud-function surfaces (a live server for the concurrent logins), bad input, persistence and
Redis failures. Time is moved (time-machine), never slept.

The contract run (tests/test_contract.py) sends these requests to the real server, fast lane
included, and moves its clock with the test's (``server_clock``)."""

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis
import requests
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from counters import keyspace
from counters.flush import counters_flush
from counters.models import Counter, CounterValue, Threshold, ThresholdEvent

T0 = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
ONLINE = "/api/v1/counter/online_players"


@pytest.fixture
def clock_at(time_machine, server_clock):
    def move(seconds: float) -> None:
        time_machine.move_to(T0 + timedelta(seconds=seconds), tick=False)
        if server_clock is not None:
            server_clock.move_to(T0 + timedelta(seconds=seconds))

    move(0)
    return move


@pytest.fixture
def auth(builtins, make_key):
    return {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'data_view'))}"}


def post(client: Client, path: str, body, auth: dict):
    return client.post(path, json.dumps(body), content_type="application/json", **auth)


def value(client: Client) -> int:
    return client.get(ONLINE).json()["value"]


def client_commands(store, call) -> tuple[dict[str, int], object]:
    """What a request sent to Redis and its reply: the number of round trips (a pipeline is one)
    and of script calls; it must query no database either."""
    sent = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command)
        return original(self, command, check_health)

    before = store.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    redis.connection.AbstractConnection.send_packed_command = counting
    try:
        with CaptureQueriesContext(connection) as queries:
            reply = call()
    finally:
        redis.connection.AbstractConnection.send_packed_command = original
    scripts = store.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) - before
    assert [q["sql"] for q in queries.captured_queries] == []
    return {"round trips": len(sent), "evalsha": scripts}, reply


def lease_state(store) -> dict:
    """Every presence key of online_players with its content (to show that nothing changed)."""
    counter = Counter.objects.get(app__slug="default", name="online_players")
    state = {}
    for key in keyspace.presence_keys(counter.id, "")[6:]:
        kind = store.type(key).decode()
        state[key] = store.zrange(key, 0, -1, withscores=True) if kind == "zset" else store.hgetall(key)
    return state


@pytest.mark.django_db(transaction=True)
def test_a_thousand_concurrent_logins_count_while_they_heartbeat_and_leave_within_one_lease(
    server_url, builtins, make_key, clock_at
):
    headers = {"Authorization": f"Bearer {make_key(('write',))}"}
    url = server_url + ONLINE

    def send(session: requests.Session, path: str, user: str) -> int:
        # Django's test server listens with a backlog of 5: a connection reset in a burst of 50
        # is retried, as a game client would (a login or heartbeat may be repeated safely).
        for attempt in range(3):
            try:
                return session.post(f"{url}/{path}", json={"user_id": user}, headers=headers, timeout=60).status_code
            except requests.ConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def player_client(thread: int, path: str) -> list[int]:
        with requests.Session() as session:
            return [send(session, path, f"p{thread}-{i}") for i in range(20)]

    def all_clients(path: str) -> None:
        with ThreadPoolExecutor(50) as pool:
            statuses = [s for result in pool.map(player_client, range(50), [path] * 50) for s in result]
        assert statuses == [200] * 1000

    all_clients("increment")
    assert requests.get(url, timeout=10).json()["value"] == 1000
    for second in (60, 120):  # heartbeats every 60 s keep the 90 s leases alive
        clock_at(second)
        all_clients("heartbeat")
        assert requests.get(url, timeout=10).json()["value"] == 1000
    # Then every client stops without logging out.
    clock_at(120 + 89)
    assert requests.get(url, timeout=10).json()["value"] == 1000
    clock_at(120 + 90)
    assert requests.get(url, timeout=10).json()["value"] == 0


@pytest.mark.django_db
class TestCalls:
    def test_login_heartbeat_logout_and_the_heartbeat_reply(self, client, auth, clock_at):
        assert post(client, f"{ONLINE}/increment", {"user_id": "u1"}, auth).json() == {
            "success": True,
            "current_value": 1,
        }
        clock_at(30)
        reply = post(client, f"{ONLINE}/heartbeat", {"user_id": "u1", "session_id": "phone"}, auth)
        assert reply.status_code == 200
        assert reply.json() == {
            "success": True,
            "current_value": 1,  # the same user on a second session
            "lease_seconds": 90,
            "expires_at": "2026-05-04T12:02:00Z",
        }
        assert post(client, f"{ONLINE}/decrement", {"user_id": "u1", "session_id": "phone"}, auth).json() == {
            "success": True,
            "current_value": 1,
        }
        assert post(client, f"{ONLINE}/decrement", {"user_id": "u1"}, auth).json()["current_value"] == 0

    @pytest.mark.in_process  # counts this process's Redis commands (test_fast_lane counts the lane's)
    def test_a_batch_heartbeat_of_a_thousand_players_is_one_round_trip(
        self, client, auth, clock_at, private_redis, settings
    ):
        # A Redis of its own, so that every command it counts is this test's.
        settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
        settings.COUNTER_CONFIG_CHECK_SECONDS = 60  # no config-generation check in the counted request
        store = redis.Redis.from_url(private_redis.url)
        ids = [f"p{i}" for i in range(1000)]
        post(client, f"{ONLINE}/heartbeat", {"user_ids": ids[:1], "node_id": "eu-7"}, auth)  # warm
        sent, reply = client_commands(
            store, lambda: post(client, f"{ONLINE}/heartbeat", {"user_ids": ids, "node_id": "eu-7"}, auth)
        )
        assert reply.status_code == 200 and reply.json()["current_value"] == 1000
        assert sent == {"round trips": 1, "evalsha": 1}
        sent, reply = client_commands(store, lambda: client.get(ONLINE))
        assert reply.json()["value"] == 1000 and sent == {"round trips": 1, "evalsha": 1}
        clock_at(89)
        assert value(client) == 1000
        clock_at(90)  # the node was not renewed: its thousand players leave together
        assert value(client) == 0

    def test_the_cloud_functions_log_players_in_and_out(self, client, auth):
        body = {"appId": "default", "counterType": "app", "counterId": "online_players", "playerId": "p1"}
        reply = post(client, "/api/v1/functions/increaseCounter", {**body, "increment": 1}, auth).json()
        assert reply["code"] == 0 and reply["data"]["newValue"] == 1
        reply = post(client, "/api/v1/functions/decreaseCounter", {**body, "decrement": 1}, auth).json()
        assert reply["code"] == 0 and reply["data"]["newValue"] == 0
        no_player = {k: v for k, v in body.items() if k != "playerId"}
        reply = post(client, "/api/v1/functions/increaseCounter", {**no_player, "increment": 1}, auth).json()
        assert reply["code"] == 4001 and reply["data"] is None


BAD = [  # (path, body, status): 400 breaks the schema, 409 a rule it cannot state
    ("increment", {}, 409),
    ("increment", {"value": 1}, 409),
    ("increment", {"user_id": "no spaces"}, 400),
    ("increment", {"user_id": "u2", "value": 2}, 409),
    ("increment", {"user_id": "u2", "value": "1"}, 400),
    ("increment", {"user_id": "u2", "session_id": ["s"]}, 400),
    ("increment", {"user_id": ""}, 400),
    ("increment", {"user_id": "u2", "metadata": None}, 400),
    ("decrement", {"user_id": "u1", "metadata": [1]}, 400),
    ("increment", {"user_id": "u2", "session_id": ""}, 400),
    ("increment", {"user_id": "u2", "node_id": ""}, 400),
    ("decrement", {"user_id": "u1", "session_id": ""}, 400),
    ("heartbeat", {"node_id": ""}, 400),
    ("heartbeat", {"user_id": "u2", "session_id": ""}, 400),
    ("heartbeat", {"user_ids": ["u2"], "node_id": ""}, 400),
    ("heartbeat", {"user_id": "u2", "colour": "red"}, 400),
    ("decrement", {}, 409),
    ("decrement", {"user_id": "x" * 65}, 400),
    ("heartbeat", {}, 409),
    ("heartbeat", {"session_id": "s1"}, 409),
    ("heartbeat", {"user_id": "u2", "lease_seconds": 4}, 400),
    ("heartbeat", {"user_id": "u2", "lease_seconds": 3601}, 400),
    ("heartbeat", {"user_id": "u2", "lease_seconds": "90"}, 400),
    ("heartbeat", {"user_ids": "u2"}, 400),
    ("heartbeat", {"user_ids": []}, 400),
    ("heartbeat", {"user_ids": [f"p{i}" for i in range(1001)]}, 400),
    ("heartbeat", {"user_ids": ["u2", "bad id"]}, 400),
    ("heartbeat", {"user_ids": ["u2"], "session_id": "s1"}, 409),
    ("heartbeat", {"user_ids": ["u2"], "user_id": "u3"}, 409),
    ("heartbeat", {"node_id": "bad node!"}, 400),
    ("heartbeat", [1, 2], 400),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "body", "status"), BAD)
def test_bad_input_answers_4001_in_the_one_error_shape_and_changes_nothing(client, auth, store, path, body, status):
    post(client, f"{ONLINE}/increment", {"user_id": "u1"}, auth)
    before = lease_state(store)
    reply = post(client, f"{ONLINE}/{path}", body, auth)
    assert reply.status_code == status, reply.content
    error = reply.json()
    assert error["success"] is False and error["error"]["code"] == 4001 and error["error"]["message"]
    assert lease_state(store) == before
    assert value(client) == 1


@pytest.mark.django_db
def test_a_heartbeat_needs_a_presence_counter_and_a_key(client, auth):
    reply = post(client, "/api/v1/counter/total_games_played/heartbeat", {"user_id": "u1"}, auth)
    assert reply.status_code == 409 and reply.json()["error"]["code"] == 4001
    reply = post(client, f"{ONLINE}/heartbeat", {"user_id": "u1"}, {})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == 4003
    assert value(client) == 0


@pytest.mark.django_db
def test_a_presence_count_cannot_be_reset_or_batch_updated(client, builtins, make_key):
    manager = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'counter_manage'))}"}
    post(client, f"{ONLINE}/increment", {"user_id": "u1"}, manager)
    reply = post(client, f"{ONLINE}/reset", {"reason": "why not"}, manager)
    assert reply.status_code == 409 and reply.json()["error"]["code"] == 4001
    batch = {"updates": [{"name": "total_games_played"}, {"name": "online_players", "user_id": "u2"}]}
    reply = post(client, "/api/v1/counters/batch", batch, manager)
    assert reply.status_code == 409 and reply.json()["error"]["code"] == 4001
    assert value(client) == 1


@pytest.mark.django_db
class TestWithTheRest:
    def test_thresholds_fire_on_logins_and_on_lapses(self, client, auth, clock_at):
        counter = Counter.objects.get(app__slug="default", name="online_players")
        up = Threshold.objects.create(counter=counter, value=3, direction="up")
        down = Threshold.objects.create(counter=counter, value=1, direction="down")
        for user in ("u1", "u2", "u3"):
            post(client, f"{ONLINE}/increment", {"user_id": user}, auth)
        clock_at(60)
        post(client, f"{ONLINE}/heartbeat", {"user_id": "u1"}, auth)
        clock_at(100)  # u2 and u3 lapse: 3 -> 1, seen by this read
        assert value(client) == 1
        counters_flush()
        assert ThresholdEvent.objects.filter(threshold=up).count() == 1
        assert ThresholdEvent.objects.filter(threshold=down).count() == 1

    def test_the_peak_of_the_day_and_the_board(self, client, auth, clock_at):
        for user in ("u1", "u2", "u3", "u4"):
            post(client, f"{ONLINE}/increment", {"user_id": user}, auth)
        post(client, f"{ONLINE}/decrement", {"user_id": "u4"}, auth)
        clock_at(60)
        post(client, f"{ONLINE}/decrement", {"user_id": "u3"}, auth)
        counters_flush()
        stats = post(
            client,
            "/api/v1/functions/getCounterStats",
            {"appId": "default", "startDate": "2026-05-04", "endDate": "2026-05-04", "groupBy": "day"},
            auth,
        ).json()
        online = next(c for c in stats["data"]["counterList"] if c["counterId"] == "online_players")
        assert (online["currentValue"], online["peakValue"], online["operationCount"]) == (2, 4, 6)
        board = client.get("/board/values", {"app": "default"}).json()
        assert {c["name"]: c["value"] for c in board["counters"]}["online_players"] == 2
        row = CounterValue.objects.get(counter__name="online_players", counter__app__slug="default")
        assert (row.value, row.peak) == (2, 4)


@pytest.mark.in_process  # a Redis of its own, which a server started earlier does not use
@pytest.mark.django_db
def test_redis_down_reads_show_the_last_flushed_count_and_writes_are_refused(
    client, auth, private_redis, settings, clock_at
):
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    for user in ("u1", "u2", "u3"):
        post(client, f"{ONLINE}/increment", {"user_id": user}, auth)
    counters_flush()
    private_redis.kill()
    reply = client.get(ONLINE)
    assert reply.status_code == 200 and reply.json()["value"] == 3 and reply.json()["degraded"] is True
    for path, body in (("heartbeat", {"user_id": "u1"}), ("increment", {"user_id": "u4"})):
        refused = post(client, f"{ONLINE}/{path}", body, auth)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == 5003


@pytest.mark.django_db
def test_after_redis_loses_its_data_presence_relearns_from_heartbeats_within_one_lease(client, auth, store, clock_at):
    for user in ("u1", "u2", "u3"):
        post(client, f"{ONLINE}/increment", {"user_id": user}, auth)
    post(client, f"{ONLINE}/heartbeat", {"user_ids": ["g1", "g2"], "node_id": "eu-7"}, auth)
    counters_flush()
    store.flushdb()  # Redis restarted without its data
    clock_at(30)  # the clients' and the server's next heartbeats
    for user in ("u1", "u2", "u3"):
        post(client, f"{ONLINE}/heartbeat", {"user_id": user}, auth)
    post(client, f"{ONLINE}/heartbeat", {"user_ids": ["g1", "g2"], "node_id": "eu-7"}, auth)
    assert value(client) == 5
    counters_flush()
    assert CounterValue.objects.get(counter__name="online_players", counter__app__slug="default").value == 5


@pytest.mark.in_process  # a Redis of its own, which a server started earlier does not use
@pytest.mark.django_db
def test_a_read_is_served_by_a_redis_that_lost_the_script_or_the_value(client, auth, private_redis, settings):
    # A Redis of its own: a SCRIPT FLUSH empties every database of a server.
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    store = redis.Redis.from_url(private_redis.url)
    for user in ("u1", "u2"):
        post(client, f"{ONLINE}/increment", {"user_id": user}, auth)
    store.script_flush()
    assert client.get("/api/v1/counters?names=online_players,total_games_played").json()["counters"][0]["value"] == 2
    counters_flush()
    store.delete(keyspace.value_key(Counter.objects.get(app__slug="default", name="online_players").id, "", ""))
    assert value(client) == 2  # hydrated from PostgreSQL, then counted from the leases
