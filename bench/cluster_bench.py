"""The update script on one Redis against a Redis Cluster of 3 primaries (+ 3 replicas), same run.

    .venv/bin/python bench/cluster_bench.py [seconds per run] [client processes] [rounds]

Each run drives ``UPDATE_SCRIPT`` (``total_games_played``-like: +1, no member, no threshold) over
3,000 counters, from ``client processes`` Python processes, each sending pipelines of 200 EVALSHA
(on the cluster: one pipeline per primary, each update routed by its counter's slot, as the fast
lane's coalescers do). Single Redis and cluster alternate for ``rounds`` rounds. Printed per run:
updates/s, and the Redis CPU per update (the redis-servers' own CPU time from ``/proc``, primaries
and replicas, divided by the updates) — the figure a capacity plan divides a core by, which does not
depend on how loaded the machine is as much as the throughput does.

Two more cases drive one hot counter on the cluster: unsplit (every update on one primary), and
split over ``HOT_SHARDS`` shards (docs/splitting.md). For those the busiest primary's share of the
primaries' CPU says how far the load spread: 100 % on one node unsplit.
"""

import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import process_cpu_seconds  # noqa: E402
from counters import keyspace  # noqa: E402
from tests.processes import PrivateCluster, free_port, wait_until  # noqa: E402

COUNTERS = 3000
PIPELINE = 200
HOT_SHARDS = 6
PERIOD = "2026-12-01"


def args_of(ms: int) -> list:
    return ["add", 1, f"{PERIOD}|", "", 0, keyspace.MAX_SAFE_VALUE, 0, ms, ms // 60000, 1, ""]


def hydrate(r: redis.Redis, counter_ids) -> None:
    pipe = r.pipeline(transaction=False)
    for cid in counter_ids:
        pipe.eval(keyspace.HYDRATE_SCRIPT, 1, keyspace.value_key(cid, PERIOD, ""), 0, 0, 0, 0, 0, "")
    pipe.execute()


def client(ports_by_counter: dict[int, int], seconds: float, start_at: float, out) -> None:
    """Send pipelines of updates until ``seconds`` have passed; put the number of updates applied."""
    by_port: dict[int, list[int]] = {}
    for cid, port in ports_by_counter.items():
        by_port.setdefault(port, []).append(cid)
    conns = {port: redis.Redis(port=port) for port in by_port}
    sha = {port: conns[port].script_load(keyspace.UPDATE_SCRIPT) for port in by_port}
    position = dict.fromkeys(by_port, os.getpid() % 97)
    done = 0
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = start_at + seconds
    while time.time() < deadline:
        ms = int(time.time() * 1000)
        for port, cids in by_port.items():
            pipe = conns[port].pipeline(transaction=False)
            share = max(1, PIPELINE // len(by_port))
            for _ in range(share):
                cid = cids[position[port] % len(cids)]
                position[port] += 1
                pipe.execute_command("EVALSHA", sha[port], 6, *keyspace.update_keys(cid, PERIOD, ""), *args_of(ms))
            done += sum(1 for reply in pipe.execute() if reply[0] == b"OK")
    out.put(done)


def run(
    ports_by_counter: dict[int, int], pids: list[int], seconds: float, clients: int, primaries: list[int]
) -> tuple[float, float, float, float]:
    """(updates/s, Redis CPU µs per update: all servers, primaries only, the busiest primary's share
    of the primaries' CPU) of one run."""
    queue = multiprocessing.Queue()
    start_at = time.time() + 0.5
    procs = [
        multiprocessing.Process(target=client, args=(ports_by_counter, seconds, start_at, queue))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    before = {pid: process_cpu_seconds(pid) for pid in pids}
    updates = sum(queue.get() for _ in procs)
    spent = {pid: process_cpu_seconds(pid) - before[pid] for pid in pids}
    for proc in procs:
        proc.join()
    per = 1e6 / max(updates, 1)
    on_primaries = sum(spent[pid] for pid in primaries)
    busiest = max(spent[pid] for pid in primaries) / on_primaries if on_primaries else 1.0
    return updates / seconds, sum(spent.values()) * per, on_primaries * per, busiest


def main(seconds: float, clients: int, rounds: int) -> int:
    single_port = free_port()
    single_dir = tempfile.mkdtemp(prefix="bench-redis-")
    single = subprocess.Popen(
        ["redis-server", "--port", str(single_port), "--bind", "127.0.0.1", "--save", "", "--dir", single_dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cluster = PrivateCluster()
    try:
        wait_until(lambda: redis.Redis(port=single_port).ping(), what="redis-server")
        counter_ids = list(range(1, COUNTERS + 1))
        hydrate(redis.Redis(port=single_port), counter_ids)
        on_cluster = {cid: cluster.port_of_key(keyspace.pending_key(cid)) for cid in counter_ids}
        for port in set(on_cluster.values()):
            hydrate(redis.Redis(port=port), [cid for cid, p in on_cluster.items() if p == port])
        primary_pids = [cluster.processes[port].pid for port in cluster.primaries()]
        # One hot counter (id 1), unsplit and split: its shards' units (keyspace.unit) where their
        # slots put them.
        hot = {
            keyspace.unit(1, k): cluster.port_of_key(keyspace.pending_key(keyspace.unit(1, k)))
            for k in range(HOT_SHARDS)
        }
        for port in set(hot.values()):
            hydrate(redis.Redis(port=port), [unit for unit, p in hot.items() if p == port and unit != 1])
        all_pids = [p.pid for p in cluster.processes.values()]
        cases = {
            "single Redis": ({cid: single_port for cid in counter_ids}, [single.pid], [single.pid]),
            "cluster, 3 primaries": (on_cluster, all_pids, primary_pids),
            "cluster, 1 hot counter": ({1: hot[1]}, all_pids, primary_pids),
            f"  same, {HOT_SHARDS} shards": (hot, all_pids, primary_pids),
        }
        results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, (ports, pids, primaries) in cases.items():
                results[name].append(run(ports, pids, seconds, clients, primaries))
        print(f"cluster_bench: {clients} client processes, {seconds:.0f}s a run, {rounds} rounds; load {load()}")
        print(f"hot counter: {HOT_SHARDS} shards on primaries {sorted(set(hot.values()))} (ports)")
        print(
            f"{'store':22} {'updates/s (median)':>19} {'best':>8}   Redis CPU µs/update: all, primaries;"
            " busiest primary's share"
        )
        for name, rows in results.items():
            rates = [row[0] for row in rows]
            cpu, primary_cpu, busiest = (statistics.median(row[i] for row in rows) for i in (1, 2, 3))
            print(
                f"{name:22} {statistics.median(rates):19,.0f} {max(rates):8,.0f} {cpu:25.1f} {primary_cpu:10.1f}"
                f" {busiest:8.0%}"
            )
    finally:
        single.kill()
        cluster.close()
    return 0


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    argv = [float(a) for a in sys.argv[1:]]
    seconds_, clients_, rounds_ = (argv + [5, 2, 3][len(argv) :])[:3]
    sys.exit(main(seconds_, int(clients_), int(rounds_)))
