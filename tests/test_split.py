"""Hot-counter splitting (docs/splitting.md): a counter spread over N shards, each under its own hash
tag, summed on read and merged by the flusher into the value's one PostgreSQL row, exactly."""

import signal
import time
from datetime import datetime

import pytest
import redis
import requests
from django.core.exceptions import ValidationError
from redis.crc import key_slot

from archive.models import PeriodArchive
from archive.services import period_archive_closed
from counters import config, keyspace
from counters.flush import counters_flush, deleted_counters_purge
from counters.models import App, Counter, CounterValue, CounterValueShard, Threshold, ThresholdEvent, UniqueMember

from . import test_cluster
from .http import post
from .processes import Gunicorn, PrivateRedis, wait_until
from .test_cluster import in_cluster_run
from .test_core_durability import flush_in_subprocess, hammer
from .test_periods import TAIPEI, bump
from .test_periods import read as read_value
from .test_reliability import PATIENT, get, web_on
from .test_streams import EventStream, shard_channels, shard_subscribers, stream_ends

pytestmark = pytest.mark.django_db(transaction=True)
cluster = test_cluster.cluster

SHARDS = 4


@pytest.fixture
def games(builtins):
    """``launch_games``: a plain counter of the default app split over four shards."""
    Counter.objects.create(app=App.objects.get(slug="default"), name="launch_games", shards=SHARDS, public=True)
    config.cache.invalidate()
    return Counter.objects.get(name="launch_games")


def shard_values(store, counter: Counter, period: str = "") -> list[int | None]:
    keys = [keyspace.value_key(keyspace.unit(counter.id, k), period, "") for k in range(counter.shards)]
    return [None if raw is None else int(raw) for raw in (store.hget(key, "v") for key in keys)]


def increment(client, writer, name: str, body: dict | None = None, **headers):
    return post(client, f"/api/v1/counter/{name}/increment", body or {}, {**writer, **headers})


def read(client, name: str) -> int:
    return client.get(f"/api/v1/counter/{name}").json()["value"]


def test_updates_spread_over_the_shards_and_every_reply_and_read_is_the_total(client, writer, games, store):
    replies = [increment(client, writer, "launch_games").json()["current_value"] for _ in range(120)]
    # One writer at a time: each reply is the total just after its own increment.
    assert replies == list(range(1, 121))
    assert read(client, "launch_games") == 120
    shares = shard_values(store, games)
    assert sum(shares) == 120
    assert sum(1 for share in shares if share) >= 3, shares  # random shards: all but never 1 of 4 used
    # Each shard's keys hash to their own slot (in a Redis Cluster: spread over the primaries).
    slots = {key_slot(keyspace.value_key(keyspace.unit(games.id, k), "", "").encode()) for k in range(SHARDS)}
    assert len(slots) == SHARDS

    counters_flush()
    row = CounterValue.objects.get(counter=games)
    assert (row.value, row.operations, row.peak) == (120, 120, 120)
    shard_rows = CounterValueShard.objects.filter(counter=games)
    assert sum(r.value for r in shard_rows) + shares[0] == 120
    assert {r.shard: r.value for r in shard_rows} == {k: v for k, v in enumerate(shares) if k and v}

    # A second round moves only the new deltas, under the next versions.
    for _ in range(30):
        increment(client, writer, "launch_games", {"value": 2})
    counters_flush()
    counters_flush()
    row.refresh_from_db()
    assert (row.value, row.operations) == (180, 150)
    assert read(client, "launch_games") == 180


