"""Django served as WSGI on a bounded thread pool, behind the ASGI entry point.

Django's own ASGI handler runs every sync view of a worker on one thread (``thread_sensitive``):
one slow statistics query or admin page would hold up every other non-hot request of that
worker. Here each request runs on a thread of a pool of ``GUNICORN_THREADS`` (as gthread ran it
before the fast lane), so the endpoints that are not on the lane keep that concurrency.
"""

import asyncio
import io
import sys
from concurrent.futures import ThreadPoolExecutor

from .request_body import BodyTooLarge, read_body


class ThreadedWsgi:
    def __init__(self, app, *, threads: int, body_limit: int, too_large) -> None:
        self.app = app
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="django")
        self.body_limit = body_limit
        self.too_large = too_large

    async def __call__(self, scope, receive, send) -> None:
        try:
            body = await read_body(scope, receive, self.body_limit)
        except BodyTooLarge:
            return await self.too_large(scope, send)
        environ = wsgi_environ(scope, body)
        status, headers, content = await asyncio.get_running_loop().run_in_executor(self.pool, self._run, environ)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    def _run(self, environ: dict) -> tuple[int, list, bytes]:
        started: dict = {}

        def start_response(status: str, headers: list, exc_info=None):
            started["status"] = int(status.split(" ", 1)[0])
            started["headers"] = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            return lambda data: chunks.append(data)

        chunks: list[bytes] = []
        result = self.app(environ, start_response)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return started["status"], started["headers"], b"".join(chunks)


def wsgi_environ(scope, body: bytes) -> dict:
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    query = scope["query_string"].decode("latin-1")
    raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": query,
        "RAW_URI": raw_path + (f"?{query}" if query else ""),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] if server[1] is not None else 80),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name == "CONTENT_TYPE" or name == "CONTENT_LENGTH":
            environ[name] = value
            continue
        key = f"HTTP_{name}"
        if key in environ:
            value = f"{environ[key]}{'; ' if name == 'COOKIE' else ','}{value}"
        environ[key] = value
    if body or "CONTENT_LENGTH" in environ:
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ
