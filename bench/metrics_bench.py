"""What the metrics cost, next to baselines measured in the same run.

    .venv/bin/python bench/metrics_bench.py [updates] [counters]

- The update script with its two metric commands (``since`` and ``n`` in the pending hash) against
  the same script without them, alternating rounds of sequential EVALSHA on a private Redis. Each
  update changes a value for the first time since a flush, the only case where they run.
- Recording one request (``request_record``: a counter and a histogram, multiprocess mode) against
  one Redis PING round trip.
- One scrape's store reads (flush lag, pending deltas, archive lag, counter values) with
  ``counters`` counters holding pending deltas.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

# Multiprocess mode, as under gunicorn: must be set before prometheus_client is imported.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-bench-")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run

ROUNDS = 3
METRIC_LINES = ("  redis.call('HSETNX', pkey, 'since', ms)\n", "  redis.call('HINCRBY', pkey, 'n', 1)\n")


def per_call_us(fn, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - started) / count * 1e6


def main(updates: int, counters: int) -> int:
    with run.in_process_store() as processes:
        import redis
        from prometheus_client import CollectorRegistry, generate_latest

        from counters import clock, keyspace
        from counters.config import cache
        from counters.flush import counters_flush
        from counters.models import App, Counter
        from counters.services import UpdateRequest, counter_update_many
        from metrics.recorders import request_record
        from metrics.scrape import StoreCollector

        r = redis.Redis.from_url(processes.redis_url)
        with_metrics = r.register_script(keyspace.UPDATE_SCRIPT)
        source = keyspace.UPDATE_SCRIPT
        for line in METRIC_LINES:
            assert line in source
            source = source.replace(line, "")
        without = r.register_script(source)
        ms = clock.to_ms(clock.now())
        hydrated = {"v": 0, "peak": 0, "ops": 0, "upd": 0}

        def timed_round(script, cid: int) -> float:
            """Each update is the first change of its value since a flush: the two commands run every time."""
            keys = [keyspace.update_keys(cid, "", f"s{i}") for i in range(updates)]
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.hset(k[0], mapping=hydrated)
            pipe.execute()
            started = time.perf_counter()
            for i, k in enumerate(keys):
                script(keys=k, args=["add", "1", f"|s{i}", "", "", "", "0", str(ms), str(ms // 60000), "0", ""])
            return (time.perf_counter() - started) / updates * 1e6

        results = {"with": [], "without": []}
        for round_number in range(ROUNDS):
            for name, script in (("without", without), ("with", with_metrics)):
                results[name].append(timed_round(script, 900000 + 2 * round_number + (name == "with")))
        best = {name: min(values) for name, values in results.items()}
        print(f"update script, sequential EVALSHA, {updates} values x {ROUNDS} rounds (best round):")
        print(f"  without the metric fields (baseline): {best['without']:.1f} us/update")
        print(f"  with since + n:                       {best['with']:.1f} us/update")
        rounds = {name: ", ".join(f"{v:.1f}" for v in values) for name, values in results.items()}
        print(f"  every round: without {rounds['without']}; with {rounds['with']}")

        ping = min(per_call_us(r.ping, 5000) for _ in range(ROUNDS))
        record = min(
            per_call_us(
                lambda: request_record(
                    surface="rest", endpoint="counter-increment", method="POST", status=200, seconds=0.001
                ),
                50000,
            )
            for _ in range(ROUNDS)
        )
        print(f"one Redis PING round trip (baseline): {ping:.1f} us")
        print(f"request_record (counter + histogram, multiprocess files): {record:.1f} us")

        app = App.objects.get(slug="default")
        Counter.objects.bulk_create(
            [Counter(app=app, name=f"bench_metrics_{i}", public=True) for i in range(counters)],
            ignore_conflicts=True,
        )
        cache.invalidate()
        snapshot = cache.get()
        counters_flush()
        chosen = [snapshot.counters[(app.id, f"bench_metrics_{i}")] for i in range(counters)]
        counter_update_many(updates=[UpdateRequest(c, 1, "") for c in chosen])
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StoreCollector())
        text = generate_latest(registry).decode()
        assert f"counterservice_flush_pending_deltas {float(counters)}" in text, text
        scrape_ms = min(per_call_us(lambda: generate_latest(registry), 20) for _ in range(ROUNDS)) / 1000
        print(
            f"scrape-time store reads, {len(snapshot.counters_by_id)} counters ({counters} pending): {scrape_ms:.2f} ms"
        )
        # The bench database is shared with bench/run.py: leave no extra counters for it to flush.
        Counter.objects.filter(name__startswith="bench_metrics_").delete()
        return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000, int(sys.argv[2]) if len(sys.argv) > 2 else 1000))
