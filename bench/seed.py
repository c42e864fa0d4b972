"""make bench-seed: the seed's acceptance command as written, against the production configuration.

``wrk -t12 -c400 -d30s --latency`` POSTs to ``/api/v1/counter/online_players/increment`` (with a
key, bench/seed.lua) on the service started as ``make run`` starts it (honcho with the Procfile:
gunicorn on every core, the Celery worker and beat). ``online_players`` is a presence counter
(docs/presence.md): each request carries a ``user_id`` never sent before, a login that opens a
lease (the bench sets its lease to the longest, 3,600 s, so none lapses during the run). Then the
same wrk with the seed's body ``{"value":1}`` against a plain counter (``bench_0``), and, in the same
run and under the same server configuration, the **reference**: a raw ASGI handler of a few lines
(bench/reference.py) that does one INCRBY through the same coalescing, with no validation, auth or
Lua, the Python ceiling of the machine.

Exactness: the count after each wrk run lies between the 2xx wrk saw and the requests it sent (it
stops with requests in flight); hey sends exactly 5,000 plain increments, and 50 threads exactly
2,000 logins of new users then their 2,000 logouts: each value moves by exactly the 200s seen;
PostgreSQL (written by the worker's flush) must equal the API for both counters.

Beside each run's req/s, P50, P99 and non-2xx: the CPU time per answered request of each role (the
web workers, the private redis-server, the Celery worker and beat, PostgreSQL, wrk itself), read from
``/proc`` around the run. On a machine whose cores are all busy they add up to what the ratio to the
reference is made of (bench/README.md, "Where the box's time goes").

The machine is shared: a neighbour's load moves from one half-minute to the next, and with it a
ratio of two runs made one after the other (the same code gave 0.55 to 0.91 in one hour). So both
servers stay up side by side and the runs alternate in ``SEED_ROUNDS`` rounds (default 3: logins,
plain increment, reference, again and again); each round's ratios are printed, and their median.

Environment: ``BENCH_DATABASE_URL`` (default as bench/run.py), ``SEED_DURATION`` (default 30s),
``SEED_ARGS`` to change wrk's arguments, ``SEED_ROUNDS`` (default 3; 1 for a quick look).
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import DATABASE_URL, PLAIN, Processes, django_setup, ensure_database, load  # noqa: E402
from bench.run import value as settled_value  # noqa: E402
from tests.processes import free_port, wait_until  # noqa: E402

BIN = Path(sys.executable).parent
WRK_ARGS = os.environ.get("SEED_ARGS", f"-t12 -c400 -d{os.environ.get('SEED_DURATION', '30s')} --latency").split()
PRESENCE = "online_players"
INCREMENT = f"/api/v1/counter/{PRESENCE}/increment"
PLAIN_INCREMENT = f"/api/v1/counter/{PLAIN}/increment"
LOGINS = 2000
ROUNDS = int(os.environ.get("SEED_ROUNDS", "3"))


def cpu_by_role(roles: dict[str, object]) -> dict[str, float]:
    """CPU seconds so far of each role's live processes: ``roles`` maps a role to a predicate of
    ``(pid, its ancestors' pids, command line)``; a process counts in the first role that takes it."""
    tick = os.sysconf("SC_CLK_TCK")
    processes = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = rest.rsplit(") ", 1)[1].split()
        # utime, stime, and those of its children that exited (a PostgreSQL backend that closed)
        processes[int(pid)] = (int(fields[1]), cmdline, sum(int(f) for f in fields[11:15]) / tick)
    totals = dict.fromkeys(roles, 0.0)
    for pid, (parent, cmdline, seconds) in processes.items():
        ancestors = set()
        while parent in processes and parent not in ancestors:
            ancestors.add(parent)
            parent = processes[parent][0]
        for role, takes in roles.items():
            if takes(pid, ancestors, cmdline):
                totals[role] += seconds
                break
    return totals


def wrk(url: str, key: str, body: str, roles: dict | None = None) -> dict:
    """The seed's wrk against ``url``; with ``roles``, the CPU µs per answered request of each role
    (bench/README.md: where the machine's time goes, the load generator's included)."""
    args = ["wrk", *WRK_ARGS, "-s", str(ROOT / "bench" / "seed.lua"), url]
    env = dict(os.environ, SEED_KEY=key, SEED_BODY=body, SEED_RUN=f"r{time.time_ns()}")
    before = cpu_by_role(roles or {})
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, args, out)
    after = cpu_by_role(roles or {})
    cpu = {role: after[role] - before[role] for role in before}
    cpu["wrk"] = usage.ru_utime + usage.ru_stime
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    counts = json.loads(re.search(r"^SEED (.*)$", out, re.MULTILINE).group(1))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": latency.get("50", "?"),
        "p99": latency.get("99", "?"),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "none",
        "cpu_us": {role: seconds * 1e6 / max(counts["ok"], 1) for role, seconds in cpu.items()},
        **counts,
    }


def hey_increments(url: str, key: str, count: int) -> dict[int, int]:
    args = ["hey", "-n", str(count), "-c", "50", "-m", "POST", "-H", f"Authorization: Bearer {key}"]
    args += ["-T", "application/json", "-d", '{"value":1}', url + PLAIN_INCREMENT]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=True).stdout
    return {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}


def presence_calls(url: str, key: str, path: str, users: list[str]) -> dict[int, int]:
    """One POST per user (a login or logout), from 50 threads; how many of each status came back."""
    headers = {"Authorization": f"Bearer {key}"}
    address = f"{url}/api/v1/counter/{PRESENCE}/{path}"

    def send(chunk: list[str]) -> list[int]:
        with requests.Session() as session:
            return [session.post(address, json={"user_id": u}, headers=headers, timeout=60).status_code for u in chunk]

    statuses: dict[int, int] = {}
    with ThreadPoolExecutor(50) as pool:
        for result in pool.map(send, [users[i::50] for i in range(50)]):
            for status in result:
                statuses[status] = statuses.get(status, 0) + 1
    return statuses


def value(url: str, name: str = PRESENCE) -> int:
    """The value once the server has drained what wrk left queued when it stopped (its timeouts)."""
    return settled_value(url, name)


def check_window(label: str, run: dict, before: int, after: int, problems: list[str]) -> None:
    """wrk stops with requests in flight: the server may have applied some it never saw answered."""
    if not run["ok"] <= after - before <= run["sent"]:
        problems.append(f"{label}: grew by {after - before}, wrk saw {run['ok']} 2xx of {run['sent']} sent")


class Service:
    """``make run``'s processes (honcho, the Procfile) on a free port, with the bench database and Redis."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-seed-", suffix=".log", delete=False)  # noqa: SIM115
        env = dict(os.environ, DATABASE_URL=DATABASE_URL, REDIS_URL=redis_url, PORT=str(self.port))
        env.update(CELERY_BROKER_URL=redis_url[:-1] + "1", PATH=f"{BIN}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [str(BIN / "honcho"), "start", "-f", "Procfile"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )
        wait_until(lambda: requests.get(f"{self.url}/healthz", timeout=1).ok, timeout=60, what="make run's web")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        Path(self.log.name).unlink(missing_ok=True)


class Reference:
    """bench/reference.py under the same gunicorn.conf.py."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, DATABASE_URL=DATABASE_URL, REDIS_URL=redis_url, PYTHONPATH=str(ROOT))
        args = [str(BIN / "gunicorn"), "bench.reference:application", "-c", str(ROOT / "gunicorn.conf.py")]
        args += ["--bind", f"127.0.0.1:{self.port}"]
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: requests.post(self.url, timeout=1).ok, timeout=60, what="the reference")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def roles(root: int, redis_pid: int) -> dict:
    """The roles of ``cpu_by_role`` for a server started as ``root`` (``make run``'s honcho, or the reference)."""
    return {
        "web": lambda pid, up, cmd: (pid == root or root in up) and "gunicorn" in cmd,
        "celery": lambda pid, up, cmd: root in up and "celery" in cmd,
        "redis": lambda pid, up, cmd: pid == redis_pid,
        "postgres": lambda pid, up, cmd: cmd.startswith("postgres"),
    }


ROLES = ("web", "redis", "celery", "postgres", "wrk")


def main() -> int:
    for tool in ("wrk", "hey", "redis-server"):
        if not shutil.which(tool):
            raise SystemExit(f"bench-seed: {tool} is missing (make bench-seed installs wrk and hey)")
    ensure_database(DATABASE_URL)
    stores = Processes()  # only its private redis-server is used here
    problems = []
    rounds: list[dict[str, dict]] = []
    try:
        stores.start_redis()
        key = django_setup(stores.redis_url)
        from django.core.management import call_command

        from counters.models import Counter

        call_command("setup_schedules", verbosity=0)  # as make run does: beat schedules the flush
        # No lease lapses during the run: every login counts until it logs out.
        Counter.objects.filter(app__slug="default", name=PRESENCE).update(lease_seconds=Counter.MAX_LEASE_SECONDS)
        print(f"bench-seed: wrk {' '.join(WRK_ARGS)}, {ROUNDS} round(s); load average before {load()}", flush=True)
        service = Service(stores.redis_url)
        reference_server = None
        try:
            for _ in range(2):  # warm every worker (config snapshot, hydration, connections)
                hey_increments(service.url, key, 200)
            presence_calls(service.url, key, "increment", [f"warm-{i}" for i in range(200)])
            reference_server = Reference(stores.redis_url)
            requests.post(reference_server.url, timeout=5)
            service_roles = roles(service.process.pid, stores.redis.pid)
            reference_roles = roles(reference_server.process.pid, stores.redis.pid)
            plans = {
                "logins": (service.url + INCREMENT, "login", service_roles, PRESENCE),
                "plain": (service.url + PLAIN_INCREMENT, "increment", service_roles, PLAIN),
                "reference": (reference_server.url, "increment", reference_roles, None),
            }
            names = list(plans)
            for number in range(1, ROUNDS + 1):
                runs = {}
                # Each round starts one further along (logins first, then plain, then the
                # reference): no run always follows the same one.
                for name in names[(number - 1) % 3 :] + names[: (number - 1) % 3]:
                    url, body, run_roles, counted = plans[name]
                    before = value(service.url, counted) if counted else 0
                    runs[name] = wrk(url, key, body, run_roles)
                    if counted:
                        after = value(service.url, counted)
                        check_window(f"round {number}: wrk {name}", runs[name], before, after, problems)
                rounds.append({name: runs[name] for name in names})
                print(f"bench-seed: round {number} done, load {load()}", flush=True)
            reference_server.stop()
            reference_server = None
            exactness(service.url, key, problems)
        finally:
            service.stop()
            if reference_server is not None:
                reference_server.stop()
        print(f"bench-seed: load average after {load()}")
    finally:
        stores.stop()
    report(rounds, problems)
    return 1 if problems or any(run["non2xx"] for runs in rounds for run in runs.values()) else 0


def exactness(url: str, key: str, problems: list[str]) -> None:
    """hey's 5,000 increments and the threads' logins and logouts: each value moves by exactly the
    200s seen; then PostgreSQL (the worker's flush) must equal the API."""
    from counters.models import CounterValue

    before = value(url, PLAIN)
    statuses = hey_increments(url, key, 5000)
    applied = value(url, PLAIN) - before
    if applied != statuses.get(200, 0) or set(statuses) != {200}:
        problems.append(f"hey: {statuses}, applied {applied}")
    users = [f"exact-{i}" for i in range(LOGINS)]
    for path, sign in (("increment", 1), ("decrement", -1)):
        before = value(url)
        statuses = presence_calls(url, key, path, users)
        applied = sign * (value(url) - before)
        if applied != statuses.get(200, 0) or set(statuses) != {200}:
            problems.append(f"{LOGINS} {path}s (logins/logouts): {statuses}, applied {applied}")

    def flushed(name: str) -> bool:
        row = CounterValue.objects.filter(counter__app__slug="default", counter__name=name).first()
        return row is not None and row.value == value(url, name)

    for name in (PRESENCE, PLAIN):
        try:
            wait_until(lambda name=name: flushed(name), timeout=30, interval=0.5, what="the worker's flush")
        except AssertionError:
            problems.append(f"{name}: PostgreSQL != API 30 s after the last update")


LABELS = {
    "logins": "service: logins (presence)",
    "plain": "service: plain increment",
    "reference": "reference (raw, coalesced)",
}


def report(rounds: list[dict[str, dict]], problems: list[str]) -> None:
    """Each round's runs and where their CPU went, then the ratios of each round and their median."""
    for number, runs in enumerate(rounds, 1):
        print()
        print(f"{f'round {number}':28} {'req/s':>9} {'P50':>9} {'P99':>9} {'non-2xx':>8}  socket errors")
        for name, run in runs.items():
            row = f"{run['rps']:>9.0f} {run['p50']:>9} {run['p99']:>9} {run['non2xx']:>8}  {run['socket_errors']}"
            print(f"{LABELS[name]:28} {row}")
        print(f"{'CPU µs per 2xx':28} " + " ".join(f"{role:>9}" for role in (*ROLES, "total")))
        for name, run in runs.items():
            cpu = run["cpu_us"]
            columns = " ".join(f"{cpu.get(role, 0):>9.1f}" for role in ROLES)
            print(f"{LABELS[name]:28} {columns} {sum(cpu.values()):>9.1f}")
    print()
    for name in ("logins", "plain"):
        ratios = [runs[name]["rps"] / runs["reference"]["rps"] for runs in rounds]
        each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"service / reference, {name}: {each} (median {statistics.median(ratios):.2f})")
    print(
        "exactness: "
        + (
            "OK (wrk's windows; hey's and the logins' 200s == applied; PostgreSQL == API)"
            if not problems
            else "FAILED: " + "; ".join(problems)
        )
    )


if __name__ == "__main__":
    sys.exit(main())
