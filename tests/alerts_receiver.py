"""A local HTTP server standing in for webhook receivers, game servers and SMS gateways."""

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """Answers each POST with the next status of ``statuses`` (then 200), after ``hang`` seconds, or
    with ``held``, not before ``release()``."""

    def __init__(self, *, statuses: list[int] | None = None, hang: float = 0.0, held: bool = False):
        self.statuses = list(statuses or [])
        self.hang = hang
        self.held = threading.Event()
        if not held:
            self.held.set()
        self.answered = 0
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers), body, time.monotonic()))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                if receiver.hang:
                    time.sleep(receiver.hang)
                receiver.held.wait()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    self.wfile.write(b"ok" if status < 300 else b"receiver says no")
                    with receiver._lock:
                        receiver.answered += 1
                except OSError:
                    pass  # the client gave up (timeout) before we answered

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.held.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
