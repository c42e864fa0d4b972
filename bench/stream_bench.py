"""Server-sent events: 1,000 concurrent streams on one web worker, its memory, and the latency from an
increment to the event.

Starts a private redis-server and the service (production ``gunicorn.conf.py``, one uvicorn worker,
``GUNICORN_WORKER_CONNECTIONS`` raised to 4,000 so that 1,000 streams and the requests beside them
fit) against the bench database (``BENCH_DATABASE_URL``, as ``bench/run.py``), the worker pinned to
``BENCH_SERVER_CPUS`` and this client and Redis to ``BENCH_CLIENT_CPUS``. Then, ``--rounds`` times:
opens ``--streams`` streams (asyncio sockets in this process) and waits for each one's current
values; sends ``--increments`` increments one at a time (300 ms apart, beyond the throttle) and
times, for each, when every stream saw the new value (first, median, 99th percentile, last);
closes every stream and waits until the worker's gauge and Redis's shard channels are back to 0.
The worker's RSS is read from ``/proc`` before the first round, with the streams open, and after
each round (closed): flat across rounds means a stream leaves nothing behind. With ``--browser``,
Debian's Chromium (Playwright) opens the live board while the streams are open and the same
increments are timed until the board shows them. Prints a table; asserts nothing about speed.

    python bench/stream_bench.py [--streams 1000] [--rounds 3] [--increments 20] [--browser]
"""

import argparse
import asyncio
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GUNICORN_WORKER_CONNECTIONS", "4000")
os.environ.setdefault("BOARD_POLL_MILLISECONDS", "600000")
from bench.run import DATABASE_URL, WEB_PID, WEB_URL, Processes, django_setup, ensure_database, load  # noqa: E402
from tests.processes import children, wait_until  # noqa: E402

EVENT = re.compile(rb'data: \{"name":"([^"]+)","value":(-?\d+)[^\n]*\}\n\n')
# Two of bench/run.py's plain public counters (online_players is a presence counter: logins, not increments).
NAMES = "bench_0,bench_1"
TARGET = "bench_0"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Client:
    """One stream on a raw socket: the latest value per name and when it arrived."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.seen_at: dict[tuple[str, int], float] = {}
        self.ready = asyncio.Event()
        self.writer = None
        self.task = None

    async def open(self, host: str, port: int, key: str) -> None:
        reader, self.writer = await asyncio.open_connection(host, port)
        request = (
            f"GET /api/v1/stream?names={NAMES} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
        )
        self.writer.write(request.encode())
        self.task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader) -> None:
        buffer = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            now = time.perf_counter()
            buffer += data
            end = 0
            for match in EVENT.finditer(buffer):
                name, value = match.group(1).decode(), int(match.group(2))
                self.values[name] = value
                self.seen_at.setdefault((name, value), now)
                end = match.end()
            buffer = buffer[end:]
            if len(self.values) == 2:
                self.ready.set()

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class ClientLoop:
    """The streams' event loop, in a thread of its own: the main thread sends increments and drives
    the browser (Playwright's sync API refuses to run inside an event loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 180):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def open_all(clients: list[Client], url: str, key: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    for i in range(0, len(clients), 100):  # in waves, so the listen backlog never overflows
        await asyncio.gather(*(c.open(host, int(port), key) for c in clients[i : i + 100]))
    await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in clients)), 120)


