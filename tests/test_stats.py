"""getCounterStats and GET /api/v1/stats over a time-travelled week of real traffic."""

import json
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine

from counters.flush import counters_flush
from counters.models import App, Counter

pytestmark = pytest.mark.django_db

SHANGHAI = ZoneInfo("Asia/Shanghai")
MONDAY = datetime(2024, 3, 4, tzinfo=SHANGHAI)


def call(client, name, body, key):
    return client.post(
        f"/api/v1/functions/{name}", json.dumps(body), "application/json", HTTP_AUTHORIZATION=f"Bearer {key}"
    )


def utc_ms(moment: datetime) -> str:
    return moment.astimezone(ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@pytest.fixture
def week(client, make_key):
    """A week of traffic in an app on Shanghai time: per day, wins +(day+1) twice and -1 once, losses +1."""
    app = App.objects.create(slug="game", time_zone="Asia/Shanghai")
    for name in ("wins", "losses", "idle"):
        Counter.objects.create(app=app, name=name, display_name=name.title())
    Counter.objects.create(app=app, name="streak", scope="user")
    writer = make_key(("write",), app="game")
    viewer = make_key(("data_view",), app="game")
    made = {"per_day": [], "per_hour": {}, "net": {"wins": 0, "losses": 0, "streak": 0}}
    for day in range(7):
        ops = 0
        for hour, minute in [(9, 30), (21, 15)]:
            moment = MONDAY + timedelta(days=day, hours=hour, minutes=minute)
            with time_machine.travel(moment, tick=False):
                updates = [
                    ("increaseCounter", "wins", {"increment": day + 1}),
                    ("increaseCounter", "losses", {}),
                    ("increaseCounter", "streak", {"playerId": f"p{day}", "increment": 2}),
                ]
                if hour == 21:
                    updates.append(("decreaseCounter", "wins", {}))
                for function, name, extra in updates:
                    counter_type = "user" if name == "streak" else "app"
                    body = {"appId": "game", "counterType": counter_type, "counterId": name, **extra}
                    reply = call(client, function, body, writer)
                    assert reply.status_code == 200, reply.content
                    delta = extra.get("increment", 1) * (1 if function == "increaseCounter" else -1)
                    made["net"][name] += delta
                    slot = utc_ms(moment.replace(minute=0))
                    made["per_hour"][slot] = made["per_hour"].get(slot, 0) + 1
                    ops += 1
        made["per_day"].append(ops)
    counters_flush()
    return {"writer": writer, "viewer": viewer, "made": made}


def stats(client, key, **params) -> dict:
    reply = call(client, "getCounterStats", {"appId": "game", **params}, key)
    assert reply.status_code == 200, reply.content
    return reply.json()["data"]


def test_series_by_hour_day_and_week_sum_to_the_operations_made(client, week):
    made = week["made"]
    total = sum(made["per_day"])
    week_range = {"startDate": "2024-03-04", "endDate": "2024-03-10"}
    with time_machine.travel(MONDAY + timedelta(days=8), tick=False):
        by_day = stats(client, week["viewer"], groupBy="day", **week_range)
        by_hour = stats(client, week["viewer"], groupBy="hour", **week_range)
        by_week = stats(client, week["viewer"], groupBy="week", **week_range)

    days = by_day["timeSeries"]
    assert [p["time"] for p in days] == [utc_ms(MONDAY + timedelta(days=d)) for d in range(7)]
    assert days[0]["time"] == "2024-03-03T16:00:00.000Z"  # local midnight in Shanghai
    assert [p["operations"] for p in days] == made["per_day"]
    # The level at the end of each day: wins gains 2 * (day + 1) - 1 a day, losses 2 (per-player
    # counters are not part of levels).
    levels = [sum(2 * (d + 1) - 1 for d in range(day + 1)) + 2 * (day + 1) for day in range(7)]
    assert [p["value"] for p in days] == levels
    assert days[-1]["value"] == made["net"]["wins"] + made["net"]["losses"]

    hours = by_hour["timeSeries"]
    assert len(hours) == 7 * 24
    assert sum(p["operations"] for p in hours) == total
    assert {p["time"]: p["operations"] for p in hours if p["operations"]} == made["per_hour"]

    assert [(p["time"], p["operations"]) for p in by_week["timeSeries"]] == [("2024-03-03T16:00:00.000Z", total)]

    summary = by_day["summary"]
    assert summary["totalOperations"] == total
    assert (summary["totalCounters"], summary["activeCounters"]) == (4, 3)
    by_name = {item["counterId"]: item for item in by_day["counterList"]}
    assert by_name["wins"]["operationCount"] == 21 and by_name["losses"]["operationCount"] == 14
    assert by_name["idle"]["operationCount"] == 0 and by_name["idle"]["lastUpdateTime"] is None
    assert by_name["wins"]["currentValue"] == made["net"]["wins"] == 49
    assert by_name["wins"]["peakValue"] == 50  # before the last decrement
    assert by_name["streak"]["currentValue"] == made["net"]["streak"] == 28
    assert by_name["wins"]["lastUpdateTime"] == utc_ms(MONDAY + timedelta(days=6, hours=21, minutes=15))
    assert summary["avgValue"] == round((49 + 14 + 0 + 28) / 4, 2)
    assert by_day["topCounters"] == [
        {"counterId": "wins", "value": 49, "ranking": 1},
        {"counterId": "streak", "value": 28, "ranking": 2},
        {"counterId": "losses", "value": 14, "ranking": 3},
        {"counterId": "idle", "value": 0, "ranking": 4},
    ]


def test_a_range_and_a_type_filter_select_what_they_say(client, week):
    with time_machine.travel(MONDAY + timedelta(days=8), tick=False):
        tuesday = stats(client, week["viewer"], startDate="2024-03-05", endDate="2024-03-05", groupBy="hour")
        users = stats(client, week["viewer"], counterType="user", startDate="2024-03-04", endDate="2024-03-10")
        default_range = stats(client, week["viewer"])
    assert tuesday["summary"]["totalOperations"] == week["made"]["per_day"][1]
    assert len(tuesday["timeSeries"]) == 24
    assert [c["counterId"] for c in users["counterList"]] == ["streak"]
    assert users["summary"]["totalOperations"] == 14
    # Default: the 7 days before now, which (now = the next Tuesday) misses the first Monday.
    assert default_range["summary"]["totalOperations"] == sum(week["made"]["per_day"][1:])


def test_the_rest_twin_answers_the_same_data(client, week):
    params = "startDate=2024-03-04&endDate=2024-03-10&groupBy=day"
    with time_machine.travel(MONDAY + timedelta(days=8), tick=False):
        rest = client.get(f"/api/v1/stats?{params}", HTTP_AUTHORIZATION=f"Bearer {week['viewer']}")
        function = stats(client, week["viewer"], startDate="2024-03-04", endDate="2024-03-10", groupBy="day")
        forbidden = client.get(f"/api/v1/stats?{params}", HTTP_AUTHORIZATION=f"Bearer {week['writer']}")
        bad = client.get("/api/v1/stats?groupBy=minute", HTTP_AUTHORIZATION=f"Bearer {week['viewer']}")
    assert rest.status_code == 200 and rest.json() == function
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == 4003
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 4001


def test_bad_ranges_are_refused(client, week):
    # 400: not a date of the schema's formats; 409: well-formed dates that break a rule of the range.
    for params, status in [
        ({"startDate": "2024-03-10", "endDate": "2024-03-04"}, 409),
        ({"startDate": "2024-13-01"}, 400),
        ({"startDate": "2024-03-04T10:00:00"}, 400),
        ({"startDate": 20240304}, 400),
        ({"endDate": "0001-01-01"}, 409),
        ({"startDate": "2020-01-01", "endDate": "2024-01-01", "groupBy": "hour"}, 409),
    ]:
        reply = call(client, "getCounterStats", {"appId": "game", **params}, week["viewer"])
        assert reply.status_code == status and reply.json()["code"] == 4001, params
