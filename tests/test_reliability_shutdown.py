"""Graceful shutdown of gunicorn and the Celery worker, a worker killed -9 mid-flush, and the soak script.

Requests and flushes are held "in flight" by a real PostgreSQL lock taken on a connection of the
test's own, so no test-only code path is needed in the service.
"""

import contextlib
import signal
import socket
import subprocess
import sys
import threading

import orjson
import psycopg
import pytest
import requests

from counterproject.celery import app as celery_app
from counters import keyspace
from counters.models import Counter, CounterValue

from . import processes
from .processes import ROOT, CeleryWorker, Gunicorn, service_env, wait_until

# A restarted worker takes over from a killed one as soon as the dead one's flush lock expires.
WORKER_ENV = {"COUNTER_FLUSH_LOCK_SECONDS": "1"}

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("daily_far_from_midnight")]


@contextlib.contextmanager
def values_table_locked():
    """Hold an exclusive lock on the values table: whatever reads or writes it waits."""
    url = processes.test_database_url()
    with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as watcher:
        locker.execute("LOCK TABLE counters_countervalue IN ACCESS EXCLUSIVE MODE")
        try:
            yield watcher
        finally:
            locker.rollback()


def waiting_on_locks(watcher: psycopg.Connection) -> int:
    """Sessions blocked on a lock (asked on an autocommit connection: activity is snapshotted per transaction)."""
    row = watcher.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return row[0]


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_lets_gunicorn_finish_a_request_in_flight_and_serve_no_new_one(builtins):
    web = Gunicorn(workers=1)
    replies: list[requests.Response] = []
    try:
        [worker] = processes.children(web.process.pid)
        assert processes.accepts_on(worker, web.port)
        with values_table_locked() as watcher:
            # A value not in Redis yet is hydrated from PostgreSQL: this request waits on the lock.
            url = f"{web.url}/api/v1/counter/matches_running"
            thread = threading.Thread(target=lambda: replies.append(requests.get(url, timeout=60)))
            thread.start()
            wait_until(lambda: waiting_on_locks(watcher) == 1, what="a request in flight")
            web.process.send_signal(signal.SIGTERM)
            wait_until(lambda: not processes.accepts_on(worker, web.port), what="the worker to stop accepting")
            # The worker closed its listening socket as it began shutting down: a newcomer is refused
            # (were a listening socket still held, its handshake would complete, unserved, and be reset).
            try:
                newcomer = socket.create_connection(("127.0.0.1", web.port), timeout=60)
                newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            except ConnectionRefusedError:
                newcomer = None
            assert web.process.poll() is None  # still finishing what it accepted
        thread.join(timeout=30)
        answer = b""
        if newcomer is not None:
            with newcomer:
                try:
                    answer = newcomer.recv(1024)
                except ConnectionResetError:
                    answer = b""
        assert web.process.wait(timeout=30) == 0
    finally:
        web.stop()
    assert [r.status_code for r in replies] == [200]
    assert replies[0].json() == {"name": "matches_running", "value": 0, "last_updated": None}
    assert answer == b""  # never served
    assert refuses_connections(web.port)


def increment(client, writer, name: str, times: int, **body) -> None:
    for _ in range(times):
        reply = client.post(f"/api/v1/counter/{name}/increment", body, content_type="application/json", **writer)
        assert reply.status_code == 200


def flush_task() -> None:
    celery_app.send_task("counters.flush")


@pytest.fixture
def broker():
    celery_app.control.purge()
    yield
    celery_app.control.purge()


def test_sigterm_lets_the_celery_worker_finish_a_running_flush(client, writer, store, broker):
    increment(client, writer, "matches_running", 12)
    counter = Counter.objects.get(name="matches_running")
    worker = CeleryWorker(env=WORKER_ENV)
    try:
        with values_table_locked() as locker:
            flush_task()
            wait_until(lambda: waiting_on_locks(locker) == 1, what="the flush to be in flight")
            worker.process.send_signal(signal.SIGTERM)
            with pytest.raises(subprocess.TimeoutExpired):
                worker.process.wait(timeout=1)  # warm shutdown: it waits for the flush
        assert worker.process.wait(timeout=30) == 0
    finally:
        worker.close()
    assert CounterValue.objects.get(counter=counter).value == 12
    assert store.smembers(keyspace.batches_key(counter.id)) == set()


