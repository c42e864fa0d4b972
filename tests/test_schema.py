"""The OpenAPI schema: it validates, its examples are real replies, and a bounded schemathesis run
against a live server finds no server error and no reply that breaks the schema."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate

from counters.flush import counters_flush
from counters.models import App, Counter, Threshold

pytestmark = pytest.mark.usefixtures("midday")  # daily counters on a pinned clock


def fetch_schema(client) -> dict:
    response = client.get("/api/schema/?format=json")
    assert response.status_code == 200
    return json.loads(response.content)


@pytest.mark.django_db
def test_the_schema_validates_and_covers_both_surfaces(client):
    schema = fetch_schema(client)
    validate(schema)
    paths = set(schema["paths"])
    assert {f"/api/v1/functions/{name}" for name in FUNCTIONS} <= paths
    assert {"/api/v1/counter/{name}", "/api/v1/counter/{name}/increment", "/api/v1/counters", "/api/v1/stats"} <= paths
    assert yaml.safe_load(client.get("/api/schema/").content)["openapi"].startswith("3.")


@pytest.mark.django_db
def test_the_docs_page_works_offline(client):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "swagger-ui" in html and "/api/schema/" in html
    # Every script and stylesheet is served by the service itself (no CDN).
    assert "cdn" not in html.lower() and "//unpkg" not in html
    scripts = re.findall(r'src="([^"]+\.js)"', html)
    assert scripts
    for src in scripts:
        assert client.get(src).status_code == 200, src


FUNCTIONS = ["getCounter", "increaseCounter", "decreaseCounter", "resetCounter", "getCounterStats"]


@pytest.fixture
def example_world(builtins, make_key):
    """What the schema's examples talk about: app "default" with its built-in counters and energy_points."""
    default = App.objects.get(slug="default")
    Counter.objects.create(app=default, name="energy_points", scope="user")
    Threshold.objects.create(counter=Counter.objects.get(app=default, name="total_games_played"), value=1)
    return make_key(("write", "counter_manage", "data_view"))


def _shape_differences(real, example, path: str = "") -> list[str]:
    """Where ``real`` differs from the example in fields or types (values, times and ids may differ).
    null matches only null, and every element of a list is compared with the example's first."""
    if isinstance(real, dict):
        if not isinstance(example, dict):
            return [f"{path}: object, example has {type(example).__name__}"]
        if set(real) != set(example):
            return [f"{path}: fields {sorted(set(real) ^ set(example))} differ"]
        return [d for key in real for d in _shape_differences(real[key], example[key], f"{path}.{key}")]
    if isinstance(real, list):
        if not isinstance(example, list) or bool(real) != bool(example):
            return [f"{path}: list, example {example!r}"]
        return [d for i, item in enumerate(real) for d in _shape_differences(item, example[0], f"{path}[{i}]")]
    if type(real) is not type(example):
        return [f"{path}: {type(real).__name__}, example has {type(example).__name__}"]
    return []


def test_the_shape_comparison_can_fail():
    example = {"a": 1, "b": None, "c": [{"x": "s"}]}
    assert _shape_differences({"a": 2, "b": None, "c": [{"x": "t"}, {"x": "u"}]}, example) == []
    assert _shape_differences({"a": 2, "b": 3, "c": [{"x": "t"}]}, example) == [".b: int, example has NoneType"]
    assert _shape_differences({"a": 2, "b": None, "c": [{"x": "t"}, {"x": 1}]}, example) == [
        ".c[1].x: int, example has str"
    ]
    assert _shape_differences({"a": 2, "b": None, "c": []}, example) == [f".c: list, example {example['c']!r}"]


@pytest.mark.django_db
def test_each_function_example_matches_a_real_reply(client, example_world):
    schema = fetch_schema(client)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {example_world}"}
    client.post(
        "/api/v1/functions/increaseCounter",
        json.dumps({"appId": "default", "counterType": "user", "counterId": "energy_points", "playerId": "p1"}),
        "application/json",
        **headers,
    )
    # Every counter updated and flushed before it is read, as in the examples (their update times
    # are times, not null).
    for counter_type, name in [("daily", "total_games_played"), ("app", "matches_running")]:
        body = {"appId": "default", "counterType": counter_type, "counterId": name}
        client.post("/api/v1/functions/increaseCounter", json.dumps(body), "application/json", **headers)
    client.post(
        "/api/v1/counter/daily_active_users/increment", json.dumps({"user_id": "u1"}), "application/json", **headers
    )
    counters_flush()
    for name in ["getCounter", "increaseCounter", "decreaseCounter", "resetCounter", "getCounterStats"]:
        operation = schema["paths"][f"/api/v1/functions/{name}"]["post"]
        request = next(iter(operation["requestBody"]["content"]["application/json"]["examples"].values()))["value"]
        example = next(iter(operation["responses"]["200"]["content"]["application/json"]["examples"].values()))
        reply = client.post(f"/api/v1/functions/{name}", json.dumps(request), "application/json", **headers)
        assert reply.status_code == 200, (name, reply.content)
        real = reply.json()
        assert list(real["data"]) == list(example["value"]["data"]), name
        assert _shape_differences(real, example["value"]) == [], (name, real, example["value"])


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(live_server, example_world, tmp_path):
    checks = "all"
    args = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{live_server.url}/api/schema/?format=json",
        "--url",
        live_server.url,
        "--checks",
        checks,
        "--max-examples",
        "8",
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "20240304",
        "--request-timeout",
        "10",
        "--header",
        f"Authorization: Bearer {example_world}",
        "--no-color",
    ]
    # Run from a temporary directory: schemathesis keeps its example database in the working directory.
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    # Every documented operation was exercised.
    total = re.search(r"Operations:\s+\d+ selected / (\d+) total", output)
    tested = re.search(r"Tested: (\d+)", output)
    assert total and tested and int(tested.group(1)) == int(total.group(1)) >= 12, output[-3000:]


