"""What uvicorn's ASGI cycle costs a request, beside a bare httptools protocol (why
``counterproject/lane_protocol.py`` answers the hot requests itself).

    .venv/bin/python bench/server_overhead.py

Two servers answer every POST with the same fixed JSON reply and do no other work: uvicorn
(uvloop + httptools, the worker's settings) running a five-line ASGI application, and an asyncio
protocol on uvloop that parses with httptools and writes the reply. Each runs alone on core
``BENCH_SERVER_CPUS`` (default 0) while wrk (``BENCH_CLIENT_CPUS``, default 1; c64, keep-alive)
loads it; the rounds alternate so a noisy neighbour touches both alike. Printed: req/s and the
server's CPU per request. The difference is what uvicorn's scope, cycle, receive/send messages and
reply checks cost per request; the fast lane's own work comes on top of either.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import cpu_seconds, load  # noqa: E402
from tests.processes import free_port, wait_until  # noqa: E402

BIN = Path(sys.executable).parent
SERVER_CPUS = os.environ.get("BENCH_SERVER_CPUS", "0")
CLIENT_CPUS = os.environ.get("BENCH_CLIENT_CPUS", "1")
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))

REPLY = b'{"success":true,"current_value":1}'

ASGI_APP = f"""
HEADERS = [(b"content-type", b"application/json")]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await receive()
    await send({{"type": "http.response.start", "status": 200, "headers": HEADERS}})
    await send({{"type": "http.response.body", "body": {REPLY!r}}})
"""

BARE_PROTOCOL = f"""
import asyncio, sys
import httptools, uvloop
HEAD = b"HTTP/1.1 200 OK\\r\\nserver: uvicorn\\r\\ncontent-type: application/json\\r\\n"
REPLY = HEAD + b"content-length: {len(REPLY)}\\r\\n\\r\\n" + {REPLY!r}
class Bare(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser = transport, httptools.HttpRequestParser(self)
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_message_complete(self):
        self.transport.write(REPLY)
async def main():
    server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
uvloop.run(main())
"""

WRK_POST = 'wrk.method = "POST"; wrk.body = \'{"value":1}\'; wrk.headers["Content-Type"] = "application/json"\n'


def measure(port: int, pid: int, script: str) -> tuple[float, float]:
    before = cpu_seconds(pid)
    out = subprocess.run(
        [
            "taskset",
            "-c",
            CLIENT_CPUS,
            "wrk",
            "-t1",
            "-c64",
            f"-d{SECONDS}s",
            "-s",
            script,
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    spent = cpu_seconds(pid) - before
    return rate, spent / (rate * SECONDS) * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "trivial_asgi.py").write_text(ASGI_APP)
        Path(tmp, "bare.py").write_text(BARE_PROTOCOL)
        script = Path(tmp, "post.lua")
        script.write_text(WRK_POST)
        ports = {"uvicorn + ASGI app": free_port(), "bare httptools protocol": free_port()}
        uvicorn_args = ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
        commands = {
            "uvicorn + ASGI app": [str(BIN / "uvicorn"), "trivial_asgi:app", "--port", "{port}", *uvicorn_args],
            "bare httptools protocol": [sys.executable, "bare.py", "{port}"],
        }
        servers = {}
        try:
            for name, command in commands.items():
                args = ["taskset", "-c", SERVER_CPUS, *(a.format(port=ports[name]) for a in command)]
                servers[name] = subprocess.Popen(args, cwd=tmp)
            for name, port in ports.items():
                wait_until(lambda port=port: _answers(port), timeout=30, what=name)
            best: dict[str, tuple[float, float]] = {}
            for _ in range(ROUNDS):
                for name, port in ports.items():
                    rate, us = measure(port, servers[name].pid, str(script))
                    if name not in best or rate > best[name][0]:
                        best[name] = (rate, us)
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=10)
    print(f"load {load()}; one core each, wrk c64, best of {ROUNDS} x {SECONDS}s")
    print(f"{'server':<26} {'req/s':>10} {'CPU us/request':>15}")
    for name, (rate, us) in best.items():
        print(f"{name:<26} {rate:10,.0f} {us:15.1f}")
    (_, slow), (_, fast) = best.values()
    print(f"uvicorn's ASGI cycle: {slow - fast:.1f} us of CPU per request")


def _answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        time.sleep(0.1)
        return False


if __name__ == "__main__":
    main()
