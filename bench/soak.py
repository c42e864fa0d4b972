"""Memory soak: mixed traffic against gunicorn + a Celery worker + beat, RSS sampled per process.

Starts the web, worker and beat processes itself (from ``gunicorn.conf.py`` and the Procfile's
commands, with gunicorn's ``max_requests`` and Celery's ``worker_max_tasks_per_child`` switched
off so a leak cannot hide behind process recycling), drives increments with and without user ids,
single and batch reads, and a rolling set of temporary counters created and deleted through the
ORM, for ``--duration`` seconds. Every ``--sample-every`` seconds it reads the RSS of each process
from ``/proc`` (and Redis's ``used_memory``); at the end it prints, per process, the RSS after
warm-up, at the end, the least-squares slope after warm-up, and the slopes of the first and the
second half after warm-up (warm-up levels off, a leak does not). ``--trace-dir`` adds per-process
heap reports (``bench/tracehook.py``).

Uses the database and Redis named by the environment (``DATABASE_URL``, ``REDIS_URL``,
``CELERY_BROKER_URL``, ``DJANGO_SETTINGS_MODULE``; run ``manage.py migrate`` there first), or,
with ``--database-url``, a database of its own (created and migrated if missing) and, with
``--private-redis``, a redis-server of its own. ``make soak`` runs the long soak that way.

    python bench/soak.py --duration 600 --warmup 60
    python bench/soak.py --private-redis --database-url postgres://…/counters_soak --trace-dir DIR
"""

import argparse
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import orjson
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
from bench.tracehook import rss_kib  # noqa: E402
from bench.tracesummary import slope_per_min, summarise  # noqa: E402
from tests.processes import free_port  # noqa: E402  (one copy, shared with the tests)

SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"


