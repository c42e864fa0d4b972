"""The reference of ``make bench-seed``: the Python ceiling of this machine under the production server
configuration. One INCRBY through the fast lane's coalesced round trip; no validation, auth or Lua."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "counterproject.settings")
django.setup()

from counters.fastlane.store import lane_store  # noqa: E402

HEADERS = [(b"content-type", b"application/json")]


async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    value = await lane_store().command("INCRBY", "bench:reference", 1)
    body = b'{"success":true,"current_value":%d}' % value
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": body})
