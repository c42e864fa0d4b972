"""Idempotency-Key on every write (REST v1, batch, cloud functions): a retry with the same key answers
the first reply byte for byte and changes nothing; the same key with another body is a 409; bad keys
are a 400 in the one error shape. Real Redis and PostgreSQL, through Django's test client."""

import json

import pytest
from django.test import Client

from archive.models import ResetLog
from counters import keyspace
from counters.flush import counters_flush
from counters.models import App, Counter
from counters.redis_store import breaker

from .http import post

pytestmark = pytest.mark.django_db

INC = "/api/v1/counter/matches_running/increment"
KEY = "3f6c1a52-0d4e-4b8e-9a57-0c1d2e3f4a5b"


def keyed(headers: dict, key: str = KEY) -> dict:
    return {**headers, "HTTP_IDEMPOTENCY_KEY": key}


def value(client: Client, name: str = "matches_running") -> int:
    return client.get(f"/api/v1/counter/{name}").json()["value"]


def fn(client: Client, name: str, body: dict, headers: dict):
    return post(client, f"/api/v1/functions/{name}", body, headers)


def test_a_retry_with_the_same_key_answers_the_first_reply_and_changes_nothing(client, writer):
    post(client, INC, {"value": 5}, writer)
    first = post(client, INC, {"value": 2, "metadata": {"match": 7}}, keyed(writer))
    assert first.status_code == 200 and first.json() == {"success": True, "current_value": 7}
    assert "Idempotent-Replayed" not in first.headers
    post(client, INC, {}, writer)  # another client moves the counter meanwhile

    # The same body spelled differently (key order, whitespace) is the same request.
    again = post(client, INC, '{ "metadata": {"match": 7}, "value": 2 }', keyed(writer), raw=True)
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert value(client) == 8


def test_the_same_key_with_another_body_is_a_conflict_and_changes_nothing(client, writer):
    assert post(client, INC, {"value": 2}, keyed(writer)).status_code == 200
    for body in ({"value": 3}, {}, {"value": 2, "metadata": {"a": 1}}):
        reply = post(client, INC, body, keyed(writer))
        assert reply.status_code == 409, reply.content
        assert reply.json()["success"] is False and reply.json()["error"]["code"] == 4001
        assert "Idempotency-Key" in reply.json()["error"]["message"]
    # Another endpoint with the same key is another request too.
    reply = post(client, "/api/v1/counter/matches_running/decrement", {"value": 2}, keyed(writer))
    assert reply.status_code == 409
    assert value(client) == 2


BAD_KEYS = [
    ("empty", ""),
    ("too short", "abc1234"),
    ("too long", "k" * 256),
    ("space", "key with spaces"),
    ("brace", "{c1}abcdefgh"),
    ("pipe", "abcdefgh|ijk"),
    ("non-ascii", "clé-unique-12345"),
    ("newline", "abcdefgh\nijk"),
]


@pytest.mark.parametrize(("case", "bad"), BAD_KEYS, ids=[c for c, _ in BAD_KEYS])
def test_every_bad_key_is_a_400_with_the_one_error_shape_and_changes_nothing(client, writer, store, case, bad):
    post(client, INC, {}, writer)
    before = sorted(store.keys("*"))
    headers = {**writer, "HTTP_IDEMPOTENCY_KEY": bad}
    replies = [
        post(client, INC, {}, headers),
        post(client, "/api/v1/counter/matches_running/decrement", {}, headers),
        post(client, "/api/v1/counter/matches_running/reset", {"reason": "x"}, headers),
        post(client, "/api/v1/counters/batch", {"updates": [{"name": "matches_running", "id": bad}]}, writer),
    ]
    for reply in replies:
        assert reply.status_code == 400, (case, reply.content)
        assert reply.json() == {"success": False, "error": {"code": 4001, "message": reply.json()["error"]["message"]}}
        assert "Idempotency-Key" in reply.json()["error"]["message"] or ".id" in reply.json()["error"]["message"]
    target = {"appId": "default", "counterType": "app", "counterId": "matches_running"}
    for body, extra in (({**target, "requestId": bad}, {}), (target, {"HTTP_IDEMPOTENCY_KEY": bad})):
        reply = fn(client, "increaseCounter", body, {**writer, **extra})
        assert reply.status_code == 400, (case, reply.content)
        assert reply.json()["code"] == 4001 and reply.json()["data"] is None
    assert value(client) == 1
    assert sorted(store.keys("*")) == before


def test_a_request_id_that_is_not_a_string_or_disagrees_with_the_header_is_refused(client, writer):
    target = {"appId": "default", "counterType": "app", "counterId": "matches_running"}
    for body, extra in (
        ({**target, "requestId": 12345678}, {}),
        ({**target, "requestId": KEY}, {"HTTP_IDEMPOTENCY_KEY": KEY + "-other"}),
    ):
        reply = fn(client, "increaseCounter", body, {**writer, **extra})
        assert reply.status_code == 400, reply.content
        assert reply.json()["code"] == 4001
    assert value(client) == 0


