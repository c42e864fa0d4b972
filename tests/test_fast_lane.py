"""The fast lane's shared round trips, one failure per request, the breaker, and requests that wait on
PostgreSQL (hot or not) holding up nobody else."""

import asyncio
import contextlib
import threading
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
import pytest
import redis
import requests
from django.conf import settings
from django.db import connections

from counterproject.asgi import application
from counters import keyspace, redis_store
from counters.fastlane import offload
from counters.fastlane.handlers import rest_heartbeat, route
from counters.fastlane.store import MAX_PIPELINE, MAX_PIPELINE_ARGS, LaneStore, lane_store
from counters.flush import counters_flush
from counters.models import Counter, OperationLog, Threshold, ThresholdEvent
from counters.redis_store import breaker

from . import processes
from .processes import Gunicorn, wait_until


@pytest.mark.single_redis  # one coalescer (a cluster has one per node: tests/test_cluster.py)
def test_the_calls_of_one_loop_turn_share_one_round_trip_and_each_gets_its_own_reply(store):
    async def main():
        lane = LaneStore()
        replies = await asyncio.gather(*(lane.command("INCRBY", f"lane:k{i % 3}", 1) for i in range(99)))
        return lane.round_trips, replies

    round_trips, replies = asyncio.run(main())
    assert round_trips == 1
    # In order, each key's own count: the k-th call on a key got k.
    assert [replies[i] for i in range(0, 99, 3)] == list(range(1, 34))
    assert store.get("lane:k2") == b"33"