# --- the schema and the server agree: what one forbids the other refuses ---------------------


def _body_allowed(schema: dict, path: str, body) -> bool:
    """Whether the schema's request body of ``POST path`` admits ``body`` (formats checked too)."""
    request = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    document = {**request, "components": schema["components"]}
    return jsonschema.Draft7Validator(document, format_checker=jsonschema.FormatChecker()).is_valid(body)


FN_TARGET = {"appId": "default", "counterType": "app", "counterId": "matches_running"}
FORBIDDEN_BODIES = [
    # A number where the schema says a string.
    ("/api/v1/counter/{name}/reset", {"reason": 0}),
    ("/api/v1/functions/resetCounter", {**FN_TARGET, "reason": "x", "operatorId": 0}),
    ("/api/v1/functions/increaseCounter", {**FN_TARGET, "appId": 7}),
    # NUL characters, white space only where text is required, an empty player id.
    ("/api/v1/counter/{name}/reset", {"reason": "event\u0000over"}),
    ("/api/v1/functions/resetCounter", {**FN_TARGET, "reason": "   "}),
    ("/api/v1/counters/batch", {"updates": [{"name": "matches_running", "user_id": ""}]}),
    # Lists that need an item, fields the server does not know, values without a schema type.
    ("/api/v1/counters/batch", {"updates": []}),
    ("/api/v1/counters/reset", {"counters": [], "reason": "x"}),
    ("/api/v1/counters/batch", {"updates": [{"name": "matches_running", "v": 1}]}),
    ("/api/v1/counters/batch", {"updates": [{"name": "matches_running", "metadata": None}]}),
    # Dates outside the schema's formats (no offset, not a date).
    ("/api/v1/functions/getCounterStats", {"appId": "default", "startDate": "2024-03-04T10:00:00"}),
    ("/api/v1/functions/getCounterStats", {"appId": "default", "endDate": "yesterday"}),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "body"), FORBIDDEN_BODIES, ids=[f"{p} {b}" for p, b in FORBIDDEN_BODIES])
def test_a_body_the_schema_forbids_is_refused_with_4001_and_changes_nothing(client, example_world, path, body):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {example_world}"}
    assert not _body_allowed(fetch_schema(client), path, body)
    client.post("/api/v1/counter/matches_running/increment", {"value": 3}, "application/json", **headers)
    url = path.replace("{name}", "matches_running")
    reply = client.post(url, json.dumps(body), "application/json", **headers)
    assert reply.status_code == 400, reply.content
    assert 4001 in (reply.json().get("code"), reply.json().get("error", {}).get("code"))
    assert client.get("/api/v1/counter/matches_running").json()["value"] == 3


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/counter/matches_running?user_id=",
        "/api/v1/counter/total_games_played/history?user_id=",
        "/api/v1/alerts/messages?counter=",
        "/api/v1/stats?startDate=",
        "/api/v1/stats?endDate=2024-03-04T10:00:00",
    ],
)
def test_an_empty_or_malformed_query_parameter_is_refused_not_ignored(client, example_world, url):
    reply = client.get(url, HTTP_AUTHORIZATION=f"Bearer {example_world}")
    assert reply.status_code == 400, reply.content
    assert reply.json()["error"]["code"] == 4001


RULE_CASES = [
    # (operation, body or None for a GET): well-formed by the schema, refused by a rule of the counter.
    ("/api/v1/counter/{name}/history", "/api/v1/counter/matches_running/history", None),
    ("/api/v1/counter/{name}", "/api/v1/counter/energy_points", None),
    ("/api/v1/counter/{name}/decrement", "/api/v1/counter/daily_active_users/decrement", {"user_id": "u1"}),
    (
        "/api/v1/functions/increaseCounter",
        "/api/v1/functions/increaseCounter",
        {"appId": "default", "counterType": "user", "counterId": "energy_points"},
    ),
    (
        "/api/v1/functions/getCounterStats",
        "/api/v1/functions/getCounterStats",
        {"appId": "default", "startDate": "2024-03-10", "endDate": "2024-03-04"},
    ),
    (
        "/api/v1/counters/reset",
        "/api/v1/counters/reset",
        {"reason": "x", "counters": [{"name": "matches_running"}, {"name": "matches_running"}]},
    ),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "url", "body"), RULE_CASES, ids=[c[1] for c in RULE_CASES])
def test_a_rule_the_schema_cannot_state_is_a_documented_409(client, example_world, path, url, body):
    schema = fetch_schema(client)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {example_world}"}
    if body is None:
        operation = schema["paths"][path]["get"]
        reply = client.get(url, **headers)
    else:
        operation = schema["paths"][path]["post"]
        assert _body_allowed(schema, path, body)
        reply = client.post(url, json.dumps(body), "application/json", **headers)
    assert reply.status_code == 409, reply.content
    assert 4001 in (reply.json().get("code"), reply.json().get("error", {}).get("code"))
    assert "rule" in operation["responses"]["409"]["description"]
