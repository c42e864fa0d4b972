"""/metrics in one process: names and types, values that follow the work done, access rules,
and the gauges read from Redis at scrape time (flush lag, pending deltas, archive lag, values).

The multiprocess aggregation across gunicorn workers, Celery's metrics and a real Prometheus
are in ``test_metrics_live.py``.
"""

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.test import override_settings

from alerts.models import Channel, Delivery
from alerts.services import delivery_attempt
from archive.services import period_archive_closed
from counters import config, keyspace, selectors
from counters.flush import counters_flush
from counters.models import App, Counter, Threshold
from counters.redis_store import scripts
from counters.services import counter_update
from counters.tasks import flush as flush_task

from .metrics_text import families, sample, total
from .processes import ROOT, service_env

pytestmark = pytest.mark.django_db

P = "counterservice"
EXPECTED_TYPES = {
    f"{P}_http_requests": "counter",
    f"{P}_http_request_duration_seconds": "histogram",
    f"{P}_redis_round_trips": "counter",
    f"{P}_redis_batch_size": "histogram",
    f"{P}_redis_breaker_open": "gauge",
    f"{P}_degraded_reads": "counter",
    f"{P}_flush_runs": "counter",
    f"{P}_flush_duration_seconds": "histogram",
    f"{P}_flush_deltas": "histogram",
    f"{P}_flush_rows": "histogram",
    f"{P}_archive_runs": "counter",
    f"{P}_archive_duration_seconds": "histogram",
    f"{P}_archived_periods": "counter",
    f"{P}_alert_deliveries": "counter",
    f"{P}_celery_tasks": "counter",
    f"{P}_celery_task_duration_seconds": "histogram",
    f"{P}_store_up": "gauge",
    f"{P}_flush_lag_seconds": "gauge",
    f"{P}_flush_pending_deltas": "gauge",
    f"{P}_archive_lag_seconds": "gauge",
    f"{P}_counter_value": "gauge",
}


def scrape(client, **headers) -> str:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return response.content.decode()


def increment(client, writer, name: str, value: int = 1, user_id: str | None = None):
    body = {"value": value} if user_id is None else {"value": value, "user_id": user_id}
    return client.post(f"/api/v1/counter/{name}/increment", body, content_type="application/json", **writer)


def test_every_metric_has_the_prefix_its_type_and_base_units(client, writer):
    increment(client, writer, "matches_running")
    found = families(scrape(client))
    for name, kind in EXPECTED_TYPES.items():
        assert name in found, name
        assert found[name].type == kind, (name, found[name].type)
    ours = [name for name in found if not name.startswith(("python_", "process_"))]
    assert all(name.startswith(f"{P}_") for name in ours), ours
    # Counters are exposed with _total; durations are in seconds, never milliseconds.
    text = scrape(client)
    assert f"{P}_http_requests_total{{" in text
    assert "_milliseconds" not in text and "_ms" not in "".join(found)


def test_requests_are_counted_once_each_by_surface_endpoint_and_status(client, writer):
    before = scrape(client)
    n = 7
    for _ in range(n):
        assert increment(client, writer, "matches_running").status_code == 200
    for _ in range(3):
        assert client.get("/api/v1/counter/matches_running", **writer).status_code == 200
    assert client.get("/api/v1/counter/no_such_counter", **writer).status_code == 404
    assert increment(client, writer, "matches_running", value="x").status_code == 400
    body = {"appId": "default", "counterType": "app", "counterId": "matches_running", "increment": 2}
    reply = client.post("/api/v1/functions/increaseCounter", body, content_type="application/json", **writer)
    assert reply.json()["code"] == 0
    batch = {"updates": [{"name": "matches_running", "value": 1}] * 4}
    assert client.post("/api/v1/counters/batch", batch, content_type="application/json", **writer).status_code == 200
    after = scrape(client)

    def grew(name: str, **labels) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests_total = f"{P}_http_requests_total"
    rest_inc = {"surface": "rest", "endpoint": "counter-increment", "method": "POST"}
    assert grew(requests_total, **rest_inc, status="200") == n
    assert grew(requests_total, **rest_inc, status="400") == 1
    read = {"surface": "rest", "endpoint": "counter-detail", "method": "GET"}
    assert grew(requests_total, **read, status="200") == 3
    assert grew(requests_total, **read, status="404") == 1
    fn = {"surface": "functions", "endpoint": "fn-increaseCounter", "method": "POST", "status": "200"}
    assert grew(requests_total, **fn) == 1
    hist = f"{P}_http_request_duration_seconds"
    assert grew(f"{hist}_count", surface="rest", endpoint="counter-increment") == n + 1
    assert grew(f"{hist}_bucket", surface="rest", endpoint="counter-increment", le="+Inf") == n + 1
    # One update is one Redis round trip at least; a scrape's own reads come on top.
    assert grew(f"{P}_redis_round_trips_total", outcome="ok") >= n
    assert grew(f"{P}_redis_batch_size_count") == 1 and grew(f"{P}_redis_batch_size_sum") == 4
    # A path never becomes a label: the counter's name appears in no request series.
    assert "no_such_counter" not in after