@pytest.mark.single_redis  # one coalescer (a cluster has one per node: tests/test_cluster.py)
def test_a_round_trip_is_bounded(store):
    async def main():
        lane = LaneStore()
        await asyncio.gather(*(lane.command("INCR", "lane:n") for _ in range(2 * MAX_PIPELINE + 1)))
        return lane.round_trips

    assert asyncio.run(main()) == 3
    assert store.get("lane:n") == str(2 * MAX_PIPELINE + 1).encode()

    async def large():
        lane = LaneStore()
        arguments = [f"m{i}" for i in range(MAX_PIPELINE_ARGS // 4)]
        await asyncio.gather(*(lane.command("SADD", f"lane:set{i}", *arguments) for i in range(6)))
        return lane.round_trips

    # Six commands of a quarter of the argument bound each: two round trips, not one.
    assert asyncio.run(large()) == 2


def test_a_group_of_commands_shares_the_round_trip_and_gets_its_replies_in_order(store):
    """``LaneStore.commands`` (a read of several values): one future for the group, each reply in
    its place, an error reply as its exception, and bounded round trips all the same."""
    for key in ("lane:g", "lane:big"):
        store.delete(key)
    store.set("lane:string", "x")

    async def main():
        lane = LaneStore()
        group = lane.commands([("INCR", "lane:g"), ("HGET", "lane:string", "f"), ("INCR", "lane:g")])
        alone = lane.command("INCR", "lane:g")
        big = lane.commands([("INCR", "lane:big")] * (MAX_PIPELINE + 1))
        return await group, await alone, await big, lane.round_trips

    (first, failed, third), alone, big, round_trips = asyncio.run(main())
    assert (first, third, alone) == (1, 2, 3)
    assert isinstance(failed, redis.ResponseError) and "WRONGTYPE" in str(failed)
    if settings.REDIS_CLUSTER:
        # Each command routed on its own: more than a round trip's bound go out as two round trips,
        # which the node may run in either order.
        assert sorted(big) == list(range(1, MAX_PIPELINE + 2))
    else:
        # The group past the bound goes whole in a round trip of its own: in order.
        assert big == list(range(1, MAX_PIPELINE + 2))
        assert round_trips == 2


@pytest.mark.single_redis  # one coalescer (a cluster has one per node: tests/test_cluster.py)
def test_one_failed_call_fails_only_its_own_caller(store):
    store.set("lane:string", "x")

    async def main():
        lane = LaneStore()
        calls = [
            lane.command("INCR", "lane:a"),
            lane.command("HGET", "lane:string", "f"),
            lane.command("INCR", "lane:a"),
        ]
        return lane.round_trips, await asyncio.gather(*calls, return_exceptions=True), lane

    _, (first, failed, third), lane = asyncio.run(main())
    assert (first, third) == (1, 2)
    assert isinstance(failed, redis.ResponseError) and "WRONGTYPE" in str(failed)
    assert lane.round_trips == 1


# --- through the ASGI application, in this process ------------------------------------------


@pytest.fixture
def lane_threads():
    """Close the database connections the fast lane's threads opened (the test database is dropped after)."""
    yield
    barrier = threading.Barrier(offload.THREADS)

    def close() -> None:
        barrier.wait(timeout=10)
        connections.close_all()

    for future in [offload._pool.submit(close) for _ in range(offload.THREADS)]:
        future.result(timeout=30)


async def _request(method: str, path: str, key: str, body: bytes = b"", query: bytes = b"", headers: tuple = ()):
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"authorization", (key if key.startswith("Player ") else f"Bearer {key}").encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await application(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


@pytest.mark.single_redis
@pytest.mark.django_db(transaction=True)
def test_a_failing_script_call_fails_only_its_request_among_those_sharing_its_round_trip(
    builtins, make_key, store, settings, lane_threads
):
    # No config generation check in between: the requests' only Redis calls are their scripts.
    settings.COUNTER_CONFIG_CHECK_SECONDS = 60
    key = make_key(("write",))
    broken = Counter.objects.get(name="matches_running")
    # A value key of the wrong type makes the update script fail inside Redis for this counter only.
    store.set(keyspace.value_key(broken.id, "", ""), "not a hash")

    async def main():
        # Warm up: config snapshot loaded, the other value hydrated.
        await _request("POST", "/api/v1/counter/total_games_played/increment", key)
        before = lane_store().round_trips
        calls = [_request("POST", "/api/v1/counter/total_games_played/increment", key) for _ in range(20)]
        calls.insert(7, _request("POST", "/api/v1/counter/matches_running/increment", key))
        replies = await asyncio.gather(*calls)
        return replies, lane_store().round_trips - before

    replies, round_trips = asyncio.run(main())
    statuses = [status for status, _, _ in replies]
    assert statuses[7] == 500 and b'"code":5001' in replies[7][2]
    assert statuses[:7] + statuses[8:] == [200] * 20
    assert round_trips == 1
    assert sorted(int(body.split(b":")[-1][:-1]) for _, _, body in replies[:7] + replies[8:]) == list(range(2, 22))


@pytest.mark.single_redis
@pytest.mark.django_db(transaction=True)
def test_an_open_breaker_answers_503_at_once_without_a_round_trip(builtins, make_key, store, lane_threads):
    key = make_key(("write",))

    async def main():
        await _request("POST", "/api/v1/counter/matches_running/increment", key)
        for _ in range(breaker.threshold):
            breaker.record_failure()
        before = lane_store().round_trips
        reply = await _request("POST", "/api/v1/counter/matches_running/increment", key)
        return reply, lane_store().round_trips - before

    (status, headers, body), round_trips = asyncio.run(main())
    assert status == 503 and b'"code":5003' in body
    assert headers[b"retry-after"] == b"5"
    assert round_trips == 0
    assert store.hget(keyspace.value_key(Counter.objects.get(name="matches_running").id, "", ""), "v") == b"1"


@pytest.mark.django_db(transaction=True)
def test_presence_on_the_lane_logins_heartbeats_and_reads_share_round_trips_and_lapse_with_the_clock(
    builtins, make_key, settings, lane_threads, time_machine
):
    settings.COUNTER_CONFIG_CHECK_SECONDS = 60  # no config-generation check in the counted round trips
    key = make_key(("write",))
    online = "/api/v1/counter/online_players"
    assert route("POST", f"{online}/heartbeat")[0] is rest_heartbeat
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    players = [f"p{i}" for i in range(1000)]

    async def counted(*calls):
        before = lane_store().round_trips
        replies = await asyncio.gather(*calls)
        return lane_store().round_trips - before, replies

    async def main():
        # Warm: the snapshot loaded, both values hydrated.
        await _request("GET", "/api/v1/counters", key, query=b"names=online_players,matches_running")
        logins = [_request("POST", f"{online}/increment", key, b'{"user_id": "u%d"}' % i) for i in range(50)]
        seen = {"logins": await counted(*logins)}
        body = orjson.dumps({"user_ids": players, "node_id": "eu-7"})
        seen["batch heartbeat"] = await counted(_request("POST", f"{online}/heartbeat", key, body))
        seen["read"] = await counted(_request("GET", online, key))
        many = _request("GET", "/api/v1/counters", key, query=b"names=online_players,matches_running")
        seen["read many"] = await counted(many)
        time_machine.move_to(start + timedelta(seconds=90), tick=False)  # nobody renewed anything
        seen["lapsed"] = await counted(_request("GET", online, key))
        seen["logout"] = await counted(_request("POST", f"{online}/decrement", key, b'{"user_id": "u1"}'))
        return seen

    seen = asyncio.run(main())
    round_trips, replies = seen["logins"]
    assert round_trips == 1 and [status for status, _, _ in replies] == [200] * 50
    assert sorted(orjson.loads(body)["current_value"] for _, _, body in replies) == list(range(1, 51))
    round_trips, [(status, _, body)] = seen["batch heartbeat"]
    assert (round_trips, status) == (1, 200)
    assert orjson.loads(body) == {
        "success": True,
        "current_value": 1050,
        "lease_seconds": 90,
        "expires_at": "2026-05-04T12:01:30Z",
    }
    # One round trip per Redis node the values live on (a Redis Cluster may hold them on two).
    ids = Counter.objects.filter(name__in=("online_players", "matches_running")).values_list("id", flat=True)
    nodes = len(redis_store.nodes_of_keys([keyspace.pending_key(i) for i in ids]))
    for name, expected in (("read", 1), ("read many", nodes)):
        round_trips, [(status, _, body)] = seen[name]
        assert (round_trips, status) == (expected, 200) and b'"value":1050' in body, (name, body)
    # At the lease's end every lease lapsed, the node's thousand with the node: swept by the read.
    round_trips, [(status, _, body)] = seen["lapsed"]
    assert (round_trips, status) == (1, 200) and orjson.loads(body)["value"] == 0
    round_trips, [(status, _, body)] = seen["logout"]
    assert (round_trips, status) == (1, 200) and body == b'{"success":true,"current_value":0}'


@pytest.mark.django_db(transaction=True)
def test_presence_refusals_on_the_lane_change_nothing(builtins, make_key, store, settings, lane_threads):
    settings.COUNTER_CONFIG_CHECK_SECONDS = 60  # no config-generation check: only the requests' own calls
    key = make_key(("write",))
    online = "/api/v1/counter/online_players"
    fn = {"appId": "default", "counterType": "app", "counterId": "online_players"}

    async def main():
        await _request("POST", f"{online}/increment", key, b'{"user_id": "u1"}')
        before = lane_store().round_trips
        replies = [
            await _request("POST", f"{online}/increment", key, b"{}"),
            await _request("POST", f"{online}/increment", key, b'{"user_id": "u2", "value": 2}'),
            await _request("POST", f"{online}/increment", key, b'{"user_id": "u2", "node_id": ""}'),
            await _request("POST", f"{online}/heartbeat", key, b'{"session_id": "s1"}'),
            await _request("POST", "/api/v1/counter/matches_running/heartbeat", key, b'{"user_id": "u2"}'),
            await _request("POST", "/api/v1/counters/batch", key, b'{"updates": [{"name": "online_players"}]}'),
            await _request("POST", "/api/v1/functions/increaseCounter", key, orjson.dumps({**fn, "increment": 1})),
        ]
        # Refused before any Redis call.
        return replies, lane_store().round_trips - before

    replies, round_trips = asyncio.run(main())
    assert [status for status, _, _ in replies] == [409, 409, 400, 409, 409, 409, 409]
    assert all(b'"code":4001' in body for _, _, body in replies)
    assert round_trips == 0
    online_id = Counter.objects.get(name="online_players").id
    assert store.zrange(keyspace.presence_keys(online_id, "")[6], 0, -1) == [b"u1|"]


@pytest.mark.django_db(transaction=True)
def test_a_presence_read_on_the_lane_is_served_by_a_redis_that_lost_the_script_or_the_value(
    builtins, make_key, private_redis, settings, lane_threads
):
    # A Redis of its own (a SCRIPT FLUSH empties every database of a server), for both paths.
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    settings.REDIS_URL = private_redis.url
    store = redis.Redis.from_url(private_redis.url)
    key = make_key(("write",))
    online = "/api/v1/counter/online_players"
    names = b"names=online_players,matches_running"

    async def logins():
        for user in (b"u1", b"u2"):
            await _request("POST", f"{online}/increment", key, b'{"user_id": "%s"}' % user)

    async def reads():
        return [await _request("GET", "/api/v1/counters", key, query=names), await _request("GET", online, key)]

    asyncio.run(logins())
    store.script_flush()
    lost_script = asyncio.run(reads())
    counters_flush()
    store.delete(keyspace.value_key(Counter.objects.get(app__slug="default", name="online_players").id, "", ""))
    lost_value = asyncio.run(reads())
    for many, one in (lost_script, lost_value):
        assert many[0] == one[0] == 200
        assert orjson.loads(many[2])["counters"] == [
            {"name": "online_players", "value": 2},
            {"name": "matches_running", "value": 0},
        ]
        assert orjson.loads(one[2])["value"] == 2


# --- through the real server: waiting on PostgreSQL holds up nobody else ---------------------


@contextlib.contextmanager
def tables_locked(*tables: str):
    url = processes.test_database_url()
    with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as watcher:
        locker.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        try:
            yield watcher
        finally:
            locker.rollback()


def waiting_on_locks(watcher) -> int:
    sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    return watcher.execute(sql).fetchone()[0]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_requests_waiting_on_postgresql_hold_up_neither_hot_nor_other_requests(builtins, make_key):
    key = make_key(("write", "data_view"))
    bearer = {"Authorization": f"Bearer {key}"}
    web = Gunicorn(workers=1)
    slow: list[int] = []
    try:
        increment = f"{web.url}/api/v1/counter/matches_running/increment"
        assert requests.post(increment, json={}, headers=bearer, timeout=10).status_code == 200
        with tables_locked("counters_countervalue", "counters_statbucket") as watcher:

            def slow_get(path: str, headers: dict) -> None:
                slow.append(requests.get(f"{web.url}{path}", headers=headers, timeout=60).status_code)

            # Django (not on the lane): statistics read the locked tables. The lane: a value not in
            # Redis yet is hydrated from the locked table, off the event loop.
            waiting = [("/api/v1/stats", bearer)] * 3 + [("/api/v1/counter/total_games_played", {})]
            threads = [threading.Thread(target=slow_get, args=call) for call in waiting]
            for thread in threads:
                thread.start()
            wait_until(lambda: waiting_on_locks(watcher) == 4, what="four requests waiting on PostgreSQL")
            # Meanwhile the same worker answers hot requests and other Django requests.
            for _ in range(20):
                assert requests.post(increment, json={}, headers=bearer, timeout=5).json()["current_value"] > 1
            assert requests.get(f"{web.url}/healthz", timeout=5).status_code == 200
            assert requests.get(f"{web.url}/api/v1/counter/matches_running", timeout=5).json()["value"] == 21
            assert slow == []
        for thread in threads:
            thread.join(timeout=30)
    finally:
        web.stop()
    assert slow == [200, 200, 200, 200]


@pytest.mark.single_redis
@pytest.mark.django_db(transaction=True)
def test_a_cold_value_hit_by_a_burst_is_loaded_from_postgresql_once_and_counts_exactly(
    builtins, make_key, store, midday, lane_threads
):
    """Fifty new players at once on a daily-users value not in Redis: one load of the value and its
    12,000 members (three SADDs of 5,000 at most), not one per request, and every player counted."""
    from counters import clock, periods, selectors
    from counters.models import CounterValue, UniqueMember

    key = make_key(("write",))
    counter = Counter.objects.get(app__slug="default", name="daily_active_users")
    live = selectors.counter_get(app_id=counter.app_id, name=counter.name)
    period = periods.window_at(live.period, live.time_zone, clock.now()).key
    CounterValue.objects.create(counter=counter, subject="", period=period, value=12_000)
    UniqueMember.objects.bulk_create(
        [UniqueMember(counter=counter, period=period, member=f"old-{i}") for i in range(12_000)]
    )
    redis_store.client().config_resetstat()

    async def main():
        calls = [
            _request("POST", "/api/v1/counter/daily_active_users/increment", key, orjson.dumps({"user_id": f"new-{i}"}))
            for i in range(50)
        ]
        calls.append(  # an old player again: already counted today
            _request("POST", "/api/v1/counter/daily_active_users/increment", key, b'{"user_id": "old-7"}')
        )
        return await asyncio.gather(*calls)

    replies = asyncio.run(main())
    assert [status for status, _, _ in replies] == [200] * 51
    assert sorted(int(body.split(b":")[-1][:-1]) for _, _, body in replies[:50]) == list(range(12_001, 12_051))
    assert 12_000 <= int(replies[50][2].split(b":")[-1][:-1]) <= 12_050  # counted before, not again
    # Redis counts the SADDs its scripts make: one per new player (the update script), and the one
    # load's three chunks. A load per request made 51 x 3 of them.
    assert redis_store.client().info("commandstats")["cmdstat_sadd"]["calls"] == 50 + 3
    assert store.scard(keyspace.members_key(counter.id, period)) == 12_050


@pytest.mark.django_db(transaction=True)
def test_a_read_of_names_read_before_follows_every_change_of_values_config_and_time(
    builtins, make_key, make_counter, settings, store, lane_threads, time_machine
):
    """GET /api/v1/counters keeps what its checks found for a names list read again
    (``fastlane.plans``). Still, each value is read at the moment of the request, and a value no
    longer in Redis, a new day, a temporary counter's end, a counter made private and a key switched
    off all apply to the very next read, as they do for a list read for the first time."""
    from counters.config import bump_generation
    from counters.models import ApiKey, App

    settings.COUNTER_CONFIG_CHECK_SECONDS = 0  # every request compares the config generation
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    key = make_key(("write", "data_view"))
    make_counter("event_kills", public=True, expires_at=start + timedelta(days=1))
    names = b"names=total_games_played,matches_running,event_kills"

    def read(as_key: str = key) -> tuple[int, dict]:
        query = names if as_key else names + b"&app=default"  # no key: the public counters of an app
        status, _, body = asyncio.run(_request("GET", "/api/v1/counters", as_key, query=query))
        return status, orjson.loads(body)

    def values(reply: dict) -> list:
        return [(c["name"], c["value"]) for c in reply["counters"]]

    def add(name: str, amount: int) -> None:
        status, _, _ = asyncio.run(
            _request("POST", f"/api/v1/counter/{name}/increment", key, orjson.dumps({"value": amount}))
        )
        assert status == 200

    assert values(read()[1]) == [("total_games_played", 0), ("matches_running", 0), ("event_kills", 0)]
    add("total_games_played", 5)
    add("event_kills", 2)
    assert values(read()[1]) == [("total_games_played", 5), ("matches_running", 0), ("event_kills", 2)]
    assert values(read("")[1]) == [("total_games_played", 5), ("matches_running", 0), ("event_kills", 2)]

    # Flushed, then gone from Redis (evicted, a restore): loaded back from PostgreSQL on the read.
    counters_flush()
    total = Counter.objects.get(app__slug="default", name="total_games_played")
    store.delete(keyspace.value_key(total.id, "2026-05-04", ""))
    assert values(read()[1])[0] == ("total_games_played", 5)

    # A new day: the daily counter's new period, the others as they were.
    time_machine.move_to(start + timedelta(hours=13), tick=False)
    assert values(read()[1]) == [("total_games_played", 0), ("matches_running", 0), ("event_kills", 2)]
    # The temporary counter's end.
    time_machine.move_to(start + timedelta(days=1), tick=False)
    status, reply = read()
    assert status == 404 and reply["error"]["code"] == 4004 and "event_kills" in reply["error"]["message"]
    names = b"names=total_games_played,matches_running"
    assert values(read()[1]) == [("total_games_played", 0), ("matches_running", 0)]

    # Made private: no longer read without a key; the app's key still reads it.
    add("matches_running", 3)
    assert values(read("")[1]) == [("total_games_played", 0), ("matches_running", 3)]
    Counter.objects.filter(name="matches_running").update(public=False)
    bump_generation()
    status, reply = read("")
    assert status == 401 and reply["error"]["code"] == 4003 and "matches_running" in reply["error"]["message"]
    assert values(read()[1]) == [("total_games_played", 0), ("matches_running", 3)]

    # The key switched off: refused at once.
    ApiKey.objects.filter(app=App.objects.get(slug="default")).update(active=False)
    bump_generation()
    status, reply = read()
    assert status == 401 and reply["error"] == {"code": 4003, "message": "The API key is not valid."}


@pytest.mark.django_db(transaction=True)
def test_an_update_sent_again_follows_every_change_of_config_and_time(
    builtins, make_key, make_counter, settings, store, lane_threads, time_machine
):
    """An increment or decrement sent again with the same key and body keeps what its checks found
    (``fastlane.plans.UpdatePlan``). Still, each is applied at its own moment: a new day, a temporary
    counter's end, a lower maximum, a key that may no longer write or is switched off, all apply to
    the very next update, as they do to one sent for the first time; an Idempotency-Key still replays."""
    from counters.config import bump_generation
    from counters.fastlane import plans
    from counters.models import ApiKey, App

    settings.COUNTER_CONFIG_CHECK_SECONDS = 0  # every request compares the config generation
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    key = make_key(("write", "data_view"))
    make_counter("event_kills", expires_at=start + timedelta(days=1), max_value=100)
    make_counter("player_games", scope="user")
    make_counter("wave_kills")

    def update(name: str, body: bytes, op: str = "increment", headers: tuple = ()) -> tuple[int, dict, dict]:
        status, reply_headers, reply = asyncio.run(
            _request("POST", f"/api/v1/counter/{name}/{op}", key, body, headers=headers)
        )
        return status, reply_headers, orjson.loads(reply)

    def value(name: str, body: bytes, op: str = "increment") -> int:
        status, _, reply = update(name, body, op)
        assert status == 200, reply
        return reply["current_value"]

    one, three = b'{"value":1}', b'{"value":3}'
    assert [value("total_games_played", one) for _ in range(4)] == [1, 2, 3, 4]
    assert [value("total_games_played", three) for _ in range(3)] == [7, 10, 13]
    assert [value("total_games_played", one, "decrement") for _ in range(3)] == [12, 11, 10]
    assert [value("event_kills", three) for _ in range(3)] == [3, 6, 9]
    # A per-player counter: each player's body is its own plan, and its own value.
    for player in ("p1", "p2"):
        body = orjson.dumps({"value": 2, "user_id": player})
        assert [value("player_games", body) for _ in range(3)] == [2, 4, 6]
    # The checks were kept (else this test would not try the kept ones at all).
    assert sum(plan is not None for plan in plans._update_plans.values()) == 6

    # A kept update whose script Redis lost (a restart), or whose value is no longer in Redis after a
    # flush (evicted, a restore), is applied as the first one was: loaded again, nothing lost.
    store.script_flush()
    assert value("total_games_played", one) == 11
    counters_flush()
    store.delete(keyspace.value_key(_counter_id("total_games_played"), "2026-05-04", ""))
    assert value("total_games_played", one, "decrement") == 10
    # A threshold crossed by a kept update fires once, as on the general path.
    threshold = Threshold.objects.create(counter_id=_counter_id("wave_kills"), value=5)
    bump_generation()
    assert [value("wave_kills", one) for _ in range(7)] == [1, 2, 3, 4, 5, 6, 7]
    counters_flush()
    assert [event.triggered_at for event in ThresholdEvent.objects.filter(threshold=threshold)] == [start]

    # An Idempotency-Key: checked and recorded every time, and replayed.
    keyed = ((b"idempotency-key", b"order-0001"),)
    status, _, reply = update("total_games_played", one, headers=keyed)
    assert (status, reply["current_value"]) == (200, 11)
    status, headers, reply = update("total_games_played", one, headers=keyed)
    assert (status, reply["current_value"], headers.get(b"idempotent-replayed")) == (200, 11, b"true")

    # A new day: the daily counter starts its new period, the temporary one goes on.
    time_machine.move_to(start + timedelta(hours=13), tick=False)
    assert value("total_games_played", one) == 1
    assert value("event_kills", three) == 12

    # A lower maximum: refused before it is reached, nothing changed.
    Counter.objects.filter(name="event_kills").update(max_value=14)
    bump_generation()
    status, _, reply = update("event_kills", three)
    assert (status, reply["error"]["code"]) == (409, 4005)
    assert [value("event_kills", one) for _ in range(2)] == [13, 14]

    # The temporary counter's end.
    time_machine.move_to(start + timedelta(days=1), tick=False)
    status, _, reply = update("event_kills", one)
    assert (status, reply["error"]["code"]) == (404, 4004) and "event_kills" in reply["error"]["message"]

    # The key may no longer write, then is switched off.
    ApiKey.objects.filter(app=App.objects.get(slug="default")).update(roles=["data_view"])
    bump_generation()
    status, _, reply = update("total_games_played", one)
    assert (status, reply["error"]["code"]) == (403, 4003)
    ApiKey.objects.filter(app=App.objects.get(slug="default")).update(active=False)
    bump_generation()
    status, _, reply = update("total_games_played", one)
    assert status == 401 and reply["error"] == {"code": 4003, "message": "The API key is not valid."}
    assert store.hget(keyspace.value_key(_counter_id("total_games_played"), "2026-05-05", ""), "v") == b"1"


@pytest.mark.django_db(transaction=True)
def test_a_cloud_function_body_sent_again_is_answered_as_the_first_time(builtins, make_key, lane_threads):
    """A cloud function's input found valid for a body is kept for that body sent again
    (``plans.function_input``: a DRF serializer per request was most of a function's CPU). The same
    bytes as another content type, a body that is not valid, a requestId that replays and metadata
    are still all checked as the first time."""
    from counters.fastlane import plans

    key = make_key(("write", "data_view"))
    increase = b'{"appId":"default","counterType":"daily","counterId":"total_games_played","increment":2}'
    get = b'{"appId":"default","counterType":"daily","counterId":"total_games_played"}'

    def call(name: str, body: bytes, headers: tuple = ()) -> tuple[int, dict, dict]:
        status, reply_headers, reply = asyncio.run(
            _request("POST", f"/api/v1/functions/{name}", key, body, headers=headers)
        )
        return status, reply_headers, orjson.loads(reply)

    for expected in (2, 4, 6):
        status, _, reply = call("increaseCounter", increase)
        assert (status, reply["data"]["oldValue"], reply["data"]["newValue"]) == (200, expected - 2, expected)
        status, _, reply = call("getCounter", get)
        assert (status, reply["data"]["currentValue"], reply["data"]["counterId"]) == (
            200,
            expected,
            "total_games_played",
        )
        assert reply["data"]["updateTime"].endswith("Z") and len(reply["data"]["updateTime"]) == 24
    assert len(plans._function_inputs) == 2  # both bodies were kept

    # The same bytes as another content type: refused, as the first time.
    status, _, reply = call("increaseCounter", increase, headers=((b"content-type", b"text/plain"),))
    assert (status, reply["code"]) == (415, 4001), reply
    # A body that is not valid is refused each time, and not kept.
    for _ in range(2):
        status, _, reply = call("increaseCounter", increase.replace(b'"increment":2', b'"increment":0'))
        assert (status, reply["code"]) == (400, 4001), reply
    # A requestId replays its first reply, however often the same body comes.
    keyed = increase.replace(b"}", b',"requestId":"order-0042"}')
    replies = [call("increaseCounter", keyed) for _ in range(3)]
    assert [r[2]["data"]["newValue"] for r in replies] == [8, 8, 8]
    assert [r[1].get(b"idempotent-replayed") for r in replies] == [None, b"true", b"true"]
    # Metadata is checked every time (its limit is a setting): not kept.
    with_metadata = increase.replace(b"}", b',"metadata":{"match":"m-1"}}')
    assert [call("increaseCounter", with_metadata)[2]["data"]["newValue"] for _ in range(2)] == [10, 12]
    assert len(plans._function_inputs) == 3  # the keyed body too; not the refused ones, nor metadata


@pytest.mark.django_db(transaction=True)
def test_a_cloud_function_update_sent_again_follows_every_change_of_config_and_time(
    builtins, make_key, make_counter, settings, lane_threads, time_machine
):
    """increaseCounter and decreaseCounter sent again by a key with the same body keep what their
    checks found (``plans.function_plan``: an update plan, as the REST endpoints keep). Still, each is
    applied and answered at its own moment: its old and new value and time, a threshold crossed once,
    the minimum, a key's right to go below it, a temporary counter's end and a key that may no longer
    write apply to the very next call, and a requestId replays."""
    from counters import clock
    from counters.config import bump_generation
    from counters.fastlane import plans
    from counters.models import ApiKey, App

    settings.COUNTER_CONFIG_CHECK_SECONDS = 0  # every request compares the config generation
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    key, manager = make_key(("write", "data_view")), make_key(("write", "counter_manage"))
    kills = make_counter("event_kills", expires_at=start + timedelta(minutes=5))
    Threshold.objects.create(counter_id=kills.id, value=3)
    bump_generation()

    def call(name: str, body: dict, as_key: str = key) -> tuple[int, dict, dict]:
        status, headers, reply = asyncio.run(_request("POST", f"/api/v1/functions/{name}", as_key, orjson.dumps(body)))
        return status, headers, orjson.loads(reply)

    target = {"appId": "default", "counterType": "app", "counterId": "event_kills"}
    crossed_at = clock.iso_ms(start + timedelta(seconds=3))
    for n in range(1, 6):
        at = start + timedelta(seconds=n)
        time_machine.move_to(at, tick=False)
        status, _, reply = call("increaseCounter", {**target, "increment": 1})
        assert (status, reply["code"], reply["timestamp"]) == (200, 0, clock.to_ms(at)), reply
        assert reply["data"] == {
            "counterId": "event_kills",
            "oldValue": n - 1,
            "newValue": n,
            "increment": 1,
            "updateTime": clock.iso_ms(at),
            "hitThreshold": n == 3,
            "thresholds": [{"value": 3, "triggered": n >= 3, "triggerTime": crossed_at if n >= 3 else None}],
        }
    # The checks were kept (else this test would not try the kept ones at all).
    assert sum(plan is not None for plan in plans._function_plans.values()) == 1

    # Below the minimum: refused, nothing changed, even asking for it without the right to; a key
    # that may manage may go below it.
    down = {**target, "decrement": 2, "allowNegative": True}
    for n in (3, 1, None, None):
        status, _, reply = call("decreaseCounter", down)
        if n is None:
            assert (status, reply["code"]) == (409, 4005), reply
        else:
            assert (status, reply["data"]["newValue"], reply["data"]["reachedMinimum"]) == (200, n, False)
    below = [call("decreaseCounter", {**down, "allowNegative": True}, manager)[2]["data"] for _ in range(3)]
    assert [(d["newValue"], d["reachedMinimum"]) for d in below] == [(-1, True), (-3, True), (-5, True)]

    # A requestId replays its first answer, however often it comes.
    keyed = {**target, "increment": 10, "requestId": "order-0007"}
    replies = [call("increaseCounter", keyed) for _ in range(3)]
    assert [r[2]["data"]["newValue"] for r in replies] == [5, 5, 5]
    assert [r[1].get(b"idempotent-replayed") for r in replies] == [None, b"true", b"true"]

    # The temporary counter's end, then a key that may no longer write (on a counter its calls
    # were kept for).
    plain = {"appId": "default", "counterType": "daily", "counterId": "total_games_played", "increment": 1}
    for n in (1, 2, 3):  # no thresholds: the plain OK the plan reads itself
        time_machine.move_to(start + timedelta(minutes=1, seconds=n), tick=False)
        status, _, reply = call("increaseCounter", plain)
        assert (status, reply["timestamp"]) == (200, clock.to_ms(start + timedelta(minutes=1, seconds=n)))
        assert reply["data"] == {
            "counterId": "total_games_played",
            "oldValue": n - 1,
            "newValue": n,
            "increment": 1,
            "updateTime": clock.iso_ms(start + timedelta(minutes=1, seconds=n)),
            "hitThreshold": False,
            "thresholds": [],
        }
    time_machine.move_to(start + timedelta(minutes=5), tick=False)
    status, _, reply = call("decreaseCounter", down, manager)  # as kept above
    assert (status, reply["code"]) == (404, 4004), reply
    ApiKey.objects.filter(app=App.objects.get(slug="default")).update(roles=["data_view"])
    bump_generation()
    status, _, reply = call("increaseCounter", plain)
    assert (status, reply["code"]) == (403, 4003), reply


@pytest.mark.django_db(transaction=True)
def test_a_get_counter_sent_again_reads_the_value_of_its_moment_and_follows_the_config(
    builtins, make_key, make_counter, settings, lane_threads, time_machine
):
    """getCounter sent again by a key with the same body keeps what its checks found (a value plan,
    ``plans.function_plan``): the value and its times are still read at the moment of each call,
    and a new day, a temporary counter's end and a key switched off apply to the very next call. A
    player token's calls are checked every time: it expires between two of them."""
    from counters import clock
    from counters.config import bump_generation
    from counters.fastlane import plans
    from counters.models import ApiKey, App

    settings.COUNTER_CONFIG_CHECK_SECONDS = 0  # every request compares the config generation
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    key = make_key(("write", "data_view"))
    make_counter("event_kills", expires_at=start + timedelta(days=2))
    make_counter("energy", scope="user")

    def call(name: str, body: dict, as_key: str = key) -> tuple[int, dict]:
        _, _, reply = asyncio.run(_request("POST", f"/api/v1/functions/{name}", as_key, orjson.dumps(body)))
        reply = orjson.loads(reply)
        return reply["code"], reply["data"]

    daily = {"appId": "default", "counterType": "daily", "counterId": "total_games_played"}
    for n in range(4):  # read before and after each change: the value of the moment
        code, data = call("getCounter", daily)
        assert (code, data["currentValue"]) == (0, n)
        assert data["updateTime"] == (clock.iso_ms(start + timedelta(seconds=n)) if n else None)
        assert data["lastResetTime"] == "2026-05-04T00:00:00.000Z"
        assert data["nextResetTime"] == "2026-05-05T00:00:00.000Z"
        time_machine.move_to(start + timedelta(seconds=n + 1), tick=False)
        assert call("increaseCounter", {**daily, "increment": 1})[0] == 0
    mine = {"appId": "default", "counterType": "user", "counterId": "energy", "playerId": "p1"}
    assert call("increaseCounter", {**mine, "increment": 5})[0] == 0
    assert [call("getCounter", mine)[1]["currentValue"] for _ in range(3)] == [5, 5, 5]
    kills = {"appId": "default", "counterType": "app", "counterId": "event_kills"}
    assert [call("getCounter", kills)[1]["currentValue"] for _ in range(3)] == [0, 0, 0]
    # The checks were kept (else this test would not try the kept ones at all).
    kept = [plan for plan in plans._function_plans.values() if isinstance(plan, plans.ValuePlan)]
    assert sorted(plan.counter.name for plan in kept) == ["energy", "event_kills", "total_games_played"]

    # A player token reads its own value; it expires between two calls of the same body.
    _, _, issued = asyncio.run(_request("POST", "/api/v1/player-tokens", key, b'{"player_id": "p1"}'))
    player = "Player " + orjson.loads(issued)["token"]
    own = {"appId": "default", "counterType": "user", "counterId": "energy"}
    assert [call("getCounter", own, player)[1]["currentValue"] for _ in range(3)] == [5, 5, 5]
    time_machine.move_to(start + timedelta(seconds=settings.COUNTER_PLAYER_TOKEN_SECONDS + 10), tick=False)
    assert call("getCounter", own, player) == (4003, None)

    # A new day (the daily counter's new period), then the temporary counter's end.
    time_machine.move_to(start + timedelta(days=1), tick=False)
    code, data = call("getCounter", daily)
    assert (code, data["currentValue"], data["lastResetTime"]) == (0, 0, "2026-05-05T00:00:00.000Z")
    time_machine.move_to(start + timedelta(days=2), tick=False)
    assert call("getCounter", kills) == (4004, None)
    # The key switched off.
    ApiKey.objects.filter(app=App.objects.get(slug="default")).update(active=False)
    bump_generation()
    assert call("getCounter", daily) == (4003, None)


@pytest.mark.django_db(transaction=True)
def test_a_cloud_function_answers_each_call_in_the_language_it_asks_for(builtins, make_key, lane_threads, settings):
    """The language a function's request asks for (Accept-Language, or the language cookie) and each
    view's message in it are kept (``handlers._function_language``, ``_success``); each call, the
    same body again and again, still gets its own language, errors included, and a change of the
    settings applies to the next call."""
    key = make_key(("write", "data_view"))
    get = b'{"appId":"default","counterType":"app","counterId":"total_games_played"}'
    missing = get.replace(b"total_games_played", b"nope")
    increase = get.replace(b"}", b',"increment":1}')

    def msg(name: str, body: bytes, *headers: tuple[bytes, bytes]) -> str:
        _, _, reply = asyncio.run(_request("POST", f"/api/v1/functions/{name}", key, body, headers=headers))
        return orjson.loads(reply)["msg"]

    zh_cn, zh_tw = (b"accept-language", b"zh-CN,zh;q=0.9"), (b"accept-language", b"zh-TW")
    cookie = (b"cookie", f"{settings.LANGUAGE_COOKIE_NAME}=zh-hant".encode())
    for _ in range(3):
        assert msg("getCounter", get, zh_cn) == "查询成功"
        assert msg("getCounter", get) == "Query succeeded"
        assert msg("getCounter", get, zh_tw) == "查詢成功"
        assert msg("getCounter", get, cookie) == "查詢成功"
        assert msg("increaseCounter", increase, zh_cn) == "增加成功"
        assert msg("increaseCounter", increase) == "Increased"
        assert "不存在" in msg("getCounter", missing, zh_cn)
        assert "not found" in msg("getCounter", missing)
    # The default language changed: a call that asks for none gets the new one.
    settings.LANGUAGE_CODE = "zh-hans"
    assert msg("getCounter", get) == "查询成功"
    assert msg("getCounter", get, (b"accept-language", b"en-US,en;q=0.8")) == "Query succeeded"


@pytest.mark.django_db(transaction=True)
def test_a_kept_update_sends_the_script_call_of_the_general_path_byte_for_byte(builtins, make_counter, time_machine):
    """An update plan packs its script call once per period window and puts only the moment in it per
    request (``UpdatePlan.call``). The bytes are those the general path sends at the same moment (the
    call of ``services._prepare_update``, packed by hiredis) for a plain counter, one with bounds and
    thresholds, one that counts unique users and a per-player one, within a minute, across minutes
    and into a new day; a counter that logs its operations (the moment is in its log entry) is not
    packed ahead."""
    import hiredis

    from counters import config, services
    from counters.fastlane import plans, store

    start = datetime(2026, 5, 4, 15, 59, 58, 999000, tzinfo=UTC)  # Taipei's midnight is at 16:00 UTC
    time_machine.move_to(start, tick=False)
    bounded = make_counter("event_kills", period="daily", time_zone="Asia/Taipei", max_value=100, min_value=-5)
    Threshold.objects.create(counter_id=bounded.id, value=50, cooldown_seconds=30, rearm=True)
    Threshold.objects.create(counter_id=bounded.id, value=-2, direction="down")
    cache = config.cache
    cache.invalidate()
    counters = cache.get().counters
    app = bounded.app_id
    updates = [
        (counters[(app, "total_games_played")], 1, "", ""),
        (counters[(app, "event_kills")], -3, "", ""),
        (counters[(app, "daily_active_users")], 1, "", "player-7"),
        (make_counter("player_games", scope="user"), 2, "p1", "p1"),
    ]
    key = type("Key", (), {"prefix": "ck_test"})()
    moments = [start, start + timedelta(milliseconds=1), start + timedelta(seconds=61), start + timedelta(hours=9)]
    for counter, amount, subject, user_id in updates:
        update = {"counter": counter, "amount": amount, "subject": subject, "user_id": user_id, "metadata": None}
        plan = plans.UpdatePlan(
            services._prepare_update(**update, actor=key.prefix, allow_negative=False, now=start),
            key=key,
            user_id=user_id,
            metadata=None,
        )
        windows = set()
        for now in moments:
            general = services._prepare_update(**update, actor=key.prefix, allow_negative=False, now=now)
            keys, args = services.update_call(general)
            command = ("EVALSHA", store._SHA["update"], len(keys), *keys, *args)
            assert plan.call(now) == (hiredis.pack_command(command), len(command)), (counter.name, now)
            windows.add(general.window.key)
        assert len(windows) == (2 if counter.period == "daily" else 1), counter.name
    assert len(counters[(app, "event_kills")].thresholds) == 2
    logged = make_counter("audited_kills", log_operations=True)
    plan = plans.UpdatePlan(
        services._prepare_update(
            counter=logged, amount=1, subject="", user_id="", actor="ck", metadata=None, allow_negative=False, now=start
        ),
        key=key,
        user_id="",
        metadata=None,
    )
    assert plan.call(start) is None


@pytest.mark.django_db(transaction=True)
def test_a_login_sent_again_follows_every_change_of_config_and_time(
    builtins, make_key, make_counter, settings, store, lane_threads, time_machine
):
    """Logins and logouts sent with the same key keep what their checks before the body found
    (``fastlane.plans.LoginPlan``: each login names a user of its own). Still, every body is checked
    as the first one was and one refused changes nothing, each lease opens at its own moment and
    lapses with the clock, a script Redis lost or a value no longer in Redis is loaded again, and a
    temporary counter's end and a key that may no longer write apply to the very next login."""
    from counters.config import bump_generation
    from counters.fastlane import plans
    from counters.models import ApiKey, App

    settings.COUNTER_CONFIG_CHECK_SECONDS = 0  # every request compares the config generation
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    key, other = make_key(("write", "data_view")), make_key(("write",))
    make_counter("lobby", kind="presence", presence_counts="sessions", expires_at=start + timedelta(minutes=5))
    make_counter("audited_lobby", kind="presence", log_operations=True)

    def update(name: str, body: bytes, op: str = "increment", as_key: str = key, headers: tuple = ()):
        return asyncio.run(_request("POST", f"/api/v1/counter/{name}/{op}", as_key, body, headers=headers))

    def count(name: str, body: bytes, op: str = "increment") -> int:
        status, _, reply = update(name, body, op)
        assert status == 200, reply
        return orjson.loads(reply)["current_value"]

    def login(user: str, **more) -> bytes:
        return orjson.dumps({"user_id": user, **more})

    assert [count("online_players", login(f"u{i}")) for i in range(5)] == [1, 2, 3, 4, 5]
    # Counting users: another session of a user counted already, or the same login again, adds none.
    assert count("online_players", login("u0", session_id="s2")) == count("online_players", login("u0")) == 5
    assert count("online_players", login("u9", session_id="s1", node_id="eu-7")) == 6
    assert [count("lobby", login("u1", session_id=f"s{i}")) for i in range(3)] == [1, 2, 3]  # sessions
    # A counter that logs its operations: each entry with its user and metadata, as given.
    for user in ("u1", "u2", "u3"):
        assert count("audited_lobby", login(user, metadata={"map": f"dust-{user}"})) == int(user[1])
    # The checks were kept (else this test would not try the kept ones at all): one plan a counter.
    kept = sorted(p.counter.name for p in plans._login_plans.values() if p is not None)
    assert kept == ["audited_lobby", "lobby", "online_players"]
    counters_flush()
    entries = OperationLog.objects.filter(counter_id=_counter_id("audited_lobby")).order_by("new_value")
    assert [(e.user_id, e.metadata, e.new_value) for e in entries] == [
        (f"u{i}", {"map": f"dust-u{i}"}, i) for i in (1, 2, 3)
    ]

    # A body refused on a kept plan: the reply the first request of another key gets, nothing changed.
    for body in (b"", b"{}", login("u7", value=2), login("u7", node_id=""), login("u" * 200), b"[1]", b"{"):
        kept, first = update("online_players", body), update("online_players", body, as_key=other)
        assert kept[0] >= 400 and (kept[0], kept[2]) == (first[0], first[2]), body
    assert count("online_players", login("u0")) == 6

    # A logout, a login with metadata (checked every time), by the kept checks too.
    assert count("online_players", login("u1"), "decrement") == 5
    assert count("online_players", login("u20", metadata={"map": "dust"})) == 6
    # A script Redis lost (a restart), a value no longer in Redis after a flush (evicted, a
    # restore): the login is applied as the first one was, the leases counted as they stand.
    store.script_flush()
    assert count("online_players", login("u21")) == 7
    counters_flush()
    store.delete(keyspace.value_key(_counter_id("online_players"), "", ""))
    assert count("online_players", login("u22")) == 8
    # Each lease opens at its login's own moment: those of a minute ago lapse first.
    time_machine.move_to(start + timedelta(seconds=60), tick=False)
    assert count("online_players", login("u23")) == 9
    time_machine.move_to(start + timedelta(seconds=91), tick=False)
    assert count("online_players", login("u24")) == 2  # u23 and u24: u9 lapsed with its node
    # An Idempotency-Key is not taken by a presence counter, but a malformed one is still refused.
    status, _, reply = update("online_players", login("u25"), headers=((b"idempotency-key", b"\x01"),))
    assert (status, orjson.loads(reply)["error"]["code"]) == (400, 4001)

    # The temporary counter's end.
    time_machine.move_to(start + timedelta(minutes=5), tick=False)
    status, _, reply = update("lobby", login("u1", session_id="s9"))
    assert (status, orjson.loads(reply)["error"]["code"]) == (404, 4004)
    # The key may no longer write.
    ApiKey.objects.filter(app=App.objects.get(slug="default")).update(roles=["data_view"])
    bump_generation()
    status, _, reply = update("online_players", login("u26"))
    assert (status, orjson.loads(reply)["error"]["code"]) == (403, 4003)


@pytest.mark.django_db(transaction=True)
def test_a_kept_login_sends_the_script_call_of_the_general_path_byte_for_byte(builtins, make_counter, time_machine):
    """A login plan packs its script call once per period window and puts only the moment and the
    lease in it per request (``LoginPlan.call``). The bytes are those the general path sends at the
    same moment (``presence.presence_prepare``'s call, packed by hiredis), for logins and logouts of
    a counter of users and of a daily one of sessions with thresholds, with and without a session
    and a node, across minutes and into a new day; a counter that logs its operations is not
    packed ahead."""
    import hiredis

    from counters import config, presence
    from counters.fastlane import plans, store

    start = datetime(2026, 5, 4, 15, 59, 58, 999000, tzinfo=UTC)  # Taipei's midnight is at 16:00 UTC
    time_machine.move_to(start, tick=False)
    sessions = make_counter(
        "lobby", kind="presence", presence_counts="sessions", period="daily", time_zone="Asia/Taipei", lease_seconds=300
    )
    Threshold.objects.create(counter_id=sessions.id, value=50, cooldown_seconds=30, rearm=True)
    config.cache.invalidate()
    counters = config.cache.get().counters
    key = type("Key", (), {"prefix": "ck_test"})()
    leases = [presence.Lease("u1"), presence.Lease("玩家-2", "s1"), presence.Lease("u3", "s2", "eu-7")]
    moments = [start, start + timedelta(milliseconds=1), start + timedelta(seconds=61), start + timedelta(hours=9)]
    for name in ("online_players", "lobby"):
        counter = counters[(sessions.app_id, name)]
        for op in (presence.LOGIN, presence.LOGOUT):
            plan, windows = plans.LoginPlan(key, counter, op), set()
            for now in moments:
                time_machine.move_to(now, tick=False)
                for lease in leases:
                    general = presence.presence_prepare(counter=counter, op=op, leases=[lease], actor=key.prefix)
                    command = ("EVALSHA", store._SHA["presence"], len(general.keys), *general.keys, *general.args)
                    assert plan.call(now, lease) == (hiredis.pack_command(command), len(command)), (name, now)
                windows.add(general.window.key)
            assert len(windows) == (2 if name == "lobby" else 1)
    assert len(counters[(sessions.app_id, "lobby")].thresholds) == 1
    logged = make_counter("audited_lobby", kind="presence", log_operations=True)
    assert plans.LoginPlan(key, logged, presence.LOGIN).call(start, leases[0]) is None


@pytest.mark.django_db(transaction=True)
def test_a_read_of_one_counter_read_again_follows_every_change_of_values_config_and_time(
    builtins, make_key, make_counter, settings, store, lane_threads, time_machine
):
    """GET /api/v1/counter/<name> read again with the same key and query keeps what its checks found
    (``fastlane.plans.ValuePlan``). Still, the value is read at the moment of the request, and a value
    no longer in Redis, a new day, a temporary counter's end, a counter made private and a key
    switched off apply to the very next read, as they do to one read for the first time."""
    from counters.config import bump_generation
    from counters.fastlane import plans
    from counters.models import ApiKey, App

    settings.COUNTER_CONFIG_CHECK_SECONDS = 0  # every request compares the config generation
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    key = make_key(("write", "data_view"))
    make_counter("event_kills", public=True, expires_at=start + timedelta(days=1))
    make_counter("player_games", scope="user")

    def read(name: str, query: bytes = b"", as_key: str = key) -> tuple[int, dict]:
        status, _, body = asyncio.run(_request("GET", f"/api/v1/counter/{name}", as_key, query=query))
        return status, orjson.loads(body)

    def value(name: str, query: bytes = b"", as_key: str = key) -> int:
        status, reply = read(name, query, as_key)
        assert status == 200, reply
        return reply["value"]

    def add(name: str, amount: int, user_id: str = "") -> None:
        body = orjson.dumps({"value": amount, **({"user_id": user_id} if user_id else {})})
        status, _, _ = asyncio.run(_request("POST", f"/api/v1/counter/{name}/increment", key, body))
        assert status == 200

    public = b"app=default"
    for amount in (1, 2, 3):  # read before and after each change: the value of the moment
        assert (value("total_games_played"), value("event_kills", public, "")) == (amount - 1, 2 * (amount - 1))
        add("total_games_played", 1)
        add("event_kills", 2)
    for player, amount in (("p1", 5), ("p2", 7)):
        add("player_games", amount, player)
        assert [value("player_games", b"user_id=" + player.encode()) for _ in range(3)] == [amount] * 3
    reply = read("total_games_played")[1]
    assert reply["last_updated"] == "2026-05-04T12:00:00Z" and reply["next_reset"].startswith("2026-05-0")
    # The checks were kept (else this test would not try the kept ones at all).
    assert sum(plan is not None for plan in plans._value_plans.values()) == 4

    # Flushed, then gone from Redis (evicted, a restore): loaded back from PostgreSQL on the read.
    counters_flush()
    store.delete(keyspace.value_key(_counter_id("total_games_played"), "2026-05-04", ""))
    assert value("total_games_played") == 3

    # A new day: the daily counter's new period, the others as they were.
    time_machine.move_to(start + timedelta(hours=13), tick=False)
    assert (value("total_games_played"), value("event_kills", public, "")) == (0, 6)
    # The temporary counter's end.
    time_machine.move_to(start + timedelta(days=1), tick=False)
    status, reply = read("event_kills", public, "")
    assert status == 404 and reply["error"]["code"] == 4004 and "event_kills" in reply["error"]["message"]

    # Made private: no longer read without a key; the app's key still reads it.
    assert value("matches_running", public, "") == value("matches_running", public, "") == 0
    Counter.objects.filter(name="matches_running").update(public=False)
    bump_generation()
    status, reply = read("matches_running", public, "")
    assert status == 401 and reply["error"]["code"] == 4003 and "matches_running" in reply["error"]["message"]
    assert value("matches_running") == value("matches_running") == 0

    # The key switched off: refused at once.
    ApiKey.objects.filter(app=App.objects.get(slug="default")).update(active=False)
    bump_generation()
    status, reply = read("matches_running")
    assert status == 401 and reply["error"] == {"code": 4003, "message": "The API key is not valid."}


def _counter_id(name: str) -> int:
    return Counter.objects.get(app__slug="default", name=name).id