def redis_used_kib() -> int | None:
    from counters.redis_store import client

    try:
        return int(client().info("memory")["used_memory"]) // 1024
    except Exception:  # a sample missed, not a reason to stop the run
        return None


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def slope_kib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, per minute."""
    return slope_per_min([(t / 60, v) for t, v in points])


class Services:
    """web, worker and beat, started like the Procfile does, stopped with SIGTERM."""

    def __init__(
        self, *, web_workers: int, worker_concurrency: int, trace_dir: str | None = None, warmup: float = 60
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, GUNICORN_MAX_REQUESTS="0", WORKER_MAX_TASKS_PER_CHILD="0", PYTHONUNBUFFERED="1")
        config, celery = "gunicorn.conf.py", [str(BIN / "celery"), "-A", "counterproject"]
        if trace_dir:
            # Same processes, plus tracemalloc reports in every web worker and pool process.
            env["MEM_TRACE_DIR"] = trace_dir
            env.setdefault("MEM_TRACE_WARMUP", str(warmup))  # reports start when the slope does
            config, celery = "bench/gunicorn_traced.py", [str(BIN / "python"), "bench/celery_traced.py"]
        self.log = open(os.environ.get("SOAK_LOG", os.devnull), "ab")  # noqa: SIM115
        subprocess.run(
            [str(BIN / "python"), "manage.py", "setup_schedules"], cwd=ROOT, env=env, check=True, stdout=self.log
        )
        web = ["counterproject.asgi", "-c", config, "--bind", f"127.0.0.1:{self.port}"]
        worker = ["worker", "--loglevel=WARNING", f"--concurrency={worker_concurrency}"]
        beat = [str(BIN / "celery"), "-A", "counterproject", "beat", "--loglevel=WARNING", "--scheduler", SCHEDULER]
        commands = {
            "web": [str(BIN / "gunicorn"), *web, "--workers", str(web_workers)],
            "worker": [*celery, *worker, "--without-heartbeat", "--without-gossip", "--without-mingle"],
            "beat": beat,
        }
        self.processes = {
            name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=self.log)
            for name, cmd in commands.items()
        }
        # Generous: on a loaded machine three Django processes take a while to start.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit("gunicorn did not come up")

    def pids(self) -> dict[str, int]:
        found = {}
        for name, process in self.processes.items():
            found[f"{name}-main"] = process.pid
            for i, child in enumerate(sorted(children(process.pid))):
                found[f"{name}-{i}"] = child
        return found

    def exited(self) -> dict[str, int]:
        """The processes that ended before they were told to stop, with their exit status."""
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()


def setup_data(temp_counters: int, *, migrate: bool) -> tuple[str, list[str]]:
    import django

    django.setup()
    if migrate:
        from django.core.management import call_command

        call_command("migrate", "--noinput", verbosity=0)
    from counters.builtins import ensure_builtins
    from counters.models import ApiKey, App, Counter

    ensure_builtins(App, Counter)
    app = App.objects.get(slug="default")
    _, key = ApiKey.generate(app=app, roles=["write", "data_view"], name="soak")
    return key, [rotate_temp_counter(app) for _ in range(temp_counters)]


_temp_ids = itertools.count()


def rotate_temp_counter(app, drop: str | None = None) -> str:
    """Create a new temporary event counter (and delete an old one, so config stays bounded)."""
    from counters import clock
    from counters.models import Counter

    if drop is not None:
        Counter.objects.filter(app=app, name=drop).delete()
    name = f"soak_event_{os.getpid()}_{next(_temp_ids)}"
    Counter.objects.create(app=app, name=name, period="daily", expires_at=clock.now() + timedelta(hours=1))
    return name


def next_request(rng: random.Random, event: str) -> tuple[str, str, dict | None]:
    """One request of the mix: method, path under ``/api/v1`` and JSON body (POST) or query (GET).

    35 % plain increments, 20 % daily active users (a random one of a million), 10 % increments of
    a temporary counter (``event``) with metadata, 20 % single reads, 15 % batch reads.
    """
    roll = rng.random()
    if roll < 0.35:
        return "POST", "/counter/total_games_played/increment", {}
    if roll < 0.55:
        return "POST", "/counter/daily_active_users/increment", {"user_id": f"u{rng.randrange(1_000_000)}"}
    if roll < 0.65:
        return "POST", f"/counter/{event}/increment", {"value": 1, "metadata": {"stage": rng.randrange(100)}}
    if roll < 0.85:
        return "GET", "/counter/online_players", None
    return "GET", "/counters", {"names": f"online_players,daily_active_users,total_games_played,{event}"}


def drive(url: str, key: str, temp: list[str], temp_lock: threading.Lock, stop: threading.Event, stats: dict) -> None:
    rng = random.Random()
    api = f"{url}/api/v1"
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {key}"
        while not stop.is_set():
            with temp_lock:
                event = rng.choice(temp)
            method, path, data = next_request(rng, event)
            try:
                if method == "POST":
                    reply = session.post(f"{api}{path}", json=data, timeout=10)
                else:
                    reply = session.get(f"{api}{path}", params=data, timeout=10)
                status = reply.status_code
            except requests.RequestException:
                status = 0
            # A temporary counter deleted mid-request answers 404: expected with the rotation.
            stats[status] = stats.get(status, 0) + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic")
    parser.add_argument("--warmup", type=float, default=60, help="seconds excluded from the slope")
    parser.add_argument("--sample-every", type=float, default=5)
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=1)
    parser.add_argument("--temp-counters", type=int, default=5, help="live temporary counters at any time")
    parser.add_argument("--rotate-every", type=float, default=10, help="seconds between temporary counter rotations")
    parser.add_argument("--trace-dir", help="write tracemalloc reports of web workers and pool processes here")
    parser.add_argument(
        "--private-redis",
        action="store_true",
        help="start a redis-server of its own on a free port (REDIS_URL and CELERY_BROKER_URL point there)",
    )
    parser.add_argument("--database-url", help="use this database (created and migrated if missing)")
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "counterproject.settings")
    if args.database_url:
        from bench.run import ensure_database

        ensure_database(args.database_url)
        os.environ["DATABASE_URL"] = args.database_url
    private_redis = None
    if args.private_redis:
        # A test run flushing a shared Redis database would make every process hydrate again.
        from tests.processes import PrivateRedis

        private_redis = PrivateRedis()
        os.environ["REDIS_URL"] = private_redis.url
        os.environ["CELERY_BROKER_URL"] = private_redis.url.rsplit("/", 1)[0] + "/1"
    try:
        return soak(args)
    finally:
        if private_redis is not None:
            private_redis.close()


def soak(args: argparse.Namespace) -> int:
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
    key, temp = setup_data(args.temp_counters, migrate=bool(args.database_url))
    from counters.models import App

    app = App.objects.get(slug="default")
    services = Services(
        web_workers=args.web_workers,
        worker_concurrency=args.worker_concurrency,
        trace_dir=args.trace_dir,
        warmup=args.warmup,
    )
    stop, temp_lock, per_client = threading.Event(), threading.Lock(), [{} for _ in range(args.clients)]
    clients = [
        threading.Thread(target=drive, args=(services.url, key, temp, temp_lock, stop, s), daemon=True)
        for s in per_client
    ]
    samples: dict[str, list[tuple[float, int]]] = {}
    redis_points: list[tuple[float, int]] = []
    rotations = 0
    try:
        for thread in clients:
            thread.start()
        start = last_rotation = time.monotonic()
        while (elapsed := time.monotonic() - start) < args.duration:
            for name, pid in services.pids().items():
                rss = rss_kib(pid)
                if rss is not None:
                    samples.setdefault(f"{name}:{pid}", []).append((elapsed, rss[0]))
            # Redis is not started here, but what a long run leaves behind in it counts too.
            if (used := redis_used_kib()) is not None:
                redis_points.append((elapsed, used))
            if time.monotonic() - last_rotation >= args.rotate_every:
                with temp_lock:
                    temp.append(rotate_temp_counter(app, drop=temp.pop(0)))
                rotations += 1
                last_rotation = time.monotonic()
            time.sleep(min(args.sample_every, max(0.0, args.duration - elapsed)))
        died = services.exited()
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=15)
        services.stop()

    statuses: dict[int, int] = {}
    for s in per_client:
        for status, count in s.items():
            statuses[status] = statuses.get(status, 0) + count
    processes = {}
    # Warm-up and fragmentation level off, a leak does not: compare the two halves after warm-up.
    middle = args.warmup + (args.duration - args.warmup) / 2
    print(
        f"{'process':<24}{'rss after warm-up KiB':>22}{'rss at end KiB':>16}"
        f"{'slope KiB/min':>15}{'1st half':>10}{'2nd half':>10}"
    )

    def row(name: str, points: list[tuple[float, int]]) -> dict:
        after = [p for p in points if p[0] >= args.warmup] or points[-1:]
        slope = slope_kib_per_min(after)
        first = slope_kib_per_min([p for p in after if p[0] < middle])
        second = slope_kib_per_min([p for p in after if p[0] >= middle])
        print(f"{name:<24}{after[0][1]:>22}{after[-1][1]:>16}{slope:>15.1f}{first:>10.1f}{second:>10.1f}")
        return {
            "rss_after_warmup_kib": after[0][1],
            "rss_end_kib": after[-1][1],
            "slope_kib_per_min": slope,
            "first_half_slope_kib_per_min": first,
            "second_half_slope_kib_per_min": second,
        }

    for name, points in sorted(samples.items()):
        processes[name] = row(name, points)
    redis = row("redis used_memory", redis_points) if redis_points else None
    total = sum(statuses.values())
    print(f"requests: {total} ({total / args.duration:.0f}/s), statuses: {dict(sorted(statuses.items()))}")
    print(f"temporary counters rotated: {rotations}")
    summary = {"duration": args.duration, "warmup": args.warmup, "requests": total, "statuses": statuses}
    summary["processes"] = processes
    summary["redis_used_memory"] = redis
    if args.trace_dir:
        print("per-process reports (bench/tracesummary.py):")
        print(summarise(Path(args.trace_dir)) or "none (the run was shorter than MEM_TRACE_WARMUP)")
    print("SUMMARY " + orjson.dumps(summary, option=orjson.OPT_NON_STR_KEYS).decode())
    if died:
        # A process that died during the soak has no slope to report: the run proves nothing about it.
        print(f"processes that exited during the soak: {died} (SOAK_LOG=<file> keeps their output)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