def test_metrics_are_refused_without_token_or_allowed_network(client, settings):
    outsider = {"REMOTE_ADDR": "203.0.113.9"}
    refused = client.get("/metrics", **outsider)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == 4003
    assert P not in refused.content.decode()

    settings.METRICS_TOKEN = "s3cret-token"
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer nope", **outsider)
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == 4003
    assert f"{P}_http_requests" in scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-token", **outsider)

    import ipaddress

    settings.METRICS_ALLOWED_NETWORKS = [ipaddress.ip_network("203.0.113.0/24")]
    assert f"{P}_http_requests" in scrape(client, **outsider)
    assert client.get("/metrics").status_code == 401  # loopback is no longer listed
    assert client.post("/metrics", **outsider).status_code == 405


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("METRICS_ALLOWED_NETWORKS", "10.0.0.0/8,not-a-network", "METRICS_ALLOWED_NETWORKS"),
        ("METRICS_COUNTERS", "default/matches_running,justaname", "METRICS_COUNTERS"),
    ],
)
def test_bad_metrics_settings_stop_the_start_with_a_clear_message(variable, value, message):
    env = service_env(**{variable: value, "DJANGO_SETTINGS_MODULE": "counterproject.settings"})
    run = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode != 0
    assert f"ImproperlyConfigured: {message}" in run.stderr, run.stderr[-500:]


FORKED_COUNTS = """
import os
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from metrics import definitions as m

requests = m.http_requests.labels("rest", "counter-increment", "POST", "200")
requests.inc()
child = os.fork()
if child == 0:
    for _ in range(5):
        requests.inc()
    os._exit(0)
os.waitpid(child, 0)
requests.inc(2)
registry = CollectorRegistry()
MultiProcessCollector(registry)
total = registry.get_sample_value(
    "counterservice_http_requests_total",
    {"surface": "rest", "endpoint": "counter-increment", "method": "POST", "status": "200"},
)
files = sorted(name for name in os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]) if name.startswith("counter_"))
print(total, files == sorted([f"counter_{os.getpid()}.db", f"counter_{child}.db"]))
"""


def test_a_forked_process_counts_in_files_of_its_own(tmp_path):
    """In multiprocess mode a process keeps its id instead of asking for it at every value written
    (``metrics.definitions``); a child forked after it wrote (a Celery pool process) still writes
    its own file, so neither loses the other's counts."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", FORKED_COUNTS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-1000:]
    assert run.stdout.split() == ["8.0", "True"]


METERED_TOGETHER = """
import os
import threading
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from metrics import definitions as m
from metrics.recorders import request_meter

labels = {"surface": "rest", "endpoint": "counter-increment"}
meter = request_meter(**labels, method="POST", status=200)  # the fast lane's way
requests = m.http_requests.labels(*labels.values(), "POST", "200")  # Django's way, same values
duration = m.http_request_duration.labels(*labels.values())


def lane():
    for _ in range(20000):
        meter.record(0.001)  # an upper bound: its own bucket, as Histogram.observe puts it


def django():
    for _ in range(20000):
        requests.inc()
        duration.observe(0.0011)


threads = [threading.Thread(target=lane), threading.Thread(target=django)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
child = os.fork()
if child == 0:
    for _ in range(3):
        meter.record(7.0)  # past the last bound: +Inf only
    os._exit(0)
os.waitpid(child, 0)
meter.record(0.0001)  # the parent writes after the child: each in a file of its own
registry = CollectorRegistry()
MultiProcessCollector(registry)
value = registry.get_sample_value
print(
    value("counterservice_http_requests_total", {**labels, "method": "POST", "status": "200"}),
    value("counterservice_http_request_duration_seconds_bucket", {**labels, "le": "0.0005"}),
    value("counterservice_http_request_duration_seconds_bucket", {**labels, "le": "0.001"}),
    value("counterservice_http_request_duration_seconds_bucket", {**labels, "le": "0.0025"}),
    value("counterservice_http_request_duration_seconds_bucket", {**labels, "le": "5.0"}),
    value("counterservice_http_request_duration_seconds_count", labels),
    round(value("counterservice_http_request_duration_seconds_sum", labels), 6),
)
"""


def test_a_request_meter_counts_as_counter_and_histogram_do_beside_them(tmp_path):
    """The fast lane writes a request's count, sum and bucket together (``RequestMeter``): in
    multiprocess mode, from a thread beside Django's ``inc`` and ``observe`` on the same values,
    and in a forked child, every request is counted once, in the bucket ``observe`` would choose."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", METERED_TOGETHER], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-1000:]
    total, below, at_bound, above, last, count, seconds = (float(x) for x in run.stdout.split())
    assert total == 40004.0
    assert (below, at_bound, above, last) == (1.0, 20001.0, 40001.0, 40001.0)
    assert count == 40004.0
    assert seconds == round(0.0001 + 20000 * 0.001 + 20000 * 0.0011 + 3 * 7.0, 6)