def test_a_batch_and_the_cloud_functions_see_the_total(client, writer, games):
    increment(client, writer, "launch_games", {"value": 10})
    updates = [{"name": "launch_games", "value": 1} for _ in range(20)] + [{"name": "matches_running", "value": 1}]
    reply = post(client, "/api/v1/counters/batch", {"updates": updates}, writer)
    assert reply.status_code == 200, reply.content
    values = [r["current_value"] for r in reply.json()["results"]]
    assert values[:20] == list(range(11, 31)) and values[20] == 1
    many = client.get("/api/v1/counters?names=launch_games,matches_running").json()
    assert [c["value"] for c in many["counters"]] == [30, 1]
    body = {"appId": "default", "counterType": "app", "counterId": "launch_games"}
    got = post(client, "/api/v1/functions/getCounter", body, writer)
    assert got.json()["data"]["currentValue"] == 30, got.content
    increased = post(client, "/api/v1/functions/increaseCounter", {**body, "increment": 4}, writer).json()["data"]
    assert (increased["oldValue"], increased["newValue"]) == (30, 34)
    counters_flush()
    assert CounterValue.objects.get(counter=games).value == 34


def test_unique_members_are_counted_once_across_shards(client, writer, builtins, store):
    Counter.objects.create(
        app=App.objects.get(slug="default"), name="launch_players", shards=SHARDS, unique_members=True, public=True
    )
    config.cache.invalidate()
    counter = Counter.objects.get(name="launch_players")
    for _ in range(3):
        for user in range(40):
            increment(client, writer, "launch_players", {"user_id": f"p{user}"})
    assert read(client, "launch_players") == 40
    assert sum(1 for share in shard_values(store, counter) if share) >= 3
    counters_flush()
    assert CounterValue.objects.get(counter=counter).value == 40
    assert UniqueMember.objects.filter(counter=counter).count() == 40

    # Redis loses every shard: each one hydrates its share and its own members, no one counts twice.
    store.delete(*store.keys(f"cs:{{c{counter.id}*"))
    for user in range(45):
        increment(client, writer, "launch_players", {"user_id": f"p{user}"})
    assert read(client, "launch_players") == 45
    counters_flush()
    assert CounterValue.objects.get(counter=counter).value == 45


def test_a_retried_idempotent_increment_applies_once(client, writer, games):
    first = increment(client, writer, "launch_games", {"value": 5}, HTTP_IDEMPOTENCY_KEY="launch-1")
    again = increment(client, writer, "launch_games", {"value": 5}, HTTP_IDEMPOTENCY_KEY="launch-1")
    assert first.status_code == again.status_code == 200
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = increment(client, writer, "launch_games", {"value": 7}, HTTP_IDEMPOTENCY_KEY="launch-1")
    assert other.status_code == 409
    assert read(client, "launch_games") == 5


def test_a_shard_lost_from_redis_comes_back_from_postgresql(client, writer, games, store):
    for _ in range(60):
        increment(client, writer, "launch_games")
    counters_flush()
    lost = next(k for k, share in enumerate(shard_values(store, games)) if k and share)
    unit = keyspace.unit(games.id, lost)
    store.delete(*store.keys(f"cs:{{c{unit}}}:*"))
    assert read(client, "launch_games") == 60
    for _ in range(40):
        increment(client, writer, "launch_games")
    assert read(client, "launch_games") == 100
    counters_flush()
    assert CounterValue.objects.get(counter=games).value == 100


def test_thresholds_of_a_split_counter_fire_once_at_the_flush_that_crosses_them(client, writer, games):
    Threshold.objects.create(counter=games, value=50)
    config.cache.invalidate()
    for _ in range(40):
        increment(client, writer, "launch_games")
    counters_flush()
    assert not ThresholdEvent.objects.exists()
    for _ in range(20):
        increment(client, writer, "launch_games")
    assert not ThresholdEvent.objects.exists()  # detected by the flusher, from the totals
    counters_flush()
    assert ThresholdEvent.objects.filter(counter=games).count() == 1
    for _ in range(20):
        increment(client, writer, "launch_games")
    counters_flush()
    assert ThresholdEvent.objects.filter(counter=games).count() == 1


