"""Server-sent events (GET /api/v1/stream) through a real server: the current values first, then each
change in order, throttled per counter with the last value always sent, resumed with Last-Event-ID,
the read rules of GET /api/v1/counters, and nothing left behind by a client that goes away."""

import json
import signal
import threading
import time

import pytest
import redis
import requests
from django.conf import settings
from playwright.sync_api import expect
from redis.crc import key_slot

from counters import keyspace, services
from counters.models import App, Counter
from counters.redis_store import redis_call

from . import test_cluster
from .browser import chromium_page, screenshot
from .conftest import _CLUSTER, CLUSTER_RUN
from .metrics_text import sample
from .processes import Gunicorn, wait_until
from .test_cluster import counters_on_two_nodes, in_cluster_run

# The cluster run's fixture that starts again every node a test killed.
cluster = test_cluster.cluster

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


class EventStream:
    """A blocking SSE client: ``next()`` answers the next event (or comment) as a dict."""

    def __init__(self, url: str, headers: dict | None = None, read_timeout: float = 15) -> None:
        self.response = requests.get(url, headers=headers or {}, stream=True, timeout=(5, read_timeout))
        self._chunks = self.response.iter_content(chunk_size=None)
        self._buffer = b""

    @property
    def status(self) -> int:
        return self.response.status_code

    def next(self) -> dict:
        while b"\n\n" not in self._buffer:
            self._buffer += next(self._chunks)
        raw, self._buffer = self._buffer.split(b"\n\n", 1)
        event: dict = {}
        for line in raw.decode().split("\n"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                event["comment"] = value
            elif field == "data":
                event["data"] = json.loads(value)
            else:
                event[field] = value
        return event

    def next_data(self) -> dict:
        """The next event that carries a value (heartbeats skipped)."""
        while True:
            event = self.next()
            if "data" in event:
                return event

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def web_factory():
    started = []

    def start(**env) -> Gunicorn:
        server = Gunicorn(workers=1, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def kills(builtins, make_counter):
    """A plain public counter of the default app (the built-ins may change kind: presence, unique)."""
    return make_counter("kills", public=True)


@pytest.fixture
def bearer(builtins, make_key):
    return {"Authorization": f"Bearer {make_key(('write', 'counter_manage', 'data_view'))}"}


def increment(web: Gunicorn, headers: dict, name: str, value: int = 1) -> int:
    reply = requests.post(f"{web.url}/api/v1/counter/{name}/increment", json={"value": value}, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["current_value"]


def redis_nodes() -> dict[int, redis.Redis]:
    """Every live node of the hot store by port: the one Redis, or each node of the cluster run."""
    if not CLUSTER_RUN:
        return {0: redis.Redis.from_url(settings.REDIS_URL)}
    return {port: redis.Redis(port=port) for port, process in _CLUSTER.processes.items() if process.poll() is None}


def shard_subscribers(channel: str, port: int | None = None) -> int:
    """Subscribers of a shard channel on every node (or on the node ``port``)."""
    nodes = redis_nodes()
    found = [nodes[port]] if port is not None else nodes.values()
    return sum(int(node.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]) for node in found)


def shard_channels() -> list:
    """The shard channels subscribed on any node."""
    return sorted(c for node in redis_nodes().values() for c in node.execute_command("PUBSUB", "SHARDCHANNELS"))


def metric(web: Gunicorn, name: str) -> float:
    return sample(requests.get(f"{web.url}/metrics", timeout=10).text, name)


def test_the_current_values_come_first_then_every_change_in_order(web_factory, bearer, make_counter, kills):
    make_counter("boss_kills")
    web = web_factory()
    increment(web, bearer, "kills", 5)
    stream = EventStream(f"{web.url}/api/v1/stream?names=kills,boss_kills", bearer)
    try:
        assert stream.status == 200
        assert stream.response.headers["Content-Type"] == "text/event-stream"
        assert stream.response.headers["Cache-Control"] == "no-store"
        first, second = stream.next(), stream.next()
        assert (first["id"], first["data"]) == ("1", {"name": "kills", "value": 5})
        assert (second["id"], second["data"]) == ("2", {"name": "boss_kills", "value": 0})
        seen = []
        for expected in (6, 7, 8):
            # Spaced beyond the 250 ms throttle: every change is an event of its own.
            time.sleep(0.3)
            assert increment(web, bearer, "kills") == expected
            seen.append(stream.next_data())
        assert [e["data"] for e in seen] == [{"name": "kills", "value": v} for v in (6, 7, 8)]
        assert [e["id"] for e in seen] == ["3", "4", "5"]
        time.sleep(0.3)
        increment(web, bearer, "boss_kills", 2)
        assert stream.next_data()["data"] == {"name": "boss_kills", "value": 2}
        # A reset writes a value too: it is published like an update.
        reset = requests.post(f"{web.url}/api/v1/counter/kills/reset", json={"value": 0}, headers=bearer)
        assert reset.status_code == 200, reset.text
        assert stream.next_data()["data"] == {"name": "kills", "value": 0}
    finally:
        stream.close()


def test_many_changes_within_the_interval_make_few_events_and_the_last_value_arrives(web_factory, bearer, kills):
    web = web_factory(COUNTER_STREAM_MIN_INTERVAL_MS="1000")
    stream = EventStream(f"{web.url}/api/v1/stream?names=kills", bearer)
    try:
        assert stream.next_data()["data"]["value"] == 0
        started = time.monotonic()
        session = requests.Session()
        for _ in range(60):
            reply = session.post(f"{web.url}/api/v1/counter/kills/increment", json={}, headers=bearer)
            assert reply.status_code == 200
        # 60 singles and a batch of 100 more: 160 changes.
        batch = {"updates": [{"name": "kills", "op": "increment", "value": 1}] * 100}
        reply = session.post(f"{web.url}/api/v1/counters/batch", json=batch, headers=bearer)
        assert reply.status_code == 200, reply.text
        elapsed = time.monotonic() - started
        values = []
        while not values or values[-1] != 160:
            values.append(stream.next_data()["data"]["value"])
        # At most one event per second (the leading edge of each interval and the trailing edge).
        assert len(values) <= int(elapsed) + 2, (values, elapsed)
        assert values == sorted(values) and values[-1] == 160
        # Nothing more follows: the last value was the trailing event.
        time.sleep(1.2)
        increment(web, bearer, "kills")
        assert stream.next_data()["data"]["value"] == 161
    finally:
        stream.close()


def test_the_throttle_is_per_counter(web_factory, bearer, make_counter, kills):
    make_counter("boss_kills")
    web = web_factory(COUNTER_STREAM_MIN_INTERVAL_MS="60000")
    stream = EventStream(f"{web.url}/api/v1/stream?names=kills,boss_kills", bearer)
    try:
        stream.next_data(), stream.next_data()
        # Within one (minute-long) interval: the first change of each counter goes out at once.
        increment(web, bearer, "kills")
        increment(web, bearer, "boss_kills")
        events = [stream.next_data()["data"] for _ in range(2)]
        assert sorted(e["name"] for e in events) == ["boss_kills", "kills"]
    finally:
        stream.close()


def test_last_event_id_resumes_with_the_current_values_and_ids_continue(web_factory, bearer, kills):
    web = web_factory()
    stream = EventStream(f"{web.url}/api/v1/stream?names=kills", bearer)
    try:
        assert stream.next_data()["id"] == "1"
        time.sleep(0.3)
        increment(web, bearer, "kills", 3)
        last = stream.next_data()
        assert (last["id"], last["data"]["value"]) == ("2", 3)
    finally:
        stream.close()
    # Changes while the client was away: the resumed stream starts with the current value.
    increment(web, bearer, "kills", 4)
    resumed = EventStream(f"{web.url}/api/v1/stream?names=kills", {**bearer, "Last-Event-ID": last["id"]})
    try:
        event = resumed.next_data()
        assert (event["id"], event["data"]) == ("3", {"name": "kills", "value": 7})
    finally:
        resumed.close()
    for bad in ("abc", "-1", "1.5", "99999999999999999999"):
        reply = requests.get(f"{web.url}/api/v1/stream?names=kills", headers={**bearer, "Last-Event-ID": bad})
        assert reply.status_code == 400, bad
        assert "Last-Event-ID" in reply.text


def test_bad_input_is_refused_exactly_as_get_counters_refuses_it(web_factory, bearer, make_counter, kills):
    make_counter("per_player", scope="user")
    web = web_factory()
    queries = [
        "",
        "?names=",
        "?names=" + ",".join(f"c{i}" for i in range(11)),
        "?names=bad%20name",
        "?names=no_such_counter",
        "?names=per_player",
    ]
    # (With a key the app is the key's: ?app= speaks only for anonymous reads.)
    cases = [(q, h) for q in queries for h in (bearer, {})] + [("?names=kills&app=no_such_app", {})]
    for query, headers in cases:
        stream = requests.get(f"{web.url}/api/v1/stream{query}", headers=headers, timeout=10, stream=True)
        assert stream.status_code >= 400, (query, headers)
        read = requests.get(f"{web.url}/api/v1/counters{query}", headers=headers, timeout=10)
        assert stream.status_code == read.status_code, (query, stream.text)
        assert stream.json() == read.json(), query
    assert shard_channels() == []


def test_private_counters_need_a_key_and_another_apps_counter_is_never_visible(web_factory, builtins, make_key):
    default = App.objects.get(slug="default")
    other = App.objects.create(slug="other", name="other")
    Counter.objects.create(app=default, name="secret_boss", public=False)
    Counter.objects.create(app=other, name="secret_boss", public=False)
    Counter.objects.create(app=other, name="public_boss", public=True)
    mine = {"Authorization": f"Bearer {make_key(('write', 'data_view'))}"}
    theirs = {"Authorization": f"Bearer {make_key(('write', 'data_view'), app='other')}"}
    web = web_factory()
    url = f"{web.url}/api/v1/stream?names=secret_boss"
    anonymous = requests.get(url, timeout=10)
    assert anonymous.status_code == requests.get(f"{web.url}/api/v1/counters?names=secret_boss").status_code
    assert anonymous.status_code in (401, 403)
    # Another app's public counter under this app's key: not found, as for a read.
    refused = requests.get(f"{web.url}/api/v1/stream?names=public_boss", headers=mine, timeout=10)
    assert refused.status_code == 404
    stream = EventStream(url, mine)
    try:
        assert stream.next_data()["data"] == {"name": "secret_boss", "value": 0}
        # The other app's counter of the same name changes: never seen on this stream.
        for _ in range(3):
            increment(web, theirs, "secret_boss", 10)
        time.sleep(0.3)
        assert increment(web, mine, "secret_boss", 1) == 1
        assert stream.next_data()["data"] == {"name": "secret_boss", "value": 1}
    finally:
        stream.close()


def test_a_client_that_goes_away_leaves_no_subscription_and_no_open_stream(web_factory, bearer, make_counter, kills):
    counter = make_counter("boss_kills")
    web = web_factory(COUNTER_STREAM_HEARTBEAT_SECONDS="0.5")
    channel = keyspace.stream_channel(counter.id)
    streams = [EventStream(f"{web.url}/api/v1/stream?names=boss_kills,kills", bearer) for _ in range(3)]
    try:
        for stream in streams:
            stream.next_data(), stream.next_data()
        # One subscriber connection for the worker, whatever the number of its streams.
        assert shard_subscribers(channel) == 1
        assert metric(web, "counterservice_streams_open") == 3
        assert metric(web, "counterservice_stream_channels") == 2
        # An idle stream gets heartbeats.
        assert streams[0].next() == {"comment": "heartbeat"}
        streams[0].close()
        wait_until(lambda: metric(web, "counterservice_streams_open") == 2, what="one stream closed")
        assert shard_subscribers(channel) == 1
        # A stream alone on its counter: when it goes, so does that channel, and only that one.
        other = make_counter("dragon_kills")
        alone = EventStream(f"{web.url}/api/v1/stream?names=dragon_kills", bearer)
        alone.next_data()
        assert shard_subscribers(keyspace.stream_channel(other.id)) == 1
        alone.close()
        wait_until(lambda: shard_subscribers(keyspace.stream_channel(other.id)) == 0, what="its channel dropped")
        assert shard_subscribers(channel) == 1
        assert metric(web, "counterservice_stream_channels") == 2
    finally:
        for stream in streams:
            stream.close()
    wait_until(lambda: metric(web, "counterservice_streams_open") == 0, what="every stream closed")
    wait_until(lambda: shard_channels() == [], what="every channel unsubscribed")
    assert metric(web, "counterservice_stream_channels") == 0
    assert metric(web, "counterservice_stream_events_total") >= 6
    # The worker is still fine: a new stream subscribes again and gets changes.
    stream = EventStream(f"{web.url}/api/v1/stream?names=boss_kills", bearer)
    try:
        assert stream.next_data()["data"] == {"name": "boss_kills", "value": 0}
        time.sleep(0.3)
        increment(web, bearer, "boss_kills")
        assert stream.next_data()["data"] == {"name": "boss_kills", "value": 1}
    finally:
        stream.close()


def test_sigterm_ends_open_streams_and_the_worker_exits(builtins, bearer, kills):
    web = Gunicorn(workers=1, env={"GUNICORN_GRACEFUL_TIMEOUT": "120"})
    stream = EventStream(f"{web.url}/api/v1/stream?names=kills", bearer)
    try:
        stream.next_data()
        started = time.monotonic()
        web.process.send_signal(signal.SIGTERM)
        # The stream ends (its reply is complete), well before the 120 s graceful timeout.
        ended = threading.Event()

        def drain():
            try:
                while True:
                    stream.next()
            except (StopIteration, requests.RequestException):
                ended.set()

        threading.Thread(target=drain, daemon=True).start()
        assert ended.wait(60)
        assert web.stop(timeout=60) == 0
        assert time.monotonic() - started < 120
    finally:
        stream.close()
        web.stop(sig=signal.SIGKILL)


def test_a_stream_refuses_while_redis_is_down_and_ends_when_it_goes(builtins, make_key, private_redis, kills):
    key = {"Authorization": f"Bearer {make_key(('write', 'data_view'))}"}
    web = Gunicorn(workers=1, env={"TEST_REDIS_URL": private_redis.url})
    try:
        stream = EventStream(f"{web.url}/api/v1/stream?names=kills", key)
        assert stream.next_data()["data"]["name"] == "kills"
        private_redis.kill()
        # The hub lost Redis: the stream ends, and a new one is refused with 503 (the board polls).
        with pytest.raises((StopIteration, requests.RequestException)):
            while True:
                stream.next()
        reply = requests.get(f"{web.url}/api/v1/stream?names=kills", headers=key, timeout=30)
        assert reply.status_code == 503, reply.text
    finally:
        web.stop()


def test_a_frozen_redis_ends_the_streams(builtins, make_key, private_redis, kills):
    """SIGSTOP: the TCP connection stays up and nothing is answered; the hub's PING goes unanswered."""
    key = {"Authorization": f"Bearer {make_key(('write', 'data_view'))}"}
    web = Gunicorn(workers=1, env={"TEST_REDIS_URL": private_redis.url, "COUNTER_STREAM_HEARTBEAT_SECONDS": "0.5"})
    try:
        stream = EventStream(f"{web.url}/api/v1/stream?names=kills", key)
        assert stream.next_data()["data"]["name"] == "kills"
        private_redis.freeze()
        with pytest.raises((StopIteration, requests.RequestException)):
            while True:
                stream.next()
    finally:
        private_redis.thaw()
        web.stop()


# --- the live board ---------------------------------------------------------------------------


def test_board_gets_an_increment_over_the_stream_with_polling_all_but_off(builtins, make_key, kills):
    """The live board in Debian's Chromium (Playwright) on the production server: it polls once at
    load, then only every ten minutes, so the new value can only come over the event stream."""
    key = make_key(("write",))
    web = Gunicorn(workers=1, env={"BOARD_POLL_MILLISECONDS": "600000"})
    try:
        with chromium_page() as page:
            page.goto(f"{web.url}/board/")
            online = page.locator('.counter[data-name="kills"] .value')
            expect(online).to_have_attribute("data-value", "0")
            expect(page.locator("body")).to_have_attribute("data-transport", "stream")
            # The stream is open (its first values arrived) before the increment is sent.
            expect(page.locator("#status")).to_have_text("live · streaming")
            page.evaluate(
                """() => new MutationObserver(() => { window.changedAt = window.changedAt || Date.now(); })
                     .observe(document.querySelector('.counter[data-name="kills"] .value'),
                              {attributes: true})"""
            )
            sent = page.evaluate("Date.now()")  # the browser's clock (this process's is pinned)
            r = requests.post(
                f"{web.url}/api/v1/counter/kills/increment",
                json={"value": 42},
                headers={"Authorization": f"Bearer {key}"},
                timeout=5,
            )
            assert r.json() == {"success": True, "current_value": 42}
            expect(online).to_have_attribute("data-value", "42", timeout=10_000)
            expect(online).to_have_text("42")
            latency_ms = page.evaluate("window.changedAt") - sent
            print(f"increment -> browser over the stream: {latency_ms:.0f} ms")
            assert page.evaluate("document.body.dataset.transport") == "stream"
            screenshot(page, "board-stream")
    finally:
        web.stop()


# --- in process: every writer of a value publishes, the Django view answers once ---------------


@pytest.mark.django_db
def test_updates_and_resets_publish_on_the_counters_channel_and_only_changes(builtins, make_counter, store, kills):
    counter = make_counter("boss_kills")
    channel = keyspace.stream_channel(counter.id)
    # On the node owning the channel's slot (the one Redis, or its primary in a cluster run).
    node = redis.Redis(port=_CLUSTER.port_of_key(channel)) if CLUSTER_RUN else store
    pubsub = node.pubsub()
    pubsub.ssubscribe(channel)
    assert pubsub.get_message(timeout=5)["type"] == "ssubscribe"
    services.counter_update(counter=counter, amount=3)
    services.counter_reset(counter=counter, value=3, reason="test")  # no change: nothing published
    services.counter_reset(counter=counter, value=1, reason="test")
    messages = []
    while (message := pubsub.get_message(timeout=1)) is not None:
        messages.append(keyspace.stream_message_parse(message["data"]))
    assert [(value, subject) for value, _ms, _period, subject in messages] == [(3, ""), (1, "")]
    pubsub.close()


@pytest.mark.in_process
@pytest.mark.django_db
def test_the_django_view_answers_the_current_values_once_with_a_retry(client, builtins, kills):
    redis_call(lambda r: r.ping())
    reply = client.get("/api/v1/stream?names=kills", HTTP_LAST_EVENT_ID="9")
    assert reply.status_code == 200
    assert reply["Content-Type"] == "text/event-stream"
    assert reply.content == b'retry: 1000\n\nid: 10\ndata: {"name":"kills","value":0}\n\n'
    assert client.get("/api/v1/stream").status_code == 400


def test_presence_logins_and_logouts_reach_the_stream(web_factory, bearer):
    """online_players is a presence counter: its logins and logouts go through the update body too."""
    web = web_factory()
    stream = EventStream(f"{web.url}/api/v1/stream?names=online_players", bearer)
    try:
        assert stream.next_data()["data"] == {"name": "online_players", "value": 0}
        login = requests.post(
            f"{web.url}/api/v1/counter/online_players/increment", json={"user_id": "p1"}, headers=bearer, timeout=10
        )
        assert login.status_code == 200, login.text
        assert stream.next_data()["data"] == {"name": "online_players", "value": 1}
        time.sleep(0.3)
        logout = requests.post(
            f"{web.url}/api/v1/counter/online_players/decrement", json={"user_id": "p1"}, headers=bearer, timeout=10
        )
        assert logout.status_code == 200, logout.text
        assert stream.next_data()["data"] == {"name": "online_players", "value": 0}
    finally:
        stream.close()


# --- a Redis Cluster: one subscriber connection per primary that owns a watched channel ---------


def stream_ends(stream: EventStream, within: float = 10) -> bool:
    """Whether the server ends ``stream`` within ``within`` seconds (the tests' servers send a heartbeat
    every half second, so a live stream never reaches its read timeout)."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            stream.next()
    except (StopIteration, requests.RequestException):
        return True
    return False


def stream_when_served(url: str, headers: dict, timeout: float = 60) -> EventStream:
    """A stream of ``url`` once the server answers it with 200 (a client reconnecting until then)."""
    found: list[EventStream] = []

    def served() -> bool:
        stream = EventStream(url, headers)
        if stream.status == 200:
            found.append(stream)
            return True
        stream.close()
        return False

    wait_until(served, timeout=timeout, what=f"a stream served at {url}")
    return found[0]


@in_cluster_run
def test_in_a_cluster_a_stream_gets_the_changes_of_counters_on_two_primaries_and_leaves_nothing(
    cluster, bearer, web_factory
):
    first, second, first_port = counters_on_two_nodes(cluster)
    second_port = cluster.port_of_key(keyspace.pending_key(second.id))
    web = web_factory(COUNTER_STREAM_HEARTBEAT_SECONDS="0.5")
    stream = EventStream(f"{web.url}/api/v1/stream?names={first.name},{second.name}", bearer)
    try:
        assert [stream.next_data()["data"] for _ in range(2)] == [
            {"name": first.name, "value": 0},
            {"name": second.name, "value": 0},
        ]
        # Each channel is subscribed on the primary that owns its slot (where the script publishes).
        assert shard_subscribers(keyspace.stream_channel(first.id), first_port) == 1
        assert shard_subscribers(keyspace.stream_channel(second.id), second_port) == 1
        assert shard_subscribers(keyspace.stream_channel(first.id)) == 1
        increment(web, bearer, first.name, 3)
        assert stream.next_data()["data"] == {"name": first.name, "value": 3}
        increment(web, bearer, second.name, 4)
        assert stream.next_data()["data"] == {"name": second.name, "value": 4}
    finally:
        stream.close()
    # Gone from every node, primaries and replicas alike.
    wait_until(lambda: shard_channels() == [], what="every shard channel unsubscribed on every node")
    wait_until(lambda: metric(web, "counterservice_streams_open") == 0, what="the stream closed")
    assert metric(web, "counterservice_stream_channels") == 0
    # The hub connects again on demand.
    again = EventStream(f"{web.url}/api/v1/stream?names={second.name}", bearer)
    try:
        assert again.next_data()["data"] == {"name": second.name, "value": 4}
        time.sleep(0.3)
        increment(web, bearer, second.name)
        assert again.next_data()["data"] == {"name": second.name, "value": 5}
    finally:
        again.close()


@in_cluster_run
def test_in_a_cluster_kill_9_of_a_primary_ends_only_the_streams_watching_its_counters(cluster, bearer, web_factory):
    doomed, healthy, port = counters_on_two_nodes(cluster)
    web = web_factory(COUNTER_STREAM_HEARTBEAT_SECONDS="0.5")
    url = f"{web.url}/api/v1/stream?names=%s"
    on_doomed = EventStream(url % doomed.name, bearer)
    on_both = EventStream(url % f"{healthy.name},{doomed.name}", bearer)
    on_healthy = EventStream(url % healthy.name, bearer)
    try:
        on_doomed.next_data(), on_both.next_data(), on_both.next_data(), on_healthy.next_data()
        cluster.kill(port)
        # The streams watching a counter of the dead primary end (their clients reconnect) ...
        assert stream_ends(on_doomed)
        assert stream_ends(on_both)
        # ... the stream on another primary goes on, and its channel stays subscribed there once.
        assert not stream_ends(on_healthy, within=2)
        increment(web, bearer, healthy.name, 2)
        assert on_healthy.next_data()["data"] == {"name": healthy.name, "value": 2}
        assert shard_subscribers(keyspace.stream_channel(healthy.id)) == 1
        # Once the replica has taken over, a reconnecting client gets the doomed counter's changes.
        on_doomed.close()
        on_doomed = stream_when_served(url % doomed.name, bearer)
        assert on_doomed.next_data()["data"]["name"] == doomed.name
        time.sleep(0.3)
        value = increment(web, bearer, doomed.name)
        assert on_doomed.next_data()["data"] == {"name": doomed.name, "value": value}
    finally:
        for stream in (on_doomed, on_both, on_healthy):
            stream.close()
    wait_until(lambda: shard_channels() == [], what="every shard channel unsubscribed on every node")


def move_slot(cluster, slot: int, source_port: int, target_port: int) -> None:
    """Reshard one slot with its keys from one primary to another, as redis-cli --cluster reshard does."""
    source, target = redis.Redis(port=source_port), redis.Redis(port=target_port)
    source_id, target_id = (node.execute_command("CLUSTER", "MYID") for node in (source, target))
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
    for port in [target_port, source_port, *(p for p in cluster.primaries() if p not in (source_port, target_port))]:
        redis.Redis(port=port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


@in_cluster_run
def test_in_a_cluster_a_resharded_slot_ends_its_streams_and_a_reconnection_follows_it(cluster, bearer, web_factory):
    moved, stays, port = counters_on_two_nodes(cluster)
    other_port = cluster.port_of_key(keyspace.pending_key(stays.id))
    channel = keyspace.stream_channel(moved.id)
    slot = key_slot(channel.encode())
    # A counter of the same primary in another slot, which does not move.
    for i in range(60):
        neighbour = Counter.objects.create(app_id=moved.app_id, name=f"n{i}", public=True)
        neighbour_channel = keyspace.stream_channel(neighbour.id)
        if cluster.port_of_key(neighbour_channel) == port and key_slot(neighbour_channel.encode()) != slot:
            break
    web = web_factory(COUNTER_STREAM_HEARTBEAT_SECONDS="0.5")
    # A worker that watches only the neighbour while the slot moves: its slot map stays the old one.
    unaware = web_factory(COUNTER_STREAM_HEARTBEAT_SECONDS="0.5")
    increment(web, bearer, moved.name, 3)
    url = f"{web.url}/api/v1/stream?names=%s"
    on_moved = EventStream(url % moved.name, bearer)
    on_stays = EventStream(url % stays.name, bearer)
    on_neighbour = EventStream(f"{unaware.url}/api/v1/stream?names={neighbour.name}", bearer)
    try:
        on_moved.next_data(), on_stays.next_data(), on_neighbour.next_data()
        move_slot(cluster, slot, port, other_port)
        # The old owner unsubscribes the slot's channels (sunsubscribe): that stream ends ...
        assert stream_ends(on_moved)
        # ... the other goes on.
        assert not stream_ends(on_stays, within=2)
        increment(web, bearer, stays.name, 2)
        assert on_stays.next_data()["data"] == {"name": stays.name, "value": 2}
        # The reconnection subscribes on the slot's new owner (after a MOVED if the hub's slot map
        # was still the old one) and gets the current value, then the changes.
        on_moved.close()
        on_moved = stream_when_served(url % moved.name, bearer)
        # The other worker subscribes where its old slot map says: the old owner answers -MOVED,
        # that stream is refused (503, nothing left subscribed), the map is asked for again, and
        # the client's next try subscribes on the new owner. Its stream on the same node goes on.
        refused = requests.get(url.replace(web.url, unaware.url) % moved.name, headers=bearer, stream=True)
        assert refused.status_code == 503, refused.status_code
        refused.close()
        assert not stream_ends(on_neighbour, within=2)
        again = stream_when_served(url.replace(web.url, unaware.url) % moved.name, bearer)
        assert again.next_data()["data"] == {"name": moved.name, "value": 3}
        again.close()
        assert on_moved.next_data()["data"] == {"name": moved.name, "value": 3}
        assert shard_subscribers(channel, other_port) == 1
        assert shard_subscribers(channel, port) == 0
        time.sleep(0.3)
        increment(web, bearer, moved.name)
        assert on_moved.next_data()["data"] == {"name": moved.name, "value": 4}
    finally:
        on_moved.close()
        on_stays.close()
        on_neighbour.close()
        if cluster.port_of_key(channel) != port:
            move_slot(cluster, slot, other_port, port)
    wait_until(lambda: shard_channels() == [], what="every shard channel unsubscribed on every node")
