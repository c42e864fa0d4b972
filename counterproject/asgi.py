"""The web process's entry point (gunicorn with uvicorn workers, see gunicorn.conf.py).

A small router: the hot requests (REST v1 increment, decrement, presence heartbeat, GET one, GET
up to 10, batch update; getCounter, increaseCounter, decreaseCounter) go to the fast lane's async handlers
(``counters.fastlane``); everything else, and any hot request whose Host Django would refuse, to
Django, served as WSGI on a bounded thread pool (``counterproject.threaded_wsgi``).
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "counterproject.settings")

django_wsgi = get_wsgi_application()

from django.conf import settings  # noqa: E402 (after Django is set up)

from counters.api_errors import error_response  # noqa: E402
from counters.errors import RequestTooLarge  # noqa: E402
from counters.fastlane import http as lane_http  # noqa: E402
from counters.fastlane import streams  # noqa: E402
from counters.fastlane.handlers import route, serve  # noqa: E402
from counters.fastlane.http import host_allowed, send_json  # noqa: E402
from counters.redis_store import store_check  # noqa: E402

from .request_body import BodyTooLarge, read_body  # noqa: E402
from .threaded_wsgi import ThreadedWsgi  # noqa: E402

FAST_LANE = os.environ.get("COUNTER_FAST_LANE", "1") != "0"

# A Redis Cluster that is misconfigured (no seed answers, slots not served) stops the start here.
store_check()


async def too_large(scope, send) -> None:
    """413 in the error shape of the surface that was called; the body is not read further."""
    shape = "function" if scope["path"].startswith("/api/v1/functions/") else "rest"
    response = error_response(RequestTooLarge(), shape)
    extra = [(k.lower().encode(), v.encode()) for k, v in response.items() if k.lower() != "content-type"]
    await send_json(send, response.status_code, response.content, extra)


django_app = ThreadedWsgi(
    django_wsgi,
    threads=int(os.environ.get("GUNICORN_THREADS", "8")),
    body_limit=settings.COUNTER_MAX_BODY_BYTES,
    too_large=too_large,
)


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    if scope["type"] != "http":
        return None
    lane = FAST_LANE and not scope.get("root_path")
    # Server-sent event streams are the ASGI layer's too: Django's thread pool could not hold 1,000.
    if lane and scope["path"] == streams.PATH and scope["method"] == "GET" and host_allowed(scope):
        return await streams.serve_stream(scope, receive, send)
    hot = route(scope["method"], scope["path"]) if lane else None
    if hot is None or not host_allowed(scope):
        return await django_app(scope, receive, send)
    try:
        body = await read_body(scope, receive, lane_http.body_limit)
    except BodyTooLarge:
        return await too_large(scope, send)
    handler, shape, params = hot
    await serve(scope, body, send, handler, shape, params)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