def test_what_a_split_counter_cannot_keep_exactly_is_refused(client, writer, games):
    # Counts up only while it has a lower bound; no reset to a value.
    reply = post(client, "/api/v1/counter/launch_games/decrement", {}, writer)
    assert reply.status_code == 409 and "split over 4 shards" in reply.json()["error"]["message"]
    reply = post(client, "/api/v1/counter/launch_games/reset", {"reason": "test"}, writer)
    assert reply.status_code == 409 and "split over 4 shards" in reply.json()["error"]["message"]
    assert read(client, "launch_games") == 0
    # Without a lower bound it decrements like any counter.
    games.allow_negative = True
    games.save()
    assert post(client, "/api/v1/counter/launch_games/decrement", {"value": 3}, writer).status_code == 200
    assert read(client, "launch_games") == -3


@pytest.mark.in_process
@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"max_value": 100}, "max_value"),
        ({"log_operations": True}, "operation log"),
        ({"kind": "presence"}, "presence"),
        ({"period": "daily", "reset_strategy": "keep"}, "reset strategy 'keep'"),
    ],
)
def test_split_counter_configuration_that_could_not_be_exact_is_refused(builtins, fields, refused):
    counter = Counter(app=App.objects.get(slug="default"), name="launch_x", shards=2, **fields)
    with pytest.raises(ValidationError, match=refused):
        counter.full_clean()
    Counter(app=App.objects.get(slug="default"), name="launch_x", **fields).full_clean()  # unsplit: fine


@pytest.mark.in_process
def test_shards_grow_but_never_shrink_and_a_unique_counter_keeps_its_count(games):
    games.shards = 8
    games.full_clean()
    games.save()
    games.shards = 2
    with pytest.raises(ValidationError, match="never shrink"):
        games.full_clean()
    unique = Counter.objects.create(app=games.app, name="launch_u", shards=2, unique_members=True)
    unique.shards = 4
    with pytest.raises(ValidationError, match="unique-member"):
        unique.full_clean()


@pytest.mark.in_process
def test_the_admin_form_shows_the_refusal(admin_client, games):
    url = f"/admin/counters/counter/{games.pk}/change/"
    page = admin_client.get(url)
    assert page.status_code == 200 and b'name="shards"' in page.content
    form = page.context["adminform"].form
    data = {name: form[name].value() for name in form.fields if form[name].value() is not None}
    data.update({"max_value": "10", "thresholds-TOTAL_FORMS": "0", "thresholds-INITIAL_FORMS": "0"})
    reply = admin_client.post(url, data)
    assert reply.status_code == 200
    assert b"A split counter cannot have max_value" in reply.content
    assert Counter.objects.get(pk=games.pk).max_value is None


@pytest.mark.in_process  # Django's view; the web process streams it live (the test below)
def test_without_the_fast_lane_a_stream_of_a_split_counter_sends_the_total_and_polls(client, writer, games):
    for _ in range(25):
        increment(client, writer, "launch_games")
    reply = client.get("/api/v1/stream?names=launch_games,matches_running", HTTP_LAST_EVENT_ID="7")
    assert reply.status_code == 200
    body = b"".join(reply.streaming_content) if getattr(reply, "streaming", False) else reply.content
    assert body == (
        b"retry: 1000\n\n"
        b'id: 8\ndata: {"name":"launch_games","value":25}\n\n'
        b'id: 9\ndata: {"name":"matches_running","value":0}\n\n'
    )


@pytest.mark.in_process
def test_concurrent_increments_through_the_real_server_are_exact(games, make_key, store):
    """1,000 increments from 50 threads against gunicorn (two workers, the fast lane): the sum, the
    shards and PostgreSQL after a flush all say 1,000."""
    key = make_key(("write",))
    web = Gunicorn()
    try:
        codes = hammer(f"{web.url}/api/v1/counter/launch_games/increment", key, total=1000, threads=50)
        assert codes == [200] * 1000
        assert requests.get(f"{web.url}/api/v1/counter/launch_games", timeout=10).json()["value"] == 1000
    finally:
        web.stop()
    assert sum(shard_values(store, games)) == 1000
    counters_flush()
    assert CounterValue.objects.get(counter=games).value == 1000