async def close_all(clients: list[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


def one_round(loop: ClientLoop, url: str, key: str, streams: int, increments: int, page=None) -> dict:
    clients = [Client() for _ in range(streams)]
    opened = time.perf_counter()
    loop.run(open_all(clients, url, key))
    worker = WEB_WORKER[0]
    result = {
        "open_s": time.perf_counter() - opened,
        "rss_open": rss_kib(worker),
        "gauge_open": metric(url, STREAMS_OPEN),
    }
    session = requests.Session()
    latencies, firsts, medians, p99s, browser = [], [], [], [], []
    for _ in range(increments):
        time.sleep(0.3)
        browser_sent = page.evaluate("Date.now()") if page is not None else None
        sent = time.perf_counter()
        reply = session.post(
            f"{url}/api/v1/counter/{TARGET}/increment", json={}, headers={"Authorization": f"Bearer {key}"}
        )
        new = reply.json()["current_value"]
        deadline = time.perf_counter() + 30
        while any(c.values.get(TARGET) != new for c in clients) and time.perf_counter() < deadline:
            time.sleep(0.002)
        seen = [c.seen_at.get((TARGET, new), float("inf")) - sent for c in clients]
        latencies += seen
        firsts.append(min(seen))
        medians.append(statistics.median(seen))
        p99s.append(percentile(seen, 0.99))
        if page is not None:
            page.wait_for_function(
                f"document.querySelector('.counter[data-name=\"{TARGET}\"] .value').dataset.value === '{new}'"
            )
            browser.append(page.evaluate("window.lastChangeAt") - browser_sent)
    result.update(
        first_ms=statistics.median(firsts) * 1000,
        median_ms=statistics.median(medians) * 1000,
        p99_ms=statistics.median(p99s) * 1000,
        max_ms=max(latencies) * 1000,
        browser_ms=statistics.median(browser) if browser else None,
        browser_max_ms=max(browser) if browser else None,
    )
    loop.run(close_all(clients))
    if page is None:
        closed(url, result)
    return result


def closed(url: str, result: dict) -> None:
    """Wait until the worker has no stream and Redis no channel left, then read the worker's RSS."""
    wait_until(lambda: metric(url, STREAMS_OPEN) == 0, timeout=60, what="streams closed")
    wait_until(lambda: not REDIS[0].execute_command("PUBSUB", "SHARDCHANNELS"), timeout=60, what="channels gone")
    result["rss_closed"] = rss_kib(WEB_WORKER[0])


STREAMS_OPEN = "counterservice_streams_open"
WEB_WORKER: list[int] = []
REDIS: list = []


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--increments", type=int, default=20)
    parser.add_argument("--browser", action="store_true")
    args = parser.parse_args()
    ensure_database(DATABASE_URL)
    processes = Processes()
    try:
        processes.start_redis()
        import redis

        REDIS.append(redis.Redis.from_url(processes.redis_url))
        key = django_setup(processes.redis_url)
        processes.start_web("service")
        url = WEB_URL["service"]
        wait_until(lambda: children(WEB_PID["service"]), what="the worker")
        WEB_WORKER.append(children(WEB_PID["service"])[0])
        # Warm up: config snapshot, hydration, the hub's first connection.
        loop = ClientLoop()
        one_round(loop, url, key, 10, 2)
        rss_before = rss_kib(WEB_WORKER[0])
        print(f"stream bench: {args.streams} streams x {args.rounds} rounds, load {load()}", flush=True)
        rounds = []
        for number in range(args.rounds):
            if args.browser and number == args.rounds - 1:
                rounds.append(with_browser(loop, url, key, args))
            else:
                rounds.append(one_round(loop, url, key, args.streams, args.increments))
            print(f"stream bench: round {number + 1} done, load {load()}", flush=True)
        print()
        print(f"worker RSS before any stream: {rss_before / 1024:.1f} MiB")
        header = "round | open s | gauge | RSS open MiB | RSS closed MiB | first ms | median ms | p99 ms | max ms"
        print(header + " | browser ms (median / max)")
        for i, r in enumerate(rounds, 1):
            browser = f"{r['browser_ms']:.0f} / {r['browser_max_ms']:.0f}" if r["browser_ms"] is not None else "-"
            print(
                f"{i} | {r['open_s']:.1f} | {r['gauge_open']:.0f} | {r['rss_open'] / 1024:.1f} | "
                f"{r['rss_closed'] / 1024:.1f} | {r['first_ms']:.1f} | {r['median_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['max_ms']:.1f} | {browser}"
            )
        print(f"load after: {load()}")
    finally:
        processes.stop()
    return 0


def with_browser(loop: ClientLoop, url: str, key: str, args) -> dict:
    from tests.browser import chromium_page

    with chromium_page() as page:
        page.goto(f"{url}/board/")
        page.wait_for_function("document.body.dataset.transport === 'stream'")
        page.wait_for_function("document.getElementById('status').textContent === 'live · streaming'")
        # When the board's value element last changed (the browser's clock, as ``browser_sent``).
        page.evaluate(
            """() => new MutationObserver(() => { window.lastChangeAt = Date.now(); })
                 .observe(document.querySelector('.counter[data-name="{TARGET}"] .value'),
                          {attributes: true})""".replace("{TARGET}", TARGET)
        )
        result = one_round(loop, url, key, args.streams, args.increments, page)
    closed(url, result)  # the browser's own stream closed with it
    return result


if __name__ == "__main__":
    raise SystemExit(main())