@pytest.mark.parametrize("moment", ["before_commit", "after_commit"])
def test_a_celery_worker_killed_mid_flush_then_restarted_gives_exact_values(
    client, writer, store, broker, plain_flushed_first, moment
):
    increment(client, writer, "matches_running", 12)
    increment(client, writer, "daily_active_users", 1, user_id="u1")
    counter = Counter.objects.get(name="matches_running")
    if moment == "before_commit":
        worker = CeleryWorker(env=WORKER_ENV)
        try:
            with values_table_locked() as locker:
                flush_task()
                wait_until(lambda: waiting_on_locks(locker) == 1, what="the flush to be in flight")
                worker.kill_all()
        finally:
            worker.close()
        assert not CounterValue.objects.filter(counter=counter).exists()
    else:
        # The pool process kills itself -9 right after the commit, before Redis forgets the batch.
        worker = CeleryWorker(env={**WORKER_ENV, "COUNTER_TEST_CRASH_POINT": "after_commit"})
        try:
            flush_task()
            wait_until(lambda: "signal 9" in worker.output(), what="the pool process to die mid-flush")
            worker.kill_all()
        finally:
            worker.close()
        assert CounterValue.objects.get(counter=counter).value == 12
    assert len(store.smembers(keyspace.batches_key(counter.id))) == 1  # left behind by the dead flush

    increment(client, writer, "matches_running", 3)
    worker = CeleryWorker(env=WORKER_ENV)
    try:

        def flushed() -> bool:
            flush_task()
            return not store.smembers(keyspace.batches_key(counter.id)) and not store.exists(
                keyspace.pending_key(counter.id)
            )

        wait_until(flushed, timeout=20, interval=0.5, what="a flush by the restarted worker")
    finally:
        worker.close()
    assert CounterValue.objects.get(counter=counter).value == 15
    assert CounterValue.objects.get(counter__name="daily_active_users").value == 1
    assert client.get("/api/v1/counter/matches_running").json()["value"] == 15


SHORT_SOAK = ("--duration", "6", "--warmup", "2", "--sample-every", "1", "--clients", "2", "--rotate-every", "2")


def run_short_soak(*args: str, **env: str) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "bench/soak.py", *SHORT_SOAK, *args],
        cwd=ROOT,
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run


def test_the_soak_script_runs_and_reports_every_process(builtins):
    run = run_short_soak()
    summary = orjson.loads(run.stdout.split("SUMMARY ", 1)[1])
    kinds = {name.split(":")[0].rsplit("-", 1)[0] for name in summary["processes"]}
    assert kinds == {"web", "worker", "beat"}
    assert sum(1 for name in summary["processes"] if name.startswith("web-")) == 3  # master + 2 workers
    assert all(p["rss_end_kib"] > 0 for p in summary["processes"].values())
    statuses = {int(k): v for k, v in summary["statuses"].items()}
    assert statuses[200] > 50 and statuses[200] >= 0.95 * summary["requests"]
    assert "slope KiB/min" in run.stdout


def test_a_traced_soak_reports_what_grows_inside_each_web_worker_and_pool_process(builtins, tmp_path):
    run = run_short_soak("--trace-dir", str(tmp_path), MEM_TRACE_WARMUP="1", MEM_TRACE_EVERY="1")
    reports = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.txt"))
    assert reports == ["celery", "web", "web"], reports
    for path in tmp_path.glob("*.txt"):
        header, *rows = [line.split() for line in path.read_text().splitlines()]
        assert header[:2] == ["minutes", "rss_kib"] and len(rows) >= 2, path.read_text()
        values = dict(zip(header, rows[-1], strict=True))
        anon, file = int(values["rss_anon_kib"]), int(values["rss_file_kib"])
        assert anon > 0 and file > 0 and anon + file <= int(values["rss_kib"])  # the rest is shared memory
        assert int(values["py_blocks"]) > 0 and int(values["pymalloc_arenas"]) > 0
        assert int(values["malloc_used_kib"]) > 0
    table = run.stdout.split("per-process reports (bench/tracesummary.py):", 1)[1]
    assert table.count("  rss_kib ") == 3 and table.count("  pymalloc_arenas ") == 3
