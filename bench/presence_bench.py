"""make bench (part): presence heartbeats and reads next to the plain increment, in the same run.

Same set-up as ``bench/run.py`` (private redis-server, production gunicorn config, server and load
generator on different cores). For each endpoint, wrk at 16 and 64 connections: requests/s,
p50/p99 and gunicorn CPU per request. The presence counter is the built-in ``online_players``;
the plain one a bench counter without period. The heartbeat pool (10,000 users per wrk thread)
keeps the number of leases steady, so a read counts about as many leases as a live game's.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import (  # one set-up, shared with the main bench
    CLIENT_CPUS,
    DATABASE_URL,
    EXTRA_COUNTERS,
    REDIS_URL,
    SERVER_CPUS,
    WEB_URL,
    Processes,
    Scenario,
    django_setup,
    ensure_database,
    load,
    ms,
    wrk,
)

SECONDS = int(os.environ.get("BENCH_PRESENCE_SECONDS", "10"))
CONNECTIONS = (16, 64)
PLAIN = EXTRA_COUNTERS[0]
HEARTBEAT = "/api/v1/counter/online_players/heartbeat"
SCENARIOS = [
    Scenario("increment", "plain increment", "POST", f"/api/v1/counter/{PLAIN}/increment", "increment"),
    Scenario("heartbeat", "presence heartbeat (1 user)", "POST", HEARTBEAT, "heartbeat"),
    Scenario("heartbeats", "presence heartbeat (100 users)", "POST", HEARTBEAT, "heartbeats"),
    Scenario("get", "plain GET", "GET", f"/api/v1/counter/{PLAIN}", "none"),
    Scenario("presence_get", "presence GET (sweeps, counts)", "GET", "/api/v1/counter/online_players", "none"),
]


def main() -> int:
    ensure_database(DATABASE_URL)
    processes = Processes()
    try:
        processes.start_redis()
        REDIS_URL[0] = processes.redis_url
        key = django_setup(processes.redis_url)
        processes.start_web("service")
        url = WEB_URL["service"]
        print(f"presence bench: server cores {SERVER_CPUS}, client cores {CLIENT_CPUS}, {SECONDS}s a run")
        print(f"presence bench: load average before {load()}")
        for scenario in SCENARIOS:
            wrk(scenario, key, connections=16, seconds=2)
        for scenario in SCENARIOS:
            for connections in CONNECTIONS:
                scenario.runs[connections] = wrk(scenario, key, connections=connections, seconds=SECONDS)
        import requests

        live = requests.get(f"{url}/api/v1/counter/online_players", timeout=10).json()["value"]
        print(f"presence bench: {live} live leases at the end; load average after {load()}")
    finally:
        processes.stop()

    head = f"{'endpoint':32} {'c16 req/s':>9} {'p50':>6} {'p99':>6} | {'c64 req/s':>9} {'p50':>6} {'p99':>6}"
    head += f" | {'CPU ms':>6} {'x incr':>6} {'script µs':>9}"
    print()
    print(head + "   (latencies in ms)")
    print("-" * len(head))
    base_cpu = max(SCENARIOS[0].runs.values(), key=lambda r: r["rps"])["cpu_ms"]
    for scenario in SCENARIOS:
        c16, c64 = scenario.runs[16], scenario.runs[64]
        peak = max(c16, c64, key=lambda r: r["rps"])
        non2xx, errors = sum(r["non2xx"] for r in (c16, c64)), sum(r["errors"] for r in (c16, c64))
        line = f"{scenario.label:32} {c16['rps']:>9.0f} {ms(c16['p50_us']):>6} {ms(c16['p99_us']):>6}"
        line += f" | {c64['rps']:>9.0f} {ms(c64['p50_us']):>6} {ms(c64['p99_us']):>6}"
        line += f" | {peak['cpu_ms']:>6.2f} {peak['cpu_ms'] / base_cpu:>6.2f} {peak['script_us']:>9.1f}"
        print(line + (f"   {non2xx} non-2xx, {errors} socket errors/timeouts" if non2xx or errors else ""))
    print("CPU ms: gunicorn CPU per request at the better of the two; x incr: against the plain increment;")
    print("script µs: Redis CPU per script call (INFO commandstats; a plain GET calls none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
