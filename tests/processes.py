"""Real processes for tests: gunicorn, Celery, private redis-servers, on free loopback ports."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests
from django.conf import settings

from .clock import process_clock_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url() -> str:
    db = settings.DATABASES["default"]
    user = db.get("USER") or ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{db['NAME']}"


def service_env(**overrides: str) -> dict[str, str]:
    """Environment for a child process that uses the same test database and Redis as the tests."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="counterproject.settings_test",
        DATABASE_URL=test_database_url(),
        TEST_REDIS_URL=settings.REDIS_URL,
        TEST_BROKER_URL=settings.CELERY_BROKER_URL,
        PYTHONUNBUFFERED="1",
        **process_clock_env(),
    )
    env.update(overrides)
    return env


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: R running, S sleeping, T stopped, Z zombie."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (gunicorn's workers, for its arbiter)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def accepts_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` still waits for new connections on the loopback socket listening on ``port``:
    its epoll set (``/proc/<pid>/fdinfo``) watches that socket. On SIGTERM the uvicorn worker closes the
    socket (with the arbiter's copy closed too, nothing listens on the port any more): it accepts nothing."""
    inode = next(
        (
            fields[9]
            for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port
        ),
        None,
    )
    if inode is None:
        return False
    targets = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            targets[fd.name] = os.readlink(fd)
    listeners = {fd for fd, target in targets.items() if target == f"socket:[{inode}]"}
    for fd, target in targets.items():
        if target == "anon_inode:[eventpoll]":
            watched = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
            if any(line.startswith("tfd:") and line.split()[1] in listeners for line in watched):
                return True
    return False


def wait_until(predicate, *, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def started_or_killed(process: subprocess.Popen, wait) -> None:
    """Run ``wait`` (for a process to be ready); if it fails, kill the process group before raising, so
    no server outlives a test that could not start it."""
    try:
        wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        process.wait(timeout=30)
        raise


class Gunicorn:
    """A gunicorn serving the project from the production config, on a free port."""

    def __init__(self, *, workers: int = 2, env: dict[str, str] | None = None, extra_args: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="gunicorn-", suffix=".log", delete=False)  # noqa: SIM115
        args = [str(BIN / "gunicorn"), "counterproject.asgi", "-c", str(ROOT / "gunicorn.conf.py")]
        args += ["--bind", f"127.0.0.1:{self.port}", "--workers", str(workers), *extra_args]
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=service_env(**(env or {})), stdout=self.log, stderr=self.log
        )
        # Start-up waits are generous: on a loaded machine importing Django alone can take seconds.
        healthy = lambda: requests.get(f"{self.url}/healthz", timeout=5).status_code == 200  # noqa: E731
        started_or_killed(self.process, lambda: wait_until(healthy, timeout=90, what="gunicorn"))

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            Path(self.log.name).unlink(missing_ok=True)


class CeleryWorker:
    """``celery -A counterproject worker`` as the Procfile runs it, in a process group of its own."""

    def __init__(self, *, pool: str = "prefork", concurrency: int = 1, env: dict[str, str] | None = None):
        self.log = tempfile.NamedTemporaryFile(prefix="celery-", suffix=".log", delete=False)  # noqa: SIM115
        args = [str(BIN / "celery"), "-A", "counterproject", "worker", "--loglevel=INFO"]
        args += [f"--pool={pool}", f"--concurrency={concurrency}"]
        args += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=service_env(**(env or {})),
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )
        started_or_killed(
            self.process, lambda: wait_until(lambda: "ready." in self.output(), timeout=90, what="the celery worker")
        )

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self, timeout: float = 60) -> int:
        """Warm shutdown (SIGTERM: running tasks finish); kill -9 if it takes longer than ``timeout``."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            return self.process.returncode

    def kill_all(self) -> None:
        """kill -9 of the worker and its pool processes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill_all()
        Path(self.log.name).unlink(missing_ok=True)


