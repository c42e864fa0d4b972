"""Redis CPU per update script call, from Redis's own ``INFO commandstats``: the script as it was
before the store redesign (``bench/update_script_before.lua``, the baseline) against today's
``UPDATE_SCRIPT``, in the same run, on the same private redis-server.

    .venv/bin/python bench/script_bench.py [calls per round] [rounds]

Each case runs the baseline and the current script in alternating rounds (``CONFIG RESETSTAT``
before each, EVALSHA's ``usec_per_call`` after). Redis times a command by the wall clock, so on a
loaded machine a round in which redis-server lost its core reads high: the table shows the best
round (the least disturbed) and the median, and beside them redis-server's own CPU time
(``/proc``) per call over all rounds, which includes reading and answering the commands. The
arguments are the ones ``_prepare_update`` builds for the counter of each case; a flush
(``MOVE_PENDING_SCRIPT`` and ``DERIVE_SCRIPT`` for the current script, the old one's RENAME for
the baseline) ends each round, as the flusher would.
"""

import contextlib
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import CLIENT_CPUS, free_port, process_cpu_seconds, wait_until
from counters import keyspace

BEFORE = (Path(__file__).resolve().parent / "update_script_before.lua").read_text()
PIPELINE = 200
PERIOD = "2026-12-01"
HIGH = keyspace.MAX_SAFE_VALUE
NEW_MEMBERS = itertools.count(1)


def case_args(case: str, i: int, ms: int) -> tuple[str, str, list]:
    """(subject, member, args) of the i-th update of a case."""
    minute = ms // 60000
    if case == "total_games_played +1":
        return "", "", ["add", 1, f"{PERIOD}|", "", 0, HIGH, 0, ms, minute, 1, ""]
    if case == "daily_active_users, new member":
        member = f"u{next(NEW_MEMBERS)}"  # never seen in any round
        return "", member, ["add", 1, f"{PERIOD}|", member, 0, HIGH, 0, ms, minute, 1, ""]
    if case == "daily_active_users, duplicate":
        return "", "u0", ["add", 1, f"{PERIOD}|", "u0", 0, HIGH, 0, ms, minute, 1, ""]
    if case == "per-player score, 1000 players":
        subject = f"p{i % 1000}"
        return subject, "", ["add", 3, f"{PERIOD}|{subject}", "", 0, HIGH, 0, ms, minute, 0, ""]
    raise ValueError(case)


CASES = [
    "total_games_played +1",
    "daily_active_users, new member",
    "daily_active_users, duplicate",
    "per-player score, 1000 players",
]


def hydrate(r: redis.Redis, counter_id: int, subject: str, *, current: bool) -> None:
    key = keyspace.value_key(counter_id, PERIOD, subject)
    if current:
        r.evalsha(r.script_load(keyspace.HYDRATE_SCRIPT), 1, key, 0, 0, 0, 0, 0, "")
    else:
        r.hset(key, mapping={"v": 0, "peak": 0, "ops": 0, "upd": 0})


def flush(r: redis.Redis, counter_id: int, *, current: bool, serial: int) -> None:
    batch_id = f"bench-{serial}"
    keys = [
        keyspace.pending_key(counter_id),
        keyspace.oplog_key(counter_id),
        keyspace.batches_key(counter_id),
        keyspace.batch_key(counter_id, batch_id),
        keyspace.batch_log_key(counter_id, batch_id),
    ]
    if current:
        r.eval(keyspace.MOVE_PENDING_SCRIPT, len(keys), *keys, batch_id)
        marks = [f for f, v in r.hgetall(keys[3]).items() if f.startswith(b"c|") and v == b"1"]
        for start in range(0, len(marks), 500):
            chunk = marks[start : start + 500]
            values = [keyspace.value_key_of_mark(counter_id, mark) for mark in chunk]
            r.eval(keyspace.DERIVE_SCRIPT, 1 + len(chunk), keys[3], *values, *chunk)
    else:
        r.delete(keys[0])
    r.delete(*keys[2:])


def run_round(r: redis.Redis, sha: str, case: str, counter_id: int, calls: int, *, current: bool) -> float:
    r.config_resetstat()
    pipe = r.pipeline(transaction=False)
    for i in range(calls):
        subject, _member, args = case_args(case, i, int(time.time() * 1000))
        keys = keyspace.update_keys(counter_id, PERIOD, subject)
        pipe.evalsha(sha, len(keys), *keys, *args)
        if (i + 1) % PIPELINE == 0:
            pipe.execute()
    pipe.execute()
    usec = r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
    flush(r, counter_id, current=current, serial=counter_id)
    return usec


@contextlib.contextmanager
def private_redis():
    """A redis-server of its own on the client's cores (nothing kept on disk): ``(client, pid)``."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="script-bench-")
    args = ["taskset", "-c", CLIENT_CPUS, "redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    server = subprocess.Popen(
        [*args, "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        r = redis.Redis(port=port)
        wait_until(r.ping, timeout=30, what="redis-server")
        yield r, server.pid
    finally:
        server.kill()
        server.wait()


def header(calls: int, rounds: int) -> None:
    print(f"{calls} calls per round, {rounds} rounds each; µs per EVALSHA (INFO commandstats)")
    print(f"{'':34} {'best round':^22} | {'median round':^15} | {'redis-server CPU':^15}")
    pair = f"{'before':>7} {'now':>7}"
    print(f"{'case':34} {pair} {'ratio':>6} | {pair} | {pair}")


def compare(case: str, pid: int, rounds: int, calls: int, run) -> None:
    """``run(current)`` (the baseline's round, then the current script's, ``rounds`` times), which
    returns the round's ``usec_per_call``: one row of the table."""
    results: dict[bool, list[float]] = {False: [], True: []}
    cpu = {False: 0.0, True: 0.0}
    for _ in range(rounds):
        for current in (False, True):
            started = process_cpu_seconds(pid)
            results[current].append(run(current))
            cpu[current] += process_cpu_seconds(pid) - started
    best = {c: min(results[c]) for c in results}
    median = {c: statistics.median(results[c]) for c in results}
    per_call = {c: cpu[c] * 1e6 / (calls * rounds) for c in cpu}
    print(
        f"{case:34} {best[False]:7.2f} {best[True]:7.2f} {best[False] / best[True]:5.1f}x |"
        f" {median[False]:7.2f} {median[True]:7.2f} | {per_call[False]:7.1f} {per_call[True]:7.1f}"
    )


def main(calls: int, rounds: int) -> int:
    with private_redis() as (r, pid):
        shas = {False: r.script_load(BEFORE), True: r.script_load(keyspace.UPDATE_SCRIPT)}
        header(calls, rounds)
        for n, case in enumerate(CASES):
            ids = {False: 1000 + n, True: 2000 + n}
            for current in (False, True):
                for i in range(1000):
                    hydrate(r, ids[current], case_args(case, i, 0)[0], current=current)
                run_round(r, shas[current], case, ids[current], 200, current=current)  # warm
            compare(
                case,
                pid,
                rounds,
                calls,
                lambda current, case=case, ids=ids: run_round(
                    r, shas[current], case, ids[current], calls, current=current
                ),
            )
        return 0


if __name__ == "__main__":
    numbers = [int(a) for a in sys.argv[1:3]]
    sys.exit(main(*(numbers + [500, 21][len(numbers) :])))
