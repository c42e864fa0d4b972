"""The write-behind flusher's throughput: pending deltas drained into PostgreSQL per second.

    .venv/bin/python bench/flush_bench.py [subjects] [members]

Fills a private Redis through the service (``counter_update_many``) with pending deltas of many
subjects of a per-player counter and many new unique members of ``daily_active_users``, times one
``counters_flush`` and checks PostgreSQL against Redis afterwards.

Besides the wall time it prints the CPU seconds the flush cost each process (this Python process,
the PostgreSQL backend serving it, the private redis-server, from ``/proc``): on a shared machine
they travel better than deltas/s. ``FLUSH_BENCH_PROFILE=path`` writes a cProfile of the flush there.
``bench/flush_compare.py`` runs this against another git ref in the same run.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run

CHUNK = 1000


def main(subjects: int, members: int) -> int:
    with run.in_process_store() as processes:
        from django.db import connection

        from counters.config import cache
        from counters.flush import counters_flush
        from counters.models import App, Counter, CounterValue, UniqueMember
        from counters.services import UpdateRequest, counter_update_many

        app = App.objects.get(slug="default")
        Counter.objects.get_or_create(app=app, name="bench_player_score", defaults={"scope": "user"})
        tag = f"f{time.time_ns()}"
        cache.invalidate()
        snapshot = cache.get()
        score = snapshot.counters[(app.id, "bench_player_score")]
        dau = snapshot.counters[(app.id, "daily_active_users")]
        counters_flush()

        started = time.monotonic()
        updates = [UpdateRequest(score, 3, f"{tag}-{i}") for i in range(subjects)]
        updates += [UpdateRequest(score, 2, f"{tag}-{i}") for i in range(subjects)]
        updates += [UpdateRequest(dau, 1, "", f"{tag}-{i}") for i in range(members)]
        for start in range(0, len(updates), CHUNK):
            counter_update_many(updates=updates[start : start + CHUNK])
        print(f"filled {len(updates)} updates in {time.monotonic() - started:.1f}s (includes hydrating each subject)")

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend = cursor.fetchone()[0]
        pids = {"python": os.getpid(), "postgres": backend, "redis": processes.redis.pid}
        cpu_before = {name: run.process_cpu_seconds(pid) for name, pid in pids.items()}
        profile_path = os.environ.get("FLUSH_BENCH_PROFILE")
        if profile_path:
            # bench/profile.py would shadow the standard library's profile module (which cProfile imports).
            here = Path(__file__).resolve().parent
            sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        started = time.monotonic()
        stats = counters_flush()
        seconds = time.monotonic() - started
        if profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
        cpu = {name: run.process_cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        deltas = stats.values + stats.members
        print(f"flushed {stats.values} values + {stats.members} members = {deltas} deltas in {seconds:.2f}s")
        print(f"flush: {deltas / seconds:,.0f} deltas/s ({stats.operations} operations, {stats.batches} batches)")
        per = 50_000 / max(1, deltas)
        print(
            "CPU seconds per 50,000 deltas: "
            + ", ".join(f"{name} {seconds * per:.2f}" for name, seconds in cpu.items())
            + f" (total {sum(cpu.values()) * per:.2f})"
        )

        rows = CounterValue.objects.filter(counter_id=score.id, subject__startswith=f"{tag}-")
        stored = sorted(set(rows.values_list("value", flat=True)))
        known = UniqueMember.objects.filter(counter_id=dau.id, member__startswith=f"{tag}-").count()
        exact = rows.count() == subjects and stored == [5] and known == members
        print("exactness: " + ("OK" if exact else f"FAILED ({rows.count()} rows, values {stored}, {known} members)"))
        return 0 if exact else 1


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    sys.exit(main(*(args + [50_000, 50_000][len(args) :])))
