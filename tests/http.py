"""JSON requests through Django's test client, shared by the API tests."""

import json

from django.test import Client


def post(client: Client, url: str, body, headers: dict | None = None, *, raw: bool = False, method: str = "post"):
    """Send ``body`` as JSON (or, with ``raw``, as the bytes or text given) with ``headers`` (WSGI names)."""
    data = body if raw else json.dumps(body)
    return getattr(client, method)(url, data=data, content_type="application/json", **(headers or {}))


class ServerClient:
    """Django's test ``Client`` calls (``get``, ``post`` with WSGI-style headers) sent to a real server.

    The contract run (tests/test_contract.py) gives it to the REST v1 and cloud-function suites in
    place of the in-process client, so those suites also check what the real server answers.
    """

    def __init__(self, url: str) -> None:
        import requests

        self.url = url
        self.session = requests.Session()

    @staticmethod
    def _headers(extra: dict) -> dict:
        headers = {}
        for name, value in extra.items():
            if name.startswith("HTTP_"):
                headers[name[5:].replace("_", "-").title()] = value
            elif name == "CONTENT_TYPE":
                headers["Content-Type"] = value
        return headers

    def get(self, path: str, data: dict | None = None, **extra):
        return self.session.get(self.url + path, params=data, headers=self._headers(extra), timeout=30)

    def post(self, path: str, data=None, content_type: str = "application/json", **extra):
        if isinstance(data, dict | list):
            data = json.dumps(data)
        headers = {"Content-Type": content_type, **self._headers(extra)}
        body = data.encode() if isinstance(data, str) else data
        return self.session.post(self.url + path, data=body, headers=headers, timeout=30)
