"""Redis CPU per presence script call, from Redis's own ``INFO commandstats``: the script as it was
before the ninth session (``bench/presence_script_before.lua``, the baseline) against today's
``PRESENCE_SCRIPT``, in the same run, on the same private redis-server.

    .venv/bin/python bench/presence_script_bench.py [calls per round] [rounds]

As ``bench/script_bench.py`` (alternating rounds, best and median round, redis-server's CPU per
call), for the calls a presence counter gets (docs/presence.md), each with as many live leases as
its case says, opened by the script under test (each script has its counter and leases):

- a login of a user never seen before (the seed's command as ``make bench-seed`` sends it), with
  20,000 and with 300,000 live leases: the sorted set and hashes of leases cost more as they grow;
- a heartbeat of a live lease (the count does not change: nothing written but the lease);
- a logout of a live lease without a session (every session of the user ends).

The arguments are the ones ``presence.presence_prepare`` builds for a login of the built-in
``online_players`` (no threshold, no operation log), with the bench's 3,600 s lease, so no lease
lapses during a run.
"""

import itertools
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.script_bench import PIPELINE, compare, header, private_redis
from counters import keyspace

BEFORE = (Path(__file__).resolve().parent / "presence_script_before.lua").read_text()
LEASE_MS = 3_600_000
CASES = [
    ("login, new user, 20,000 leases", "in", 20_000),
    ("login, new user, 300,000 leases", "in", 300_000),
    ("heartbeat, live lease", "hb", 20_000),
    ("logout, live lease", "out", 20_000),
]
USERS = itertools.count()


def calls_run(r: redis.Redis, sha: str, counter_id: int, op: str, users) -> float:
    """One presence call of ``op`` per user, pipelined; the round's ``usec_per_call``."""
    keys = keyspace.presence_keys(counter_id, "")
    r.config_resetstat()
    pipe = r.pipeline(transaction=False)
    for i, user in enumerate(users, 1):
        ms = int(time.time() * 1000)
        pipe.evalsha(sha, len(keys), *keys, op, ms, ms // 60000, LEASE_MS, "users", "|", "", 0, user, "", "")
        if i % PIPELINE == 0:
            pipe.execute()
    pipe.execute()
    return r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]


def main(calls: int, rounds: int) -> int:
    with private_redis() as (r, pid):
        shas = {False: r.script_load(BEFORE), True: r.script_load(keyspace.PRESENCE_SCRIPT)}
        header(calls, rounds)
        for n, (case, op, live) in enumerate(CASES):
            ids = {False: 1000 + n, True: 2000 + n}
            online: dict[bool, list[str]] = {}
            for current in (False, True):
                keys = keyspace.presence_keys(ids[current], "")
                r.evalsha(r.script_load(keyspace.HYDRATE_SCRIPT), 1, keys[0], 0, 0, 0, 0, 0, "")
                online[current] = [f"u{next(USERS)}" for _ in range(live)]
                calls_run(r, shas[current], ids[current], "in", online[current])

            def run(current: bool, op=op, ids=ids, online=online) -> float:
                if op == "in":
                    users = [f"u{next(USERS)}" for _ in range(calls)]
                elif op == "hb":
                    users = online[current][:calls]
                else:  # each logout ends a lease of its own
                    users, online[current] = online[current][:calls], online[current][calls:]
                return calls_run(r, shas[current], ids[current], op, users)

            compare(case, pid, rounds, calls, run)
            r.flushall()
        return 0


if __name__ == "__main__":
    numbers = [int(a) for a in sys.argv[1:3]]
    sys.exit(main(*(numbers + [1000, 9][len(numbers) :])))
