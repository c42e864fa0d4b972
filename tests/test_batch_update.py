"""POST /api/v1/counters/batch: many updates in one request, checked whole, applied in one round trip."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from django.test import Client, override_settings

from counters import clock, keyspace
from counters.flush import counters_flush
from counters.models import App, Counter, CounterValue, OperationLog, Threshold, ThresholdEvent, UniqueMember
from counters.periods import window_at
from counters.serializers import BATCH_UPDATE_LIMIT

from .http import post

pytestmark = pytest.mark.usefixtures("midday")  # daily counters on a pinned clock

URL = "/api/v1/counters/batch"


def value(client: Client, name: str) -> int:
    return client.get(f"/api/v1/counter/{name}").json()["value"]


@pytest.mark.django_db
def test_a_batch_updates_several_counters_in_order_and_reaches_postgresql(client, writer):
    updates = [
        {"name": "matches_running", "op": "increment", "value": 5},
        {"name": "daily_active_users", "user_id": "u1"},
        {"name": "daily_active_users", "user_id": "u2"},
        {"name": "daily_active_users", "user_id": "u1"},
        {"name": "matches_running", "op": "decrement", "value": 2, "user_id": "u1"},
        {"name": "total_games_played", "value": 3, "metadata": {"song": "x"}},
    ]
    r = post(client, URL, {"updates": updates}, writer)
    assert r.status_code == 200, r.content
    assert r.json() == {
        "success": True,
        "results": [
            {"name": "matches_running", "success": True, "current_value": 5},
            {"name": "daily_active_users", "success": True, "current_value": 1},
            {"name": "daily_active_users", "success": True, "current_value": 2},
            {"name": "daily_active_users", "success": True, "current_value": 2},
            {"name": "matches_running", "success": True, "current_value": 3},
            {"name": "total_games_played", "success": True, "current_value": 3},
        ],
    }
    assert [value(client, n) for n in ("matches_running", "daily_active_users", "total_games_played")] == [3, 2, 3]
    counters_flush()
    rows = dict(CounterValue.objects.values_list("counter__name", "value"))
    assert rows == {"matches_running": 3, "daily_active_users": 2, "total_games_played": 3}
    assert sorted(UniqueMember.objects.values_list("member", flat=True)) == ["u1", "u2"]


@pytest.mark.django_db
def test_bounds_are_refused_per_item_and_the_rest_applies(client, writer):
    post(client, URL, {"updates": [{"name": "matches_running", "value": 2}]}, writer)
    updates = [
        {"name": "matches_running", "op": "decrement", "value": 5},
        {"name": "matches_running", "value": 1},
        {"name": "matches_running", "op": "decrement", "value": 3},
        {"name": "matches_running", "op": "decrement"},
    ]
    body = post(client, URL, {"updates": updates}, writer).json()
    assert [item["success"] for item in body["results"]] == [False, True, True, False]
    assert [item.get("current_value") for item in body["results"]] == [None, 3, 0, None]
    assert body["results"][0]["error"]["code"] == 4005 and "below 0" in body["results"][0]["error"]["message"]
    assert body["results"][3]["error"]["code"] == 4005
    assert value(client, "matches_running") == 0
    counters_flush()
    assert CounterValue.objects.get(counter__name="matches_running").value == 0


BAD_BATCHES = [
    ("not json", '{"updates": [', 400, 4001),
    ("a list", "[]", 400, 4001),
    ("no updates", "{}", 400, 4001),
    ("updates not a list", '{"updates": {"name": "matches_running"}}', 400, 4001),
    ("empty", '{"updates": []}', 400, 4001),
    ("too many", json.dumps({"updates": [{"name": "matches_running"}] * (BATCH_UPDATE_LIMIT + 1)}), 400, 4001),
    ("unknown top field", '{"updates": [{"name": "matches_running"}], "x": 1}', 400, 4001),
    ("item not an object", '{"updates": [{"name": "matches_running"}, 3]}', 400, 4001),
    (
        "unknown item field",
        '{"updates": [{"name": "matches_running"}, {"name": "matches_running", "v": 1}]}',
        400,
        4001,
    ),
    ("bad name", '{"updates": [{"name": "matches_running"}, {"name": "b$d"}]}', 400, 4001),
    ("bad op", '{"updates": [{"name": "matches_running"}, {"name": "matches_running", "op": "set"}]}', 400, 4001),
    ("zero", '{"updates": [{"name": "matches_running"}, {"name": "matches_running", "value": 0}]}', 400, 4001),
    ("float", '{"updates": [{"name": "matches_running"}, {"name": "matches_running", "value": 1.5}]}', 400, 4001),
    ("bool", '{"updates": [{"name": "matches_running"}, {"name": "matches_running", "value": true}]}', 400, 4001),
    ("over the safe range", '{"updates": [{"name": "matches_running", "value": 9007199254740992}]}', 400, 4001),
    ("bad user id", '{"updates": [{"name": "matches_running"}, {"name": "x", "user_id": "a b"}]}', 400, 4001),
    ("metadata list", '{"updates": [{"name": "matches_running", "metadata": [1]}]}', 400, 4001),
    ("unknown counter", '{"updates": [{"name": "matches_running"}, {"name": "nope"}]}', 404, 4004),
    (
        "unique counter decremented",
        '{"updates": [{"name": "matches_running"}, {"name": "daily_active_users", "op": "decrement", "user_id": "u"}]}',
        409,
        4001,
    ),
    ("empty user id", '{"updates": [{"name": "matches_running", "user_id": ""}]}', 400, 4001),
    ("null metadata", '{"updates": [{"name": "matches_running", "metadata": null}]}', 400, 4001),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_BATCHES, ids=[c[0] for c in BAD_BATCHES])
def test_a_bad_item_refuses_the_whole_request_and_changes_nothing(client, writer, case, body, status, code):
    post(client, URL, {"updates": [{"name": "matches_running", "value": 3}]}, writer)
    r = post(client, URL, body, writer, raw=True)
    assert r.status_code == status, r.content
    assert r.json()["success"] is False and r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert value(client, "matches_running") == 3


@pytest.mark.django_db
def test_keys_and_permissions_are_checked_for_every_item_before_anything_applies(client, builtins, make_key):
    other = App.objects.create(slug="other")
    Counter.objects.create(app=other, name="secret_gold")
    global_app = App.objects.get(slug="global")
    Counter.objects.create(app=global_app, name="world_boss_kills", scope="global", public=True)
    writer = {"HTTP_X_API_KEY": make_key(("write",))}
    reader = {"HTTP_X_API_KEY": make_key(("data_view",))}
    first = {"name": "matches_running", "value": 4}
    cases = [
        (post(client, URL, {"updates": [first]}), 401, 4003),
        (post(client, URL, {"updates": [first]}, {"HTTP_X_API_KEY": "wrong"}), 401, 4003),
        (post(client, URL, {"updates": [first]}, reader), 403, 4003),
        (post(client, URL, {"updates": [first, {"name": "world_boss_kills"}]}, writer), 403, 4003),
        (post(client, URL, {"updates": [first, {"name": "secret_gold"}]}, writer), 404, 4004),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.content
        assert response.json()["error"]["code"] == code
    assert "updates[1]" in cases[3][0].json()["error"]["message"]
    assert "secret_gold" in cases[4][0].json()["error"]["message"]
    assert value(client, "matches_running") == 0
    admin = {"HTTP_X_API_KEY": make_key(("write", "global_admin"))}
    r = post(client, URL, {"updates": [first, {"name": "world_boss_kills", "value": 2}]}, admin)
    assert [item["current_value"] for item in r.json()["results"]] == [4, 2]
    assert value(client, "world_boss_kills") == 2


@pytest.mark.django_db
def test_cold_values_are_hydrated_from_postgresql(client, writer, store):
    counter = Counter.objects.get(name="matches_running")
    CounterValue.objects.create(counter=counter, subject="", period="", value=40, peak=40)
    store.flushdb()
    updates = [{"name": "matches_running", "value": 2}, {"name": "total_games_played"}, {"name": "matches_running"}]
    body = post(client, URL, {"updates": updates}, writer).json()
    assert [item["current_value"] for item in body["results"]] == [42, 1, 43]
    counters_flush()
    assert CounterValue.objects.get(counter=counter).value == 43


@pytest.mark.django_db
def test_a_redis_without_the_script_loaded_is_served(client, writer, private_redis, settings, store):
    caches = {"default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    with override_settings(CACHES=caches):
        updates = [{"name": "matches_running", "value": 2}] * 3
        body = post(client, URL, {"updates": updates}, writer).json()
        assert [item["current_value"] for item in body["results"]] == [2, 4, 6]
        assert value(client, "matches_running") == 6
    assert redis.Redis.from_url(private_redis.url).keys("cs:{c*")
    assert not store.keys("cs:{c*")


@pytest.mark.django_db(transaction=True)
def test_concurrent_batches_are_exact(live_server, builtins, make_key):
    key = make_key(("write",))
    threads, per_thread = 8, 10

    def worker(thread: int) -> list[int]:
        codes = []
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {key}"
            for request in range(per_thread):
                updates = [{"name": "total_games_played"}] * 50
                updates += [{"name": "daily_active_users", "user_id": f"t{thread}-{request}-{i}"} for i in range(40)]
                updates += [{"name": "daily_active_users", "user_id": "everyone"}] * 5
                updates += [{"name": "matches_running", "value": 3}, {"name": "matches_running", "op": "decrement"}] * 2
                updates.append({"name": "matches_running", "op": "decrement", "value": 10**6})
                r = session.post(f"{live_server.url}{URL}", json={"updates": updates}, timeout=30)
                codes.append(r.status_code)
                assert sum(not item["success"] for item in r.json()["results"]) == 1
        return codes

    with ThreadPoolExecutor(max_workers=threads) as pool:
        codes = [code for codes in pool.map(worker, range(threads)) for code in codes]
    assert codes == [200] * threads * per_thread
    requests_made = threads * per_thread
    expected = {
        "total_games_played": 50 * requests_made,
        "daily_active_users": 40 * requests_made + 1,
        "matches_running": 4 * requests_made,
    }
    for name, count in expected.items():
        assert requests.get(f"{live_server.url}/api/v1/counter/{name}").json()["value"] == count
    counters_flush()
    assert dict(CounterValue.objects.values_list("counter__name", "value")) == expected
    assert UniqueMember.objects.count() == 40 * requests_made + 1


SEQUENCES = {
    # An app counter with bounds, thresholds both ways (one re-arming, one with a cooldown) and an
    # operation log: refusals included.
    "bounded": (
        {"max_value": 10, "log_operations": True},
        [("up", 5, {"rearm": True}), ("down", 2, {"cooldown_seconds": 3600}), ("up", 9, {})],
        [(4, ""), (3, ""), (5, ""), (-6, ""), (-2, ""), (-1, ""), (8, ""), (1, ""), (-9, ""), (1, "")],
    ),
    # A per-player daily counter: several players interleaved, one already in PostgreSQL (cold).
    "per player": (
        {"scope": "user", "period": "daily", "log_operations": True},
        [("up", 3, {})],
        [(1, "p1"), (2, "p2"), (1, "cold"), (2, "p1"), (-1, "p2"), (1, "p2"), (3, "cold"), (1, "p1")],
    ),
    # Unique members: a repeated player changes nothing.
    "unique": ({"unique_members": True}, [("up", 2, {})], [(1, "a"), (1, "b"), (1, "a"), (1, "c"), (1, "b")]),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", SEQUENCES)
def test_a_batch_does_exactly_what_the_same_updates_one_by_one_do(client, writer, store, case):
    """The batch script runs UPDATE_SCRIPT's logic per item: replies, values, log and events match.

    One difference is by design: a batch's items share the request's time, so a re-arming
    threshold that fires twice within one batch is one event (here: "up 5" fires, re-arms and
    fires again); which thresholds fired, and the marks left in Redis, are the same.
    """
    config, thresholds, steps = SEQUENCES[case]
    app = App.objects.get(slug="default")
    pair = [Counter.objects.create(app=app, name=name, public=True, **config) for name in ("one_by_one", "batched")]
    for counter in pair:
        for direction, at, options in thresholds:
            Threshold.objects.create(counter=counter, value=at, direction=direction, **options)
        if config.get("scope") == "user":
            period = window_at("daily", counter.effective_time_zone, clock.now()).key
            CounterValue.objects.create(counter=counter, subject="cold", period=period, value=7, peak=7)

    def item(amount: int, user_id: str) -> dict:
        body = {"value": abs(amount), **({"user_id": user_id} if user_id else {})}
        return {"op": "increment" if amount > 0 else "decrement", **body}

    singles = []
    for amount, user_id in steps:
        body = item(amount, user_id)
        r = client.post(
            f"/api/v1/counter/one_by_one/{body.pop('op')}", json.dumps(body), content_type="application/json", **writer
        )
        reply = r.json()
        singles.append(reply.get("current_value", reply.get("error", {}).get("code")))
    r = post(client, URL, {"updates": [{"name": "batched", **item(a, u)} for a, u in steps]}, writer)
    assert r.status_code == 200, r.content
    batched = [i.get("current_value", i.get("error", {}).get("code")) for i in r.json()["results"]]
    assert batched == singles
    assert 4005 in singles or case != "bounded"

    counters_flush()

    def durable(counter: Counter) -> tuple:
        values = sorted(
            CounterValue.objects.filter(counter=counter).values_list("subject", "value", "peak", "operations")
        )
        log = list(
            OperationLog.objects.filter(counter=counter).order_by("id").values_list("subject", "old_value", "new_value")
        )
        events = sorted(set(ThresholdEvent.objects.filter(counter=counter).values_list("threshold__value", "subject")))
        members = sorted(UniqueMember.objects.filter(counter=counter).values_list("member", flat=True))
        value_of = {str(t.id).encode(): t.value for t in Threshold.objects.filter(counter=counter)}
        marks = sorted(
            (key.rsplit(b":", 1)[1], value_of[field])  # (subject, threshold) marked as fired
            for key in store.keys(keyspace.threshold_marks_key(counter.id, "*", "*"))
            for field in store.hkeys(key)
        )
        return values, log, events, members, marks

    one_by_one, batch = durable(pair[0]), durable(pair[1])
    assert batch == one_by_one
    assert one_by_one[2] and (one_by_one[1] or case == "unique")


@pytest.mark.django_db
def test_the_largest_valid_batch_is_accepted(client, writer):
    """1,000 updates with metadata of almost the allowed size: more than Django's default 2.5 MB body."""
    metadata = {"note": "x" * 3000}
    body = json.dumps({"updates": [{"name": "total_games_played", "metadata": metadata}] * BATCH_UPDATE_LIMIT})
    assert len(body) > 2_621_440
    r = post(client, URL, body, writer, raw=True)
    assert r.status_code == 200, r.content[:300]
    assert r.json()["results"][-1]["current_value"] == BATCH_UPDATE_LIMIT