class PrivateRedis:
    """A redis-server of the test's own, on a free port, that the test may kill and restart."""

    def __init__(self, *, appendonly: bool = False):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-")
        self.appendonly = appendonly
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.dir]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: redis.Redis(port=self.port).ping(), timeout=60, what="private redis-server")

    def kill(self) -> None:
        """kill -9: no shutdown save, connections drop."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and connects still succeed, but nothing is answered."""
        self.process.send_signal(signal.SIGSTOP)
        wait_until(lambda: process_state(self.process.pid) == "T", what="redis-server to stop")

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateCluster:
    """A Redis Cluster of the test's own: ``primaries`` primaries with one replica each, on free loopback
    ports (``redis-server --cluster-enabled yes`` + ``redis-cli --cluster create``, as ``make cluster``).

    ``cluster-node-timeout`` is short so that a replica takes over about two seconds after its primary
    dies; ``cluster-require-full-coverage no`` keeps the other primaries serving meanwhile.
    """

    NODE_TIMEOUT_MS = 1000

    def __init__(self, *, primaries: int = 3):
        self.dir = tempfile.mkdtemp(prefix="redis-cluster-")
        ports: list[int] = []
        while len(ports) < primaries * 4:  # a client port and a cluster bus port per node, all distinct
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.ports = ports[: primaries * 2]
        self.bus_ports = dict(zip(self.ports, ports[primaries * 2 :], strict=True))
        self.processes: dict[int, subprocess.Popen] = {}
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        try:
            for port in self.ports:
                self.start_node(port)
            subprocess.run(
                ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=120,
            )
            wait_until(self.ready, timeout=60, what="redis cluster to serve every slot on every node")
        except BaseException:
            self.close()  # no node outlives a cluster that could not start
            raise
        self.url = "redis://" + ",".join(nodes[:primaries])

    def start_node(self, port: int) -> None:
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.dir, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        args += ["--cluster-node-timeout", str(self.NODE_TIMEOUT_MS), "--cluster-require-full-coverage", "no"]
        # The cluster bus port is given too: port + 10000 (the default) may be taken or above 65535.
        args += ["--cluster-replica-validity-factor", "0", "--cluster-port", str(self.bus_ports[port])]
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: redis.Redis(port=port).ping(), timeout=60, what="cluster redis-server")

    def ready(self) -> bool:
        for port, process in self.processes.items():
            if process.poll() is not None:
                continue
            info = redis.Redis(port=port).cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                return False
        return True

    def primaries(self) -> list[int]:
        """Ports of the live primaries, as the live nodes see them."""
        found = set()
        for port, process in self.processes.items():
            if process.poll() is not None:
                continue
            for line in redis.Redis(port=port).execute_command("CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                if "master" in fields[2] and "fail" not in fields[2]:
                    found.add(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
            break
        return sorted(found)

    def port_of_key(self, key: str) -> int:
        live = next(port for port, process in self.processes.items() if process.poll() is None)
        slot = redis.Redis(port=live).cluster("keyslot", key)
        for start, end, primary, *_ in redis.Redis(port=live).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise LookupError(key)

    def wait_replicated(self, port: int) -> None:
        """Until the replica of primary ``port`` has every write the primary has (replication is
        asynchronous: without this a kill -9 may lose the primary's last acknowledged writes)."""

        def caught_up() -> bool:
            info = redis.Redis(port=port).info("replication")
            return info["connected_slaves"] > 0 and info["slave0"]["offset"] == info["master_repl_offset"]

        wait_until(caught_up, timeout=30, what="the replica to catch up")

    def kill(self, port: int) -> None:
        """kill -9 one node."""
        process = self.processes[port]
        if process.poll() is None:
            process.kill()
            process.wait()

    def flush(self) -> None:
        for port in self.primaries():
            redis.Redis(port=port).flushall()

    def close(self) -> None:
        for port in list(self.processes):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)
