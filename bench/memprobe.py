"""In-process leak probe: drive the request path and the flusher in a loop, diff tracemalloc snapshots.

A leak in Python code shows up here in seconds, without servers: the same mix of requests as
``bench/soak.py`` goes through Django's full request handling (``django.test.Client``: middleware,
DRF views, serializers, the Redis Lua path), ``counters.flush`` runs every ``--flush-every``
requests as the Celery pool process would run it, and a temporary counter is created and deleted
every ``--rotate-every`` requests. After ``--warmup`` requests a first snapshot is taken, then one
after each further ``--round`` requests; it prints the allocation sites that grew most between the
first and the last snapshot, the growth of the traced heap per round, and which object types grew.

Uses the database and Redis named by the environment (``DATABASE_URL``, ``REDIS_URL``,
``DJANGO_SETTINGS_MODULE``); run ``manage.py migrate`` there first.

    python bench/memprobe.py --warmup 5000 --rounds 4 --round 5000
"""

import argparse
import gc
import itertools
import os
import random
import sys
import tracemalloc
from collections import Counter as Tally
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.soak import next_request  # noqa: E402  (the soak's request mix)
from bench.tracehook import rss_kib  # noqa: E402

_temp_ids = itertools.count()
# The probe's own bookkeeping, not the service's.
IGNORED = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]


def type_counts() -> Tally:
    gc.collect()
    return Tally(type(o).__qualname__ for o in gc.get_objects())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5000, help="requests before the first snapshot")
    parser.add_argument("--rounds", type=int, default=4, help="snapshots after the first one")
    parser.add_argument("--round", type=int, default=5000, help="requests between snapshots")
    parser.add_argument("--flush-every", type=int, default=50, help="requests between two flush task runs")
    parser.add_argument("--rotate-every", type=int, default=500, help="requests between temporary counter rotations")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--frames", type=int, default=8, help="traceback depth recorded by tracemalloc")
    args = parser.parse_args()

    import django

    django.setup()
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import RequestFactory

    from counters import clock
    from counters.builtins import ensure_builtins
    from counters.models import ApiKey, App, Counter
    from counters.tasks import flush

    if "testserver" not in settings.ALLOWED_HOSTS and "*" not in settings.ALLOWED_HOSTS:
        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    ensure_builtins(App, Counter)
    app = App.objects.get(slug="default")
    _, key = ApiKey.generate(app=app, roles=["write", "data_view"], name="memprobe")

    def new_temp() -> str:
        name = f"probe_event_{os.getpid()}_{next(_temp_ids)}"
        Counter.objects.create(app=app, name=name, period="daily", expires_at=clock.now() + timedelta(hours=1))
        return name

    temp = [new_temp() for _ in range(5)]
    handler, factory = WSGIHandler(), RequestFactory(HTTP_AUTHORIZATION=f"Bearer {key}")

    def call(request) -> int:
        status = []
        body = handler(request.environ, lambda s, headers, exc_info=None: status.append(s))
        try:
            b"".join(body)
        finally:
            body.close()  # as gunicorn does: sends request_finished
        return int(status[0].split()[0])

    rng = random.Random(7)
    statuses: Tally = Tally()
    api = "/api/v1"

    def one(i: int) -> None:
        if i % args.rotate_every == 0:
            Counter.objects.filter(app=app, name=temp.pop(0)).delete()
            temp.append(new_temp())
        if i % args.flush_every == 0:
            flush()
        method, path, data = next_request(rng, rng.choice(temp))
        if method == "POST":
            status = call(factory.post(f"{api}{path}", data, content_type="application/json"))
        else:
            status = call(factory.get(f"{api}{path}", data))
        statuses[status] += 1

    tracemalloc.start(args.frames)
    counter = itertools.count(1)
    for _ in range(args.warmup):
        one(next(counter))
    # Counted before the first snapshot, so the tally itself is in every snapshot, not in the growth.
    types_first = type_counts()
    first = last = tracemalloc.take_snapshot().filter_traces(IGNORED)
    traced = tracemalloc.get_traced_memory()[0] / 1024
    print(f"warm-up: {args.warmup} requests, traced heap {traced:.0f} KiB, RSS {rss_kib()[0]} KiB")
    for r in range(args.rounds):
        for _ in range(args.round):
            one(next(counter))
        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces(IGNORED)
        grown = sum(s.size_diff for s in snap.compare_to(last, "filename"))
        print(f"round {r + 1}: +{args.round} requests, traced heap {grown / 1024:+.1f} KiB, RSS {rss_kib()[0]} KiB")
        last = snap
    print(f"statuses: {dict(sorted(statuses.items()))}")
    print(f"\ntop {args.top} allocation sites by growth, first to last snapshot:")
    for stat in last.compare_to(first, "traceback")[: args.top]:
        print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks")
        for line in stat.traceback.format(limit=args.frames)[-6:]:
            print("      " + line)
    types_last = type_counts()
    types_last.subtract(types_first)
    print("\nobject types that grew (count), first to last snapshot:")
    for name, diff in types_last.most_common(args.top):
        if diff > 0:
            print(f"{diff:+8d} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
