"""make bench: the service's hot endpoints next to a minimal DRF baseline, measured in the same run.

Starts a private redis-server and servers on loopback, pinned to the same core: the service under
the production ``gunicorn.conf.py`` (``counterproject.asgi``, one worker) and the **baseline**, a
fixed configuration that does not follow the production one: gunicorn gthread, 1 worker x 8
threads, serving the bench-only URL conf (``bench/urls.py``: a DRF view with one INCRBY). A third,
``make bench-seed``'s reference (``bench/reference.py``) under the production configuration, is
measured last: the increment against it, per core. The load generator runs on the other core; wrk
(``bench/scenario.lua``) drives each endpoint and one table is printed, with the Redis CPU per script
call from Redis's own ``INFO commandstats``. Then checks exactness: every value the API shows equals
what the load generators were told was applied, and equals PostgreSQL after a flush.

Environment: ``BENCH_DATABASE_URL`` (a database of its own; created and migrated if missing),
``BENCH_SECONDS`` (per run, default 10), ``BENCH_SERVER_CPUS`` / ``BENCH_CLIENT_CPUS`` (default 0 / 1),
and gunicorn's own knobs (``WEB_CONCURRENCY``, ``GUNICORN_THREADS``, ...) to compare settings.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.processes import free_port, wait_until  # noqa: E402  (one copy, shared with the tests)

BIN = Path(sys.executable).parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
SERVER_CPUS = os.environ.get("BENCH_SERVER_CPUS", "0")
CLIENT_CPUS = os.environ.get("BENCH_CLIENT_CPUS", "1")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://root@127.0.0.1:5432/counters_bench")
CONCURRENCIES = (16, 64, 400)
FIXED_RATE_SHARE = 0.7
FIXED_RATE_DELAY_MS = 10
BATCH_SIZE = 100
EXTRA_COUNTERS = [f"bench_{i}" for i in range(8)]
WEB_PID = {}
WEB_URL = {}
REDIS_URL = [""]
# The servers keep the production socket timeout; this process, which flushes a whole run's backlog
# at once on a loaded machine, waits longer (see django_setup).
SERVER_REDIS_TIMEOUT = os.environ.get("REDIS_SOCKET_TIMEOUT")
# online_players is a presence counter (docs/presence.md; bench/presence_bench.py measures it):
# the plain increment and reads use bench_0, a counter without period.
PLAIN = EXTRA_COUNTERS[0]
GET_BATCH_NAMES = ["daily_active_users", "total_games_played", *EXTRA_COUNTERS]


@dataclass
class Scenario:
    name: str
    label: str
    method: str
    path: str
    body: str
    counter: str = ""  # the counter a POST adds to, and how much per 2xx response
    per_request: int = 0
    compare_to: str = "baseline"
    server: str = "service"
    runs: dict = field(default_factory=dict)


SCENARIOS = [
    Scenario("baseline", "baseline: DRF view, one INCRBY", "POST", "/bench/baseline/increment", "increment"),
    Scenario("increment", "(a) increment", "POST", f"/api/v1/counter/{PLAIN}/increment", "increment"),
    Scenario("keyed", "(a2) increment, Idempotency-Key", "POST", f"/api/v1/counter/{PLAIN}/increment", "keyed"),
    Scenario("dau", "(b) increment, distinct user_id", "POST", "/api/v1/counter/daily_active_users/increment", "dau"),
    Scenario("get", "(c) GET one counter", "GET", f"/api/v1/counter/{PLAIN}", "none"),
    Scenario("get10", "(d) GET 10 counters", "GET", "/api/v1/counters?names=" + ",".join(GET_BATCH_NAMES), "none"),
    Scenario("batch", f"(e) batch update of {BATCH_SIZE}", "POST", "/api/v1/counters/batch", "batch"),
    # make bench-seed's reference (bench/reference.py: one coalesced INCRBY, no validation, auth or
    # Lua) under the production server on the same core: the increment against it, per core.
    Scenario("reference", "(r) bench-seed's reference", "POST", "/", "increment", server="reference"),
]
SCENARIOS[1].counter, SCENARIOS[1].per_request = PLAIN, 1
SCENARIOS[2].counter, SCENARIOS[2].per_request = PLAIN, 1
SCENARIOS[3].counter, SCENARIOS[3].per_request = "daily_active_users", 1
SCENARIOS[6].counter, SCENARIOS[6].per_request = "total_games_played", BATCH_SIZE // 2
SCENARIOS[5].compare_to = "get"
SCENARIOS[2].compare_to = "increment"
SCENARIOS[0].server = "baseline"
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
if ONLY:  # a quicker run of some scenarios (and what they are compared to), e.g. to try gunicorn settings
    SCENARIOS = [
        s for s in SCENARIOS if s.name in ONLY | {"baseline"} | {t.compare_to for t in SCENARIOS if t.name in ONLY}
    ]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds so far of one process (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(master_pid: int) -> float:
    """CPU time of gunicorn: the master, its live workers and the workers it has reaped.

    On a machine shared with other work, CPU per request is steadier than requests/s: it is what
    sets the capacity of a core.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        fields = rest.rsplit(") ", 1)[1].split()
        if int(pid) == master_pid:
            total += sum(int(f) for f in fields[11:15])
        elif int(fields[1]) == master_pid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def ensure_database(url: str) -> None:
    import psycopg

    parts = urlparse(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


class Processes:
    """A private redis-server (on the client cores), the service and the baseline (on the server cores)."""

    def __init__(self) -> None:
        self.redis_port = free_port()
        self.redis_dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-gunicorn-", suffix=".log", delete=False)  # noqa: SIM115
        self.redis = None
        self.webs: list[subprocess.Popen] = []

    def start_redis(self) -> None:
        args = ["taskset", "-c", CLIENT_CPUS, "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self.redis_dir]
        self.redis = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        wait_until(lambda: redis.Redis(port=self.redis_port).ping(), timeout=30, what="redis-server")

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, DATABASE_URL=DATABASE_URL, REDIS_URL=self.redis_url, PYTHONUNBUFFERED="1")
        env["DJANGO_SETTINGS_MODULE"] = "bench.settings"
        env.setdefault("WEB_CONCURRENCY", "1")
        if SERVER_REDIS_TIMEOUT is None:
            env.pop("REDIS_SOCKET_TIMEOUT", None)
        env.update(extra)
        return env

    def start_web(self, name: str) -> None:
        """``service``: the production config; ``baseline``: gthread 1 x 8 whatever the production config
        says; ``reference``: bench/reference.py under the production config."""
        port = free_port()
        app, extra = "counterproject.asgi", {}
        if name == "baseline":
            app = "counterproject.wsgi"
            extra = {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "8", "WEB_CONCURRENCY": "1"}
        elif name == "reference":
            app, extra = "bench.reference:application", {"PYTHONPATH": str(ROOT)}
        args = ["taskset", "-c", SERVER_CPUS, str(BIN / "gunicorn"), app]
        args += ["-c", str(ROOT / "gunicorn.conf.py"), "--bind", f"127.0.0.1:{port}"]
        web = subprocess.Popen(args, cwd=ROOT, env=self.env(**extra), stdout=self.log, stderr=self.log)
        self.webs.append(web)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=1).ok, timeout=30, what=f"gunicorn ({name})")
        WEB_PID[name], WEB_URL[name] = web.pid, url

    def stop(self) -> None:
        for process in (*self.webs, self.redis):
            if process and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(self.redis_dir, ignore_errors=True)
        Path(self.log.name).unlink(missing_ok=True)