@pytest.mark.in_process
@pytest.mark.parametrize("crash_point", ["after_move", "before_commit", "after_commit"])
def test_a_flusher_killed_mid_flush_applies_each_shard_exactly_once(client, writer, games, store, crash_point):
    for _ in range(40):
        increment(client, writer, "launch_games")
    crashed = flush_in_subprocess(COUNTER_TEST_CRASH_POINT=crash_point, COUNTER_FLUSH_LOCK_SECONDS="1")
    assert crashed.returncode == -signal.SIGKILL
    increment(client, writer, "launch_games", {"value": 5})
    wait_until(lambda: "flushed" in flush_in_subprocess().stdout, timeout=30, what="a flush after the lock expired")
    counters_flush()
    assert CounterValue.objects.get(counter=games).value == 45
    assert read(client, "launch_games") == 45
    assert all(not store.smembers(keyspace.batches_key(keyspace.unit(games.id, k))) for k in range(SHARDS))


@pytest.mark.in_process
def test_a_daily_split_counter_opens_each_day_and_its_closed_shards_are_archived_and_trimmed(
    make_daily_counter, time_machine, builtins, store
):
    counter = make_daily_counter("launch_daily", shards=SHARDS, reset_value=5)
    time_machine.move_to(datetime(2026, 4, 1, 12, tzinfo=TAIPEI), tick=False)
    for _ in range(30):
        bump(counter)
    assert read_value(counter) == 35  # the opening value once, in shard 0's share, whichever shard hydrated first
    time_machine.move_to(datetime(2026, 4, 2, 12, tzinfo=TAIPEI), tick=False)
    assert bump(counter) == 6
    closed_day_shards = [k for k in store.keys(f"cs:{{c{counter.id}s*") if b":v:2026-04-01" in k]
    assert len(closed_day_shards) >= 2, closed_day_shards
    time_machine.move_to(datetime(2026, 4, 3, 0, 1, tzinfo=TAIPEI), tick=False)
    stats = period_archive_closed()
    assert stats.periods == 2
    assert sorted(PeriodArchive.objects.values_list("period", "final_value")) == [("2026-04-01", 35), ("2026-04-02", 6)]
    # Every shard's keys of the closed days are gone; nothing of PostgreSQL's rows is lost.
    shard_keys = [k for k in store.keys(f"cs:{{c{counter.id}s*") if b":v:2026-04-0" in k]
    assert shard_keys == []
    assert dict(CounterValue.objects.filter(counter_id=counter.id).values_list("period", "value")) == {
        "2026-04-01": 35,
        "2026-04-02": 6,
    }


@pytest.mark.in_process
def test_a_live_stream_of_a_split_counter_follows_its_total_and_leaves_no_channel(games, make_key):
    """The hub watches every shard's channel; a shard's message makes it read the total, which is
    what the stream sends (never one shard's share)."""
    headers = {"Authorization": f"Bearer {make_key(('write',))}"}
    web = Gunicorn(workers=1)
    channels = [keyspace.stream_channel(keyspace.unit(games.id, k)) for k in range(SHARDS)]
    stream = EventStream(f"{web.url}/api/v1/stream?names=launch_games,matches_running", headers)
    try:
        assert [stream.next_data()["data"] for _ in range(2)] == [
            {"name": "launch_games", "value": 0},
            {"name": "matches_running", "value": 0},
        ]
        assert [shard_subscribers(channel) for channel in channels] == [1] * SHARDS
        url = f"{web.url}/api/v1/counter/launch_games/increment"
        for expected in range(1, 9):
            time.sleep(0.3)  # beyond the 250 ms throttle: each change an event of its own
            assert requests.post(url, json={}, headers=headers, timeout=10).json()["current_value"] == expected
            assert stream.next_data()["data"] == {"name": "launch_games", "value": expected}
        # A burst within the throttle: few events, the total last.
        for _ in range(20):
            requests.post(url, json={}, headers=headers, timeout=10)
        seen = stream.next_data()["data"]["value"]
        while seen != 28:
            seen = stream.next_data()["data"]["value"]
    finally:
        stream.close()
    try:
        wait_until(lambda: shard_channels() == [], what="every shard's channel unsubscribed")
    finally:
        web.stop()


