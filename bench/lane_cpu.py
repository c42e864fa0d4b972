"""The fast lane's own CPU per request, without HTTP: the ASGI application called in this process.

    .venv/bin/python bench/lane_cpu.py                 # every case, beside the reference
    .venv/bin/python bench/lane_cpu.py increment --profile   # cProfile of one case, top 30 by own time
    (cases: increment, get, get10, increase and getcounter (cloud functions), login: a new user_id
    per request, as make bench-seed logs in)

Each case sends its requests with ``BENCH_IN_FLIGHT`` (default 50) in flight on uvloop, as a worker
under load has them, against a private redis-server, and prints the process CPU time per request
(``time.process_time``: this process only), and beside it the private redis-server's CPU time per
request (from ``/proc``, in 10 ms ticks: a few percent). The reference
(``bench/reference.py``, one INCRBY through the same coalesced round trip) is measured in the same
run: the difference is what the lane's own work costs on top of the ASGI plumbing every request pays.
Rounds alternate between the cases so a noisy neighbour touches them alike; the best round is kept.
"""

import sys
from pathlib import Path

# This directory holds bench/profile.py, which would shadow the standard library's profile module.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import asyncio  # noqa: E402
import cProfile  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402

from bench import run  # noqa: E402

IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", "50"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def scope(method: str, path: str, key: str, query: bytes = b"", body: bytes = b"") -> dict:
    headers = [
        (b"host", b"127.0.0.1:8080"),
        (b"user-agent", b"wrk"),
        (b"authorization", f"Bearer {key}".encode()),
    ]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "_body": body,
    }


def cases(key: str) -> dict:
    names = ",".join(run.GET_BATCH_NAMES)
    return {
        "reference": ("reference", scope("POST", "/", key, body=b'{"value":1}')),
        "increment": ("lane", scope("POST", f"/api/v1/counter/{run.PLAIN}/increment", key, body=b'{"value":1}')),
        "get": ("lane", scope("GET", f"/api/v1/counter/{run.PLAIN}", key)),
        "get10": ("lane", scope("GET", "/api/v1/counters", key, query=f"names={names}".encode())),
        "increase": (
            "lane",
            scope("POST", "/api/v1/functions/increaseCounter", key, body=FUNCTION % b',"increment":1'),
        ),
        "getcounter": ("lane", scope("POST", "/api/v1/functions/getCounter", key, body=FUNCTION % b"")),
        # The seed's command as bench/seed.py sends it: a login of a user never seen before.
        "login": ("lane", scope("POST", "/api/v1/counter/online_players/increment", key, body=LOGIN)),
    }


LOGIN = b'{"user_id":"lane-cpu-%d"}'  # a new user_id per request (drive fills in a number)
FUNCTION = b'{"appId":"default","counterType":"app","counterId":"%s"%%s}' % run.PLAIN.encode()


async def drive(app, request: dict, count: int) -> list[int]:
    statuses = []
    body = request["_body"]
    numbered = body is LOGIN
    sent = itertools.count(time.time_ns())

    async def receive():
        return {"type": "http.request", "body": body % next(sent) if numbered else body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def one_client(n: int):
        for _ in range(n):
            await app(dict(request), receive, send)

    await asyncio.gather(*(one_client(count // IN_FLIGHT) for _ in range(IN_FLIGHT)))
    return statuses


def measure(loop, app, request: dict, count: int, redis_pid: int) -> tuple[float, float]:
    """This process's and Redis's CPU µs per request."""
    start, redis_start = time.process_time(), run.process_cpu_seconds(redis_pid)
    statuses = loop.run_until_complete(drive(app, request, count))
    spent, redis_spent = time.process_time() - start, run.process_cpu_seconds(redis_pid) - redis_start
    bad = [s for s in statuses if s != 200]
    if bad:
        raise SystemExit(f"{len(bad)} answers were not 200 (first: {bad[0]})")
    return spent / len(statuses) * 1e6, redis_spent / len(statuses) * 1e6


def main(argv: list[str]) -> None:
    profile = "--profile" in argv
    only = [a for a in argv if not a.startswith("--")]
    with run.in_process_store() as stores:
        from counters.models import ApiKey, App

        _, key = ApiKey.generate(app=App.objects.get(slug="default"), roles=["write", "data_view"], name="lane-cpu")
        import uvloop

        import bench.reference
        import counterproject.asgi

        apps = {"reference": bench.reference.application, "lane": counterproject.asgi.application}
        chosen = {n: c for n, c in cases(key).items() if not only or n in only or n == "reference"}
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        redis_pid = stores.redis.pid
        for app, request in chosen.values():  # warm up: snapshot, key cache, hydration
            measure(loop, apps[app], request, IN_FLIGHT * 20, redis_pid)
        if profile:
            name = only[0]
            app, request = chosen[name]
            profiler = cProfile.Profile()
            profiler.enable()
            measure(loop, apps[app], request, REQUESTS, redis_pid)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
            return
        best: dict[str, tuple[float, float]] = {}
        for _ in range(ROUNDS):
            for name, (app, request) in chosen.items():
                us = measure(loop, apps[app], request, REQUESTS, redis_pid)
                best[name] = min(best.get(name, us), us)
        print(f"load {run.load()}; {IN_FLIGHT} in flight, best of {ROUNDS} rounds of {REQUESTS}")
        print(f"{'case':<12} {'CPU us/request':>15} {'over reference':>15} {'Redis us/request':>17}")
        for name, (us, redis_us) in best.items():
            print(f"{name:<12} {us:15.1f} {us - best['reference'][0]:15.1f} {redis_us:17.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