def script_usec(redis_url: str) -> tuple[int, int]:
    """Redis's own count and CPU time (µs) of script calls (EVALSHA), from INFO commandstats."""
    import redis

    stats = redis.Redis.from_url(redis_url).info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


@contextlib.contextmanager
def in_process_store():
    """The bench database and a private redis-server, with Django set up against them, for the
    benches that call the services in this process; the server stops on the way out."""
    ensure_database(DATABASE_URL)
    processes = Processes()
    try:
        processes.start_redis()
        django_setup(processes.redis_url)
        yield processes
    finally:
        processes.stop()


def django_setup(redis_url: str) -> str:
    """Migrate the bench database, make sure the bench counters exist, return a fresh write key."""
    os.environ.update(DATABASE_URL=DATABASE_URL, REDIS_URL=redis_url, DJANGO_SETTINGS_MODULE="counterproject.settings")
    os.environ.setdefault("REDIS_SOCKET_TIMEOUT", "10")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    from counters.models import ApiKey, App, Counter

    call_command("migrate", "--noinput", verbosity=0)
    app = App.objects.get(slug="default")
    for name in EXTRA_COUNTERS:
        Counter.objects.get_or_create(app=app, name=name, defaults={"public": True})
    _, raw = ApiKey.generate(app=app, roles=["write", "data_view"], name="bench")
    return raw