def test_keys_are_per_app_even_on_a_shared_global_counter(client, builtins, make_key):
    global_app = App.objects.get(slug="global")
    Counter.objects.create(app=global_app, name="world_boss_hits", scope="global")
    other = App.objects.create(slug="other", name="Other")
    first = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'global_admin'))}"}
    second = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'global_admin'), app=other.slug)}"}
    url = "/api/v1/counter/world_boss_hits/increment"
    assert post(client, url, {}, keyed(first)).json()["current_value"] == 1
    reply = post(client, url, {}, keyed(second))
    assert reply.json()["current_value"] == 2 and "Idempotent-Replayed" not in reply.headers
    assert post(client, url, {}, keyed(first)).json()["current_value"] == 1


def test_the_key_lives_24_hours_by_default(client, writer, store):
    post(client, INC, {}, keyed(writer))
    counter = Counter.objects.get(name="matches_running")
    record = keyspace.idempotency_key(counter.id, counter.app_id, KEY)
    assert 23 * 3600 * 1000 < store.pttl(record) <= 24 * 3600 * 1000


def test_the_lifetime_is_a_setting(client, writer, store, settings):
    settings.COUNTER_IDEMPOTENCY_KEY_SECONDS = 60
    post(client, INC, {}, keyed(writer))
    counter = Counter.objects.get(name="matches_running")
    assert 0 < store.pttl(keyspace.idempotency_key(counter.id, counter.app_id, KEY)) <= 60_000
    # Once the record is gone (expired), the key is new again.
    store.delete(keyspace.idempotency_key(counter.id, counter.app_id, KEY))
    assert post(client, INC, {}, keyed(writer)).json()["current_value"] == 2


def test_decrement_and_a_refusal_replay_too(client, writer):
    post(client, INC, {"value": 3}, writer)
    dec = "/api/v1/counter/matches_running/decrement"
    first = post(client, dec, {"value": 1}, keyed(writer, "dec-00000001"))
    assert post(client, dec, {"value": 1}, keyed(writer, "dec-00000001")).content == first.content
    refused = post(client, dec, {"value": 10}, keyed(writer, "dec-00000002"))
    assert refused.status_code == 409 and refused.json()["error"]["code"] == 4005
    post(client, INC, {"value": 20}, writer)
    # The retry answers what the first attempt got: a key names one attempt's outcome, as Stripe's do.
    again = post(client, dec, {"value": 10}, keyed(writer, "dec-00000002"))
    assert again.content == refused.content and again.headers["Idempotent-Replayed"] == "true"
    assert value(client) == 22


def test_unique_member_duplicate_replays_as_the_first_answer(client, writer):
    url = "/api/v1/counter/daily_active_users/increment"
    first = post(client, url, {"user_id": "u1"}, keyed(writer))
    post(client, url, {"user_id": "u2"}, writer)
    again = post(client, url, {"user_id": "u1"}, keyed(writer))
    assert again.content == first.content == b'{"success":true,"current_value":1}'
    assert value(client, "daily_active_users") == 2


def test_reset_replays_without_a_second_reset_or_log_entry(client, builtins, make_key):
    manager = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write', 'counter_manage'))}"}
    post(client, INC, {"value": 9}, manager)
    url = "/api/v1/counter/matches_running/reset"
    first = post(client, url, {"reason": "event over", "reset_value": 2}, keyed(manager))
    assert first.json() == {"success": True, "current_value": 2, "previous_value": 9}
    post(client, INC, {}, manager)
    again = post(client, url, {"reason": "event over", "reset_value": 2}, keyed(manager))
    assert again.content == first.content and again.headers["Idempotent-Replayed"] == "true"
    assert post(client, url, {"reason": "other", "reset_value": 2}, keyed(manager)).status_code == 409
    assert value(client) == 3
    assert ResetLog.objects.filter(kind=ResetLog.Kind.MANUAL).count() == 1


def test_a_write_refused_while_the_breaker_is_open_applies_once_after_recovery(client, writer):
    for _ in range(breaker.threshold):
        breaker.record_failure()
    refused = post(client, INC, {}, keyed(writer))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 5003
    breaker.reset()
    assert value(client) == 0
    first = post(client, INC, {}, keyed(writer))
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    assert post(client, INC, {}, keyed(writer)).headers["Idempotent-Replayed"] == "true"
    assert value(client) == 1


def test_outcome_unknown_tells_clients_to_retry_with_the_same_key():
    from counters.errors import OutcomeUnknown

    assert "same Idempotency-Key" in OutcomeUnknown().message


# --- batch update: one key per item (its "id") ------------------------------------------------------


BATCH = "/api/v1/counters/batch"


