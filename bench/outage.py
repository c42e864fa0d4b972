"""Latency of the replies during a Redis outage, next to the healthy service measured in the same run.

The tests prove what holds whatever the machine's load (tests/test_reliability.py, tests/test_breaker.py:
statuses, the breaker opening after exactly its threshold, no request sent to Redis once it is open);
how fast the refusals are is a number for this script, which prints it:

- healthy: increments answered 200 (the baseline);
- Redis killed (kill -9): the 503s, as the client and as gunicorn's access log see them;
- Redis frozen (SIGSTOP, socket timeout 0.3 s): the 504s that waited for the timeout before the breaker
  opened, and the 503s after it.

Environment: ``BENCH_DATABASE_URL`` (a database of its own; created and migrated if missing),
``BENCH_OUTAGE_SECONDS`` (per phase, default 3), ``BENCH_OUTAGE_THREADS`` (client threads, default 4).
"""

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import DATABASE_URL, django_setup, ensure_database, load  # noqa: E402
from tests.processes import PrivateRedis, free_port, wait_until  # noqa: E402  (shared with the tests)

BIN = Path(sys.executable).parent
SECONDS = float(os.environ.get("BENCH_OUTAGE_SECONDS", "3"))
THREADS = int(os.environ.get("BENCH_OUTAGE_THREADS", "4"))
SOCKET_TIMEOUT = 0.3
ACCESS_FORMAT = "ACCESS %(s)s %(D)s %(U)s"
PATH = "/api/v1/counter/bench_0/increment"


class Web:
    """gunicorn with the production config, on ``redis_url``, logging each request's own time."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="outage-gunicorn-", suffix=".log", delete=False)  # noqa: SIM115
        env = dict(os.environ, DATABASE_URL=DATABASE_URL, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
        env |= {"DJANGO_SETTINGS_MODULE": "counterproject.settings", "GUNICORN_ACCESSLOG": "-"}
        env |= {"REDIS_SOCKET_TIMEOUT": str(SOCKET_TIMEOUT), "REDIS_CONNECT_TIMEOUT": str(SOCKET_TIMEOUT)}
        env |= {"REDIS_BREAKER_RESET_SECONDS": "600"}  # no probe during a phase
        args = [str(BIN / "gunicorn"), "counterproject.asgi", "-c", str(ROOT / "gunicorn.conf.py")]
        args += ["--bind", f"127.0.0.1:{self.port}", "--access-logformat", ACCESS_FORMAT]
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=self.log)
        wait_until(lambda: requests.get(f"{self.url}/healthz", timeout=1).ok, timeout=60, what="gunicorn")

    def server_seconds(self, status: int) -> list[float]:
        """gunicorn's own time for each increment answered with ``status``."""
        lines = Path(self.log.name).read_text().splitlines()
        return [int(f[2]) / 1e6 for f in (line.split() for line in lines) if f[:2] == ["ACCESS", str(status)]]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        Path(self.log.name).unlink(missing_ok=True)


def traffic(web: Web, key: str, seconds: float) -> list[tuple[int, float]]:
    """``THREADS`` clients posting increments for ``seconds``: (status, seconds) per reply."""
    replies: list[tuple[int, float]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run() -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {key}"
            while time.monotonic() < deadline:
                sent = time.monotonic()
                status = session.post(f"{web.url}{PATH}", json={}, timeout=30).status_code
                with lock:
                    replies.append((status, time.monotonic() - sent))

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def row(label: str, seconds: list[float]) -> str:
    if not seconds:
        return f"{label:<44} {'-':>6}"
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    ms = [1000 * x for x in (statistics.median(ordered), p99, ordered[-1])]
    return f"{label:<44} {len(ordered):>6} {ms[0]:>9.2f} {ms[1]:>9.2f} {ms[2]:>9.2f}"


def of(replies: list[tuple[int, float]], status: int) -> list[float]:
    return [seconds for s, seconds in replies if s == status]


def main() -> int:
    ensure_database(DATABASE_URL)
    rows = []
    killed = PrivateRedis()
    key = django_setup(killed.url)
    web = Web(killed.url)
    try:
        traffic(web, key, 1.0)  # warm-up: hydrated, scripts loaded, connections open
        warm_up = len(web.server_seconds(200))
        healthy = traffic(web, key, SECONDS)
        rows.append(row("healthy: 200 (client)", of(healthy, 200)))
        rows.append(row("healthy: 200 (gunicorn)", web.server_seconds(200)[warm_up:]))
        killed.kill()
        down = traffic(web, key, SECONDS)
        rows.append(row("redis killed: 503 (client)", of(down, 503)))
        rows.append(row("redis killed: 503 (gunicorn)", web.server_seconds(503)))
    finally:
        web.stop()
        killed.close()

    frozen = PrivateRedis()
    web = Web(frozen.url)
    try:
        traffic(web, key, 1.0)
        frozen.freeze()
        hung = traffic(web, key, SECONDS)
        rows.append(row("redis frozen: 504, waited for the timeout", of(hung, 504)))
        rows.append(row("redis frozen: 503, breaker open (client)", of(hung, 503)))
        rows.append(row("redis frozen: 503, breaker open (gunicorn)", web.server_seconds(503)))
    finally:
        frozen.thaw()
        web.stop()
        frozen.close()

    print(
        f"\nincrements during a Redis outage ({THREADS} client threads, {SECONDS:g} s per phase, "
        f"socket timeout {SOCKET_TIMEOUT} s); load average {load()}"
    )
    print(f"{'':<44} {'count':>6} {'median ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for line in rows:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
