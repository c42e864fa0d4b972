"""What an Idempotency-Key costs one increment, in process, interleaved with plain increments.

    .venv/bin/python bench/idempotency_bench.py [rounds] [per_round]

Runs ``counter_update`` against a private Redis in alternating rounds (plain, with a new key,
a replay of a recorded key), so that a machine whose load drifts weighs on each alike, and prints
the median wall and CPU time per call of each kind next to each other. ``make bench``'s wrk run
(scenario ``keyed``) measures the same through gunicorn.
"""

import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run


def main(rounds: int, per_round: int) -> int:
    with run.in_process_store():
        from counters.config import cache
        from counters.idempotency import idempotency_parse
        from counters.models import App
        from counters.services import counter_update

        app = App.objects.get(slug="default")
        cache.invalidate()
        counter = cache.get().counters[(app.id, run.PLAIN)]
        start = counter_update(counter=counter, amount=1).new_value  # hydrate, load the script

        def plain(_: int):
            return counter_update(counter=counter, amount=1)

        keys: list[str] = []  # made by the client, so outside the timing

        def keyed(i: int):
            # What a view does per request: check the key and fingerprint the parsed body.
            idem = idempotency_parse(keys[i], app_id=app.id, parts=("update", counter.id, 1, "", None))
            return counter_update(counter=counter, amount=1, idempotency=idem)

        replay_key = idempotency_parse(str(uuid.uuid4()), app_id=app.id, parts=("update", counter.id, 1, "", None))
        counter_update(counter=counter, amount=1, idempotency=replay_key)

        def replay(_: int):
            return counter_update(counter=counter, amount=1, idempotency=replay_key)

        kinds = {"plain": plain, "keyed": keyed, "replay": replay}
        wall: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}
        print(f"bench: load average before {run.load()}")
        for _ in range(rounds):
            keys[:] = [str(uuid.uuid4()) for _ in range(per_round)]
            for name, call in kinds.items():
                w0, c0 = time.perf_counter(), time.process_time()
                for i in range(per_round):
                    call(i)
                wall[name].append((time.perf_counter() - w0) / per_round * 1e6)
                cpu[name].append((time.process_time() - c0) / per_round * 1e6)
        print(f"bench: load average after {run.load()}")
        end = counter_update(counter=counter, amount=1).new_value
        applied = end - start - 2  # the last plain call and the replay key's first call
        expected = rounds * per_round * 2
        print(f"\n{'kind':8} {'wall µs/call':>13} {'CPU µs/call':>12}   (median of {rounds} rounds of {per_round})")
        for name in kinds:
            print(f"{name:8} {statistics.median(wall[name]):>13.1f} {statistics.median(cpu[name]):>12.1f}")
        ok = applied == expected
        print("exactness: " + ("OK" if ok else f"FAILED: {applied} applied, expected {expected} (replays add 0)"))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])) if len(sys.argv) > 1 else main(20, 500))