def wrk(scenario: Scenario, key: str, *, connections: int, seconds: int, delay_ms: int = 0) -> dict:
    url = WEB_URL[scenario.server]
    pid = WEB_PID[scenario.server]
    cpu_before = cpu_seconds(pid)
    calls_before, usec_before = script_usec(REDIS_URL[0])
    env = dict(os.environ, BENCH_BODY=scenario.body, BENCH_METHOD=scenario.method, BENCH_KEY=key)
    env.update(BENCH_RUN=f"r{time.time_ns()}", BENCH_DELAY_MS=str(delay_ms), BENCH_BATCH_SIZE=str(BATCH_SIZE))
    args = ["taskset", "-c", CLIENT_CPUS, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    args += ["-s", str(ROOT / "bench" / "scenario.lua"), url + scenario.path]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    result = json.loads(line[6:])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["cpu_ms"] = (cpu_seconds(pid) - cpu_before) * 1000 / max(1, result["requests"])
    calls, usec = script_usec(REDIS_URL[0])
    result["script_calls"] = calls - calls_before
    result["script_us"] = (usec - usec_before) / max(1, calls - calls_before)
    result["connections"] = connections
    return result


def hey(url: str, key: str, *, path: str, body: str, count: int, concurrency: int = 32) -> dict[int, int]:
    """Exactly ``count`` requests (hey waits for every answer); returns {status: responses}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as body_file:
        body_file.write(body)
    args = ["taskset", "-c", CLIENT_CPUS, "hey", "-n", str(count), "-c", str(concurrency), "-m", "POST"]
    args += ["-H", f"Authorization: Bearer {key}", "-T", "application/json", "-D", body_file.name, url + path]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=True).stdout
    finally:
        os.unlink(body_file.name)
    return {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}


def value(url: str, name: str) -> int:
    """The counter's value once the server has drained what wrk left queued when it stopped."""
    current = None
    for _ in range(120):
        latest = requests.get(f"{url}/api/v1/counter/{name}", timeout=60).json()["value"]
        if latest == current:
            return latest
        current = latest
        time.sleep(0.5)
    raise SystemExit(f"bench: {name} never settled")


def check_window(scenario: Scenario, before: int, after: int, run: dict, problems: list[str]) -> None:
    """wrk stops with requests in flight: the server may have applied them, wrk never saw the answer."""
    low, high = run["ok"] * scenario.per_request, run["sent"] * scenario.per_request
    if run["non2xx"] or not low <= after - before <= high:
        problems.append(
            f"{scenario.name}: {after - before} applied, wrk saw {low} (sent {high}), {run['non2xx']} non-2xx"
        )


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def main() -> int:
    for tool in ("wrk", "hey", "taskset", "redis-server"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is missing (make bench installs wrk and hey)")
    ensure_database(DATABASE_URL)
    processes = Processes()
    problems: list[str] = []
    try:
        processes.start_redis()
        REDIS_URL[0] = processes.redis_url
        key = django_setup(processes.redis_url)
        # The service always: the exactness checks below read and write through it.
        for server in dict.fromkeys(["service", *(s.server for s in SCENARIOS)]):
            processes.start_web(server)
        url = WEB_URL["service"]
        print(f"bench: server cores {SERVER_CPUS}, load generator and redis cores {CLIENT_CPUS}, {SECONDS}s a run")
        print(f"bench: load average before {load()}")
        for scenario in SCENARIOS:  # warm every worker: config snapshot, hydration, connections
            wrk(scenario, key, connections=16, seconds=2)
        for scenario in SCENARIOS:
            for connections in CONCURRENCIES:
                before = value(url, scenario.counter) if scenario.counter else 0
                run = wrk(scenario, key, connections=connections, seconds=SECONDS)
                if scenario.counter:
                    check_window(scenario, before, value(url, scenario.counter), run, problems)
                scenario.runs[connections] = run
            peak = max(scenario.runs.values(), key=lambda r: r["rps"])
            target = peak["rps"] * FIXED_RATE_SHARE
            # Each connection waits FIXED_RATE_DELAY_MS after an answer: calibrate the number of
            # connections on a short run, since the answer's own latency slows each connection.
            connections = max(1, round(target * FIXED_RATE_DELAY_MS / 1000))
            trial = wrk(scenario, key, connections=connections, seconds=3, delay_ms=FIXED_RATE_DELAY_MS)
            connections = max(1, round(connections * target / max(1.0, trial["rps"])))
            before = value(url, scenario.counter) if scenario.counter else 0
            run = wrk(scenario, key, connections=connections, seconds=SECONDS, delay_ms=FIXED_RATE_DELAY_MS)
            if scenario.counter:
                check_window(scenario, before, value(url, scenario.counter), run, problems)
            run["share"] = run["rps"] / peak["rps"]
            scenario.runs["fixed"] = run
            print(f"bench: {scenario.name} done, peak {peak['rps']:.0f} req/s, load {load()}", flush=True)

        # Exactness with every answer awaited: what hey saw as 200 is exactly what was applied.
        before = value(url, PLAIN)
        statuses = hey(url, key, path=f"/api/v1/counter/{PLAIN}/increment", body='{"value": 1}', count=5000)
        if value(url, PLAIN) - before != statuses.get(200, 0) or set(statuses) != {200}:
            problems.append(f"hey increment: {statuses}, applied {value(url, PLAIN) - before}")
        batch = {"updates": [{"name": "total_games_played"}] * 50 + [{"name": PLAIN, "value": 2}] * 50}
        before = value(url, "total_games_played")
        statuses = hey(url, key, path="/api/v1/counters/batch", body=json.dumps(batch), count=500)
        if value(url, "total_games_played") - before != 50 * statuses.get(200, 0) or set(statuses) != {200}:
            problems.append(f"hey batch: {statuses}, applied {value(url, 'total_games_played') - before}")

        from counters import clock, periods, selectors
        from counters.flush import counters_flush
        from counters.models import CounterValue

        started = time.monotonic()
        stats = counters_flush()
        flush_seconds = time.monotonic() - started
        for name in (PLAIN, "daily_active_users", "total_games_played"):
            # The period the API shows now: the bench database keeps earlier days' rows (the latest
            # of them is not today's when a run touches no daily counter after midnight).
            counter = selectors.counter_get(app_id=selectors.default_app_id(), name=name)
            period = periods.window_at(counter.period, counter.time_zone, clock.now()).key
            rows = CounterValue.objects.filter(counter_id=counter.id, subject="", period=period)
            stored = sum(rows.values_list("value", flat=True))
            if stored != value(url, name):
                problems.append(f"{name}: API {value(url, name)} != PostgreSQL {stored} after a flush")
        print(f"bench: flushed {stats.values} values, {stats.members} members in {flush_seconds:.2f}s")
        print(f"bench: load average after {load()}")
    finally:
        processes.stop()

    print_table()
    print(
        "exactness: "
        + (
            "OK (API == 2xx seen by the load generators == PostgreSQL after flush)"
            if not problems
            else "FAILED\n  " + "\n  ".join(problems)
        )
    )
    return 1 if problems else 0


def print_table() -> None:
    by_name = {s.name: s for s in SCENARIOS}
    head = f"{'endpoint':34} {'peak req/s':>10} {'x base':>6} {'c16 req/s':>9} {'p50':>6} {'p99':>6}"
    head += f" {'c400 p99':>8} | {'70% rate':>8} {'p50':>6} {'p99':>6} | {'CPU ms':>6} {'/core/s':>7}"
    head += f" | {'script us':>9} {'calls/req':>9}"
    print()
    print(head + "   (latencies in ms)")
    print("-" * len(head))
    for scenario in SCENARIOS:
        runs = scenario.runs
        peak = max((r for c, r in runs.items() if c != "fixed"), key=lambda r: r["rps"])
        base = max((r["rps"] for c, r in by_name[scenario.compare_to].runs.items() if c != "fixed"))
        ratio = "" if scenario.name == scenario.compare_to else f"{peak['rps'] / base:.2f}"
        c16, c400, fixed = runs[16], runs[400], runs["fixed"]
        line = f"{scenario.label:34} {peak['rps']:>10.0f} {ratio:>6} {c16['rps']:>9.0f} {ms(c16['p50_us']):>6}"
        line += f" {ms(c16['p99_us']):>6} {ms(c400['p99_us']):>8} | {fixed['rps']:>8.0f} {ms(fixed['p50_us']):>6}"
        line += f" {ms(fixed['p99_us']):>6} | {peak['cpu_ms']:>6.2f} {1000 / peak['cpu_ms']:>7.0f}"
        per_request = peak["script_calls"] / max(1, peak["requests"])
        line += f" | {peak['script_us']:>9.1f} {per_request:>9.2f}" if peak["script_calls"] else f" | {'-':>9} {'-':>9}"
        print(line)
    if "reference" in by_name and "increment" in by_name:
        reference, increment = (
            max((r for c, r in by_name[n].runs.items() if c != "fixed"), key=lambda r: r["rps"])
            for n in ("reference", "increment")
        )
        print(
            f"\nincrement against bench-seed's reference on one core: {increment['rps'] / reference['rps']:.2f} of its "
            f"peak req/s, {reference['cpu_ms'] / increment['cpu_ms']:.2f} of its requests per CPU-second"
        )
    if "batch" in by_name:
        best = max(r["rps"] for c, r in by_name["batch"].runs.items() if c != "fixed")
        print(f"\nbatch updates: {best * BATCH_SIZE:.0f} counter updates/s at {best:.0f} requests/s of {BATCH_SIZE}")
    print("x base: against the baseline's peak (GET 10 against GET one, keyed increment against increment)")
    print("CPU ms: gunicorn CPU per request at peak; /core/s: requests one fully busy core serves at that cost")
    print("script us: Redis CPU per script call (EVALSHA) at peak (INFO commandstats); calls/req: calls per request")


if __name__ == "__main__":
    sys.exit(main())
