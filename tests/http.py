"""JSON requests through Django's test client, shared by the API tests."""

import json

from django.test import Client


def post(client: Client, url: str, body, headers: dict | None = None, *, raw: bool = False, method: str = "post"):
    """Send ``body`` as JSON (or, with ``raw``, as the bytes or text given) with ``headers`` (WSGI names)."""
    data = body if raw else json.dumps(body)
    return getattr(client, method)(url, data=data, content_type="application/json", **(headers or {}))