def test_flush_lag_and_pending_deltas_come_from_redis(client, writer):
    start = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)
    with time_machine.travel(start, tick=False):
        text = scrape(client)
        assert sample(text, f"{P}_flush_pending_deltas") == 0
        assert sample(text, f"{P}_flush_lag_seconds") == 0
        for _ in range(3):
            increment(client, writer, "matches_running")
    with time_machine.travel(start + timedelta(seconds=4), tick=False):
        increment(client, writer, "total_games_played", 5)
        increment(client, writer, "daily_active_users", user_id="u1")
        increment(client, writer, "daily_active_users", user_id="u1")  # counted once: no delta
    with time_machine.travel(start + timedelta(seconds=7), tick=False):
        text = scrape(client)
        # Three values changed (one delta row each, whatever their number of updates).
        assert sample(text, f"{P}_flush_pending_deltas") == 3
        assert sample(text, f"{P}_flush_lag_seconds") == 7.0
        assert sample(text, f"{P}_store_up") == 1

        # A batch moved out of the live key but not yet applied (a flusher that died mid-run)
        # still counts, with its own age.
        counter = selectors.counter_get(app_id=App.objects.get(slug="default").id, name="matches_running")
        keys = [
            keyspace.pending_key(counter.id),
            keyspace.oplog_key(counter.id),
            keyspace.batches_key(counter.id),
            keyspace.batch_key(counter.id, "00000000000000000001-test"),
            keyspace.batch_log_key(counter.id, "00000000000000000001-test"),
        ]
        assert scripts.move_pending(keys=keys, args=["00000000000000000001-test"]) == 1
        text = scrape(client)
        assert sample(text, f"{P}_flush_pending_deltas") == 3
        assert sample(text, f"{P}_flush_lag_seconds") == 7.0

        stats = counters_flush()
        assert stats.operations == 5
        text = scrape(client)
        assert sample(text, f"{P}_flush_pending_deltas") == 0
        assert sample(text, f"{P}_flush_lag_seconds") == 0
    # The next change after a flush starts the clock again.
    with time_machine.travel(start + timedelta(seconds=9), tick=False):
        increment(client, writer, "matches_running")
        increment(client, writer, "matches_running")
    with time_machine.travel(start + timedelta(seconds=12), tick=False):
        text = scrape(client)
        assert sample(text, f"{P}_flush_pending_deltas") == 1
        assert sample(text, f"{P}_flush_lag_seconds") == 3.0


def test_the_flush_task_reports_deltas_rows_and_runs(client, writer):
    before = scrape(client)
    for user in ("a", "b", "c"):
        increment(client, writer, "daily_active_users", user_id=user)
    increment(client, writer, "matches_running", 4)
    flush_task()
    flush_task()  # nothing pending: a run with zero deltas
    after = scrape(client)

    def grew(name: str, **labels) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew(f"{P}_flush_runs_total", outcome="ok") == 2
    assert grew(f"{P}_flush_deltas_count") == 2
    assert grew(f"{P}_flush_deltas_sum") == 4  # 3 members + 1 increment of 4
    assert grew(f"{P}_flush_rows_sum") == 2 + 3  # two value rows and three unique members
    assert grew(f"{P}_flush_deltas_bucket", le="0.0") == 1
    assert grew(f"{P}_flush_duration_seconds_count") == 2


def test_archive_lag_grows_after_a_boundary_until_the_archive_runs(client, writer):
    before = scrape(client)
    with time_machine.travel(datetime(2026, 3, 2, 23, 59, 0, tzinfo=UTC), tick=False):
        increment(client, writer, "total_games_played", 2)
        period_archive_closed()
        text = scrape(client)
        assert sample(text, f"{P}_archive_lag_seconds") == 0
        done = sample(text, f"{P}_archive_last_success_timestamp_seconds")
        assert done == datetime(2026, 3, 2, 23, 59, 0, tzinfo=UTC).timestamp()
    with time_machine.travel(datetime(2026, 3, 3, 0, 10, 0, tzinfo=UTC), tick=False):
        assert sample(scrape(client), f"{P}_archive_lag_seconds") == 600.0
        from archive.tasks import close_periods

        close_periods()
        after = scrape(client)
        assert sample(after, f"{P}_archive_lag_seconds") == 0
        assert (
            sample(after, f"{P}_archive_runs_total", outcome="ok")
            - sample(before, f"{P}_archive_runs_total", outcome="ok")
            == 1
        )
        # total_games_played's 2026-03-02 closed: one period archived.
        assert sample(after, f"{P}_archived_periods_total") - sample(before, f"{P}_archived_periods_total") == 1


def test_only_listed_public_shared_counters_are_exported(client, writer, builtins):
    default = App.objects.get(slug="default")
    Counter.objects.create(app=default, name="secret_boss", public=False)
    Counter.objects.create(app=default, name="per_player", public=True, scope=Counter.Scope.USER)
    config.cache.invalidate()
    increment(client, writer, "matches_running", 42)
    listed = [("default", "matches_running"), ("default", "secret_boss"), ("default", "per_player"), ("nope", "x")]
    with override_settings(METRICS_COUNTERS=listed):
        text = scrape(client)
    assert sample(text, f"{P}_counter_value", app="default", counter="matches_running") == 42
    names = {s.labels["counter"] for s in families(text)[f"{P}_counter_value"].samples}
    assert names == {"matches_running"}

    with override_settings(METRICS_COUNTERS=[("default", "*")], METRICS_COUNTERS_MAX=2):
        exported = families(scrape(client))[f"{P}_counter_value"].samples
    assert len(exported) == 2  # bounded, whatever the app holds
    assert all(s.labels["counter"] not in ("secret_boss", "per_player") for s in exported)


def test_redis_down_shows_degraded_reads_breaker_and_store_down(client, writer, private_redis, settings):
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    increment(client, writer, "matches_running", 3)
    before = scrape(client)
    assert sample(before, f"{P}_redis_breaker_open") == 0
    assert sample(before, f"{P}_store_up") == 1
    private_redis.kill()
    for _ in range(settings.REDIS_BREAKER_THRESHOLD + 2):
        read = client.get("/api/v1/counter/matches_running", **writer)
        assert read.status_code == 200 and read.json()["degraded"] is True
    refused = increment(client, writer, "matches_running")
    assert refused.status_code == 503
    after = scrape(client)
    assert sample(after, f"{P}_redis_breaker_open") == 1
    assert sample(after, f"{P}_store_up") == 0
    reads = settings.REDIS_BREAKER_THRESHOLD + 2
    assert sample(after, f"{P}_degraded_reads_total") - sample(before, f"{P}_degraded_reads_total") == reads
    assert total(after, f"{P}_redis_round_trips_total", outcome="error") > total(
        before, f"{P}_redis_round_trips_total", outcome="error"
    )
    inc = {"surface": "rest", "endpoint": "counter-increment", "status": "503"}
    assert total(after, f"{P}_http_requests_total", **inc) - total(before, f"{P}_http_requests_total", **inc) == 1


def test_alert_deliveries_are_counted_by_channel_and_outcome(client, builtins):
    counter = Counter.objects.create(app=App.objects.get(slug="default"), name="boss_kills")
    threshold = Threshold.objects.create(counter=counter, value=5, level="info")
    Channel.objects.create(threshold=threshold, kind="message")
    config.cache.invalidate()
    before = scrape(client)
    live = selectors.counter_get(app_id=counter.app_id, name="boss_kills")
    assert counter_update(counter=live, amount=5, subject="").crossed == (threshold.id,)
    counters_flush()  # records the event and creates its delivery (sent after commit, by a task)
    [delivery] = Delivery.objects.filter(event__threshold=threshold)
    delivery_attempt(delivery_id=delivery.id)
    after = scrape(client)
    key = {"channel": "message", "outcome": "sent"}
    sent = sample(after, f"{P}_alert_deliveries_total", **key) - sample(before, f"{P}_alert_deliveries_total", **key)
    assert sent == 1


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_requests_served_by_the_async_handler_are_counted(async_client):
    from asgiref.sync import sync_to_async
    from django.db import connections
    from prometheus_client import REGISTRY, generate_latest

    labels = {"surface": "other", "endpoint": "healthz", "method": "GET", "status": "200"}
    before = sample(generate_latest(REGISTRY).decode(), f"{P}_http_requests_total", **labels)
    for _ in range(3):
        assert (await async_client.get("/healthz")).status_code == 200
    after = sample(generate_latest(REGISTRY).decode(), f"{P}_http_requests_total", **labels)
    # The handler's database connection lives in asgiref's thread (CONN_MAX_AGE): close it there.
    await sync_to_async(connections.close_all)()
    assert after - before == 3