def test_batch_items_carry_their_own_id_and_a_retried_batch_replays_them(client, writer):
    body = {
        "updates": [
            {"name": "matches_running", "value": 3, "id": "item-00000001"},
            {"name": "total_games_played", "id": "item-00000002"},
            {"name": "matches_running"},
        ]
    }
    first = post(client, BATCH, body, writer)
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    assert [r["current_value"] for r in first.json()["results"]] == [3, 1, 4]
    again = post(client, BATCH, body, writer)
    # The items with an id replay their first result; the one without applies again.
    assert [r["current_value"] for r in again.json()["results"]] == [3, 1, 5]
    only_keyed = {"updates": body["updates"][:2]}
    replay = post(client, BATCH, only_keyed, writer)
    assert replay.json()["results"] == first.json()["results"][:2]
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert value(client) == 5 and value(client, "total_games_played") == 1


def test_a_batch_item_reusing_an_id_for_another_update_is_refused_alone(client, writer):
    post(client, BATCH, {"updates": [{"name": "matches_running", "id": "item-00000001"}]}, writer)
    reply = post(
        client,
        BATCH,
        {
            "updates": [
                {"name": "matches_running", "value": 2, "id": "item-00000001"},
                {"name": "matches_running", "id": "item-00000002"},
            ]
        },
        writer,
    )
    results = reply.json()["results"]
    assert results[0]["success"] is False and results[0]["error"]["code"] == 4001
    assert "Idempotency-Key" in results[0]["error"]["message"]
    assert results[1] == {"name": "matches_running", "success": True, "current_value": 2}
    assert value(client) == 2


def test_a_batch_naming_one_id_twice_or_with_a_header_key_is_refused_whole(client, writer):
    twice = {"updates": [{"name": "matches_running", "id": "item-00000001"}] * 2}
    reply = post(client, BATCH, twice, writer)
    assert reply.status_code == 400 and "updates[1].id" in reply.json()["error"]["message"]
    reply = post(client, BATCH, {"updates": [{"name": "matches_running"}]}, keyed(writer))
    assert reply.status_code == 400 and "id" in reply.json()["error"]["message"]
    assert value(client) == 0


# --- cloud functions: the header or requestId ---------------------------------------------------------


def test_increase_counter_with_a_request_id_replays_byte_for_byte(client, writer):
    body = {"appId": "default", "counterType": "app", "counterId": "matches_running", "increment": 2}
    first = fn(client, "increaseCounter", {**body, "requestId": KEY}, writer)
    assert first.status_code == 200 and first.json()["data"]["newValue"] == 2
    fn(client, "increaseCounter", body, writer)
    again = fn(client, "increaseCounter", {**body, "requestId": KEY}, writer)
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    # The header names the same key as the body field did.
    assert fn(client, "increaseCounter", body, keyed(writer)).content == first.content
    conflict = fn(client, "increaseCounter", {**body, "increment": 5}, keyed(writer))
    assert conflict.status_code == 409
    assert conflict.json()["code"] == 4001 and conflict.json()["data"] is None
    assert value(client) == 4


def test_decrease_and_reset_counter_replay(client, writer):
    target = {"appId": "default", "counterType": "app", "counterId": "matches_running"}
    fn(client, "increaseCounter", {**target, "increment": 10}, writer)
    dec = {**target, "decrement": 4, "requestId": "dec-00000001"}
    first = fn(client, "decreaseCounter", dec, writer)
    assert json.loads(first.content)["data"]["newValue"] == 6
    assert fn(client, "decreaseCounter", dec, writer).content == first.content
    reset = {**target, "reason": "season over", "resetValue": 1, "requestId": "reset-00000001"}
    first_reset = fn(client, "resetCounter", reset, writer)
    assert first_reset.json()["data"]["oldValue"] == 6
    fn(client, "increaseCounter", target, writer)
    assert fn(client, "resetCounter", reset, writer).content == first_reset.content
    assert value(client) == 2


def test_the_conflict_is_translated_on_the_function_surface(client, writer):
    body = {"appId": "default", "counterType": "app", "counterId": "matches_running", "requestId": KEY}
    fn(client, "increaseCounter", body, writer)
    reply = fn(client, "increaseCounter", {**body, "increment": 2}, {**writer, "HTTP_ACCEPT_LANGUAGE": "zh-Hans"})
    assert reply.status_code == 409 and reply.json()["code"] == 4001
    assert reply.json()["msg"].startswith("此 Idempotency-Key 已用于另一个请求")


def test_in_write_through_mode_a_keyed_write_is_refused_while_redis_is_down(client, writer, settings):
    settings.COUNTER_REDIS_DOWN_WRITES = "write_through"
    post(client, INC, {}, writer)
    counters_flush()
    for _ in range(breaker.threshold):
        breaker.record_failure()
    # Keys are recorded in Redis only: written through PostgreSQL, a retry could apply twice.
    refused = post(client, INC, {}, keyed(writer))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 5003
    assert post(client, INC, {}, writer).json()["current_value"] == 2  # without a key: written through
    breaker.reset()
    first = post(client, INC, {}, keyed(writer))
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    assert post(client, INC, {}, keyed(writer)).content == first.content
    assert value(client) == 3