@in_cluster_run
@pytest.mark.in_process
def test_in_a_cluster_kill_9_of_a_shards_primary_ends_the_stream_and_leaves_no_channel(cluster, builtins, make_key):
    """The split counter's shards live on several primaries; one of them dies: the streams of the
    counter end (clients reconnect), and its channels on the surviving primaries are unsubscribed."""
    app = App.objects.get(slug="default")
    for attempt in range(20):
        # Slots follow the counter's id: the first counter whose shards span two primaries.
        counter = Counter.objects.create(app=app, name=f"launch_{attempt}", shards=SHARDS, public=True)
        units = [keyspace.unit(counter.id, k) for k in range(SHARDS)]
        ports = {cluster.port_of_key(keyspace.pending_key(unit)) for unit in units}
        if len(ports) >= 2:
            break
    assert len(ports) >= 2, "no counter's shards spread over two primaries"
    doomed = cluster.port_of_key(keyspace.pending_key(units[-1]))
    headers = {"Authorization": f"Bearer {make_key(('write',))}"}
    web = Gunicorn(workers=1, env={"COUNTER_STREAM_HEARTBEAT_SECONDS": "0.5"})
    try:
        stream = EventStream(f"{web.url}/api/v1/stream?names={counter.name}", headers)
        assert stream.next_data()["data"] == {"name": counter.name, "value": 0}
        cluster.kill(doomed)
        assert stream_ends(stream)
        stream.close()
        alive = [port for port in ports if port != doomed]
        wait_until(
            lambda: all(not redis.Redis(port=port).execute_command("PUBSUB", "SHARDCHANNELS") for port in alive),
            what="the counter's channels unsubscribed on the surviving primaries",
        )
    finally:
        web.stop()


@pytest.mark.single_redis
@pytest.mark.in_process
def test_writes_through_postgresql_during_an_outage_land_in_the_total_and_the_shards_agree_after(games, make_key):
    """Written through onto the value's row while Redis is down; Redis comes back with its old
    shares (AOF): the flusher rebases shard 0 on the total minus the other shards' rows, and every
    acknowledged increment counts once, in Redis and PostgreSQL alike."""
    key = make_key(("write",))
    store = PrivateRedis(appendonly=True)
    web = web_on(store, COUNTER_REDIS_DOWN_WRITES="write_through")
    url = f"{web.url}/api/v1/counter/launch_games/increment"
    try:
        assert hammer(url, key, total=20, threads=4) == [200] * 20
        assert flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).returncode == 0
        assert hammer(url, key, total=10, threads=2) == [200] * 10  # pending in Redis (its AOF)
        store.kill()
        assert hammer(url, key, total=50, threads=5) == [200] * 50
        assert CounterValue.objects.get(counter=games).value == 70
        store.start()
        assert "reconciled 1 written-through values" in flush_in_subprocess(TEST_REDIS_URL=store.url, **PATIENT).stdout
        hot = redis.Redis.from_url(store.url)
        shares = [hot.hget(keyspace.value_key(keyspace.unit(games.id, k), "", ""), "v") for k in range(SHARDS)]
        assert sum(int(share or 0) for share in shares) == 80
        assert CounterValue.objects.get(counter=games).value == 80

        def served_from_redis() -> bool:
            body = get(web, "counter/launch_games").json()
            return "degraded" not in body and body["value"] == 80

        wait_until(served_from_redis, timeout=30, what="the web process reading Redis again")
    finally:
        web.stop()
        store.close()


def test_a_deleted_split_counter_leaves_no_shard_key_behind(client, writer, games, store, settings):
    for _ in range(20):
        increment(client, writer, "launch_games")
    assert len(store.keys(f"cs:{{c{games.id}s*")) >= 2
    games.delete()
    settings.COUNTER_DELETED_KEYS_GRACE_SECONDS = 0
    assert deleted_counters_purge() > 0
    assert store.keys(f"cs:{{c{games.id}*") == []
