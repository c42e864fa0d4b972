"""Periods: the rollover at local midnight, boundaries in real time zones (with DST), reset strategies."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from archive.models import PeriodArchive, ResetLog
from archive.services import period_archive_closed
from counters import config, periods
from counters.flush import counters_flush
from counters.models import Counter, CounterValue
from counters.selectors import counter_value_get
from counters.services import counter_update

from .http import post

TAIPEI = ZoneInfo("Asia/Taipei")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")


def fresh(counter):
    """The counter's current config (after the snapshot was reloaded)."""
    config.cache.invalidate()
    return config.cache.get().counters_by_id[counter.id]


def bump(counter, amount: int = 1, **kwargs) -> int:
    return counter_update(counter=counter, amount=amount, **kwargs).new_value


def read(counter, subject: str = "") -> int:
    return counter_value_get(counter=counter, subject=subject).value


def utc(*args) -> str:
    return datetime(*args, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.django_db
def test_increments_either_side_of_midnight_land_in_two_periods_and_the_day_is_archived(
    make_daily_counter, client, writer, time_machine
):
    counter = make_daily_counter("games_today", time_zone="Asia/Taipei")
    url = "/api/v1/counter/games_today"
    time_machine.move_to(datetime(2026, 11, 22, 23, 59, 59, tzinfo=TAIPEI), tick=False)
    assert post(client, f"{url}/increment", {"value": 5}, writer).json()["current_value"] == 5
    time_machine.move_to(datetime(2026, 11, 22, 23, 59, 59, 999000, tzinfo=TAIPEI), tick=False)
    assert post(client, f"{url}/increment", {}, writer).json()["current_value"] == 6

    time_machine.move_to(datetime(2026, 11, 23, 0, 0, 0, tzinfo=TAIPEI), tick=False)
    body = client.get(url, **writer).json()
    assert body["value"] == 0
    assert body["last_reset"] == utc(2026, 11, 22, 16) and body["next_reset"] == utc(2026, 11, 23, 16)
    time_machine.move_to(datetime(2026, 11, 23, 0, 0, 1, tzinfo=TAIPEI), tick=False)
    assert post(client, f"{url}/increment", {"value": 2}, writer).json()["current_value"] == 2

    time_machine.move_to(datetime(2026, 11, 23, 0, 1, tzinfo=TAIPEI), tick=False)
    stats = period_archive_closed()
    assert stats.flushed and stats.periods == 1
    archived = PeriodArchive.objects.get(counter_id=counter.id)
    assert (archived.period, archived.final_value, archived.peak, archived.operations) == ("2026-11-22", 6, 6, 2)
    assert archived.period_start == datetime(2026, 11, 21, 16, tzinfo=UTC)
    assert archived.period_end == datetime(2026, 11, 22, 16, tzinfo=UTC)
    assert archived.time_zone == "Asia/Taipei"
    log = ResetLog.objects.get(counter_id=counter.id, kind="automatic")
    assert (log.period, log.value_before, log.value_after) == ("2026-11-22", 6, 0)
    assert client.get(url, **writer).json()["value"] == 2
    assert CounterValue.objects.get(counter_id=counter.id, period="2026-11-23").value == 2


# (period, zone, a moment, expected start, expected end) — Los Angeles days of 23 and 25 hours.
BOUNDARIES = [
    ("daily", "Asia/Taipei", datetime(2026, 3, 8, 12, tzinfo=TAIPEI), (2026, 3, 7, 16), (2026, 3, 8, 16)),
    ("weekly", "Asia/Taipei", datetime(2026, 3, 8, 23, tzinfo=TAIPEI), (2026, 3, 1, 16), (2026, 3, 8, 16)),
    ("monthly", "Asia/Taipei", datetime(2026, 2, 28, 23, tzinfo=TAIPEI), (2026, 1, 31, 16), (2026, 2, 28, 16)),
    ("daily", "America/Los_Angeles", datetime(2026, 3, 8, 12, tzinfo=LOS_ANGELES), (2026, 3, 8, 8), (2026, 3, 9, 7)),
    ("daily", "America/Los_Angeles", datetime(2026, 11, 1, 12, tzinfo=LOS_ANGELES), (2026, 11, 1, 7), (2026, 11, 2, 8)),
    ("weekly", "America/Los_Angeles", datetime(2026, 3, 8, 12, tzinfo=LOS_ANGELES), (2026, 3, 2, 8), (2026, 3, 9, 7)),
    ("monthly", "America/Los_Angeles", datetime(2026, 3, 15, tzinfo=LOS_ANGELES), (2026, 3, 1, 8), (2026, 4, 1, 7)),
    ("monthly", "America/Los_Angeles", datetime(2026, 12, 31, tzinfo=LOS_ANGELES), (2026, 12, 1, 8), (2027, 1, 1, 8)),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("period", "zone", "moment", "start", "end"), BOUNDARIES)
def test_boundaries_in_real_time_zones(
    make_daily_counter, client, writer, time_machine, period, zone, moment, start, end
):
    """An update one millisecond before the boundary lands in the old period, one at it in the new."""
    counter = make_daily_counter("boundary", period=period, time_zone=zone)
    start_utc, end_utc = datetime(*start, tzinfo=UTC), datetime(*end, tzinfo=UTC)
    window = periods.window_at(period, zone, moment)
    assert (window.start, window.end) == (start_utc, end_utc)

    time_machine.move_to(moment, tick=False)
    body = client.get("/api/v1/counter/boundary", **writer).json()
    assert (body["last_reset"], body["next_reset"]) == (utc(*start), utc(*end))

    time_machine.move_to(datetime.fromtimestamp(end_utc.timestamp() - 0.001, UTC), tick=False)
    assert bump(counter, 3) == 3
    time_machine.move_to(end_utc, tick=False)
    assert read(counter) == 0
    assert bump(counter, 1) == 1
    counters_flush()
    rows = dict(CounterValue.objects.filter(counter_id=counter.id).values_list("period", "value"))
    local_start = start_utc.astimezone(ZoneInfo(zone)).date().isoformat()
    local_end = end_utc.astimezone(ZoneInfo(zone)).date().isoformat()
    assert rows == {local_start: 3, local_end: 1}


STRATEGIES = [
    ({"reset_strategy": "value", "reset_value": 4}, 4, 4),
    ({"reset_strategy": "keep"}, 10, 10),
    ({"reset_strategy": "ratio", "reset_ratio": "0.5"}, 5, 2),
    ({"reset_strategy": "difference", "reset_difference": 3}, 7, 4),
]


@pytest.mark.django_db
@pytest.mark.parametrize("archive_ran", [False, True], ids=["before-beat", "after-beat"])
@pytest.mark.parametrize(
    ("fields", "next_day", "after_idle_day"), STRATEGIES, ids=[s[0]["reset_strategy"] for s in STRATEGIES]
)
def test_strategies_open_the_next_period_the_same_with_or_without_the_archive_task(
    make_daily_counter, time_machine, builtins, archive_ran, fields, next_day, after_idle_day
):
    counter = make_daily_counter("carry", **fields)
    other = make_daily_counter("carry_idle", **fields)
    time_machine.move_to(datetime(2026, 5, 1, 12, tzinfo=TAIPEI), tick=False)
    for c in (counter, other):
        assert bump(c, 10 - read(c)) == 10
    time_machine.move_to(datetime(2026, 5, 2, 0, 5, tzinfo=TAIPEI), tick=False)
    if archive_ran:
        stats = period_archive_closed()
        assert stats.periods == 2 and stats.keys_trimmed >= 2
    assert read(counter) == next_day
    assert bump(counter, 1) == next_day + 1
    # The idle counter skips 2 May: 3 May opens from 2 May's opening value.
    time_machine.move_to(datetime(2026, 5, 3, 0, 5, tzinfo=TAIPEI), tick=False)
    if archive_ran:
        period_archive_closed()
    assert read(other) == after_idle_day
    if archive_ran:
        log = ResetLog.objects.get(counter_id=counter.id, kind="automatic", period="2026-05-01")
        assert (log.value_before, log.value_after) == (10, next_day)


@pytest.mark.django_db
def test_an_unflushed_older_period_still_opens_the_next_one(make_daily_counter, time_machine, builtins):
    """The flusher was down: the only trace of 1 May is in Redis, and 3 May carries it over twice."""
    counter = make_daily_counter("carry_redis_only", reset_strategy="difference", reset_difference=2)
    time_machine.move_to(datetime(2026, 5, 1, 12, tzinfo=TAIPEI), tick=False)
    bump(counter, 10)
    assert not CounterValue.objects.filter(counter_id=counter.id).exists()
    time_machine.move_to(datetime(2026, 5, 3, 12, tzinfo=TAIPEI), tick=False)
    assert read(counter) == 6


@pytest.mark.django_db
def test_user_counters_carry_each_players_value(make_daily_counter, time_machine, builtins):
    counter = make_daily_counter("stamina", scope="user", reset_strategy="ratio", reset_ratio="0.5")
    time_machine.move_to(datetime(2026, 6, 1, 9, tzinfo=TAIPEI), tick=False)
    bump(counter, 9, subject="p1")
    bump(counter, 4, subject="p2")
    time_machine.move_to(datetime(2026, 6, 2, 0, 1, tzinfo=TAIPEI), tick=False)
    period_archive_closed()
    assert (read(counter, "p1"), read(counter, "p2"), read(counter, "p3")) == (4, 2, 0)
    archived = dict(PeriodArchive.objects.filter(counter_id=counter.id).values_list("subject", "final_value"))
    assert archived == {"p1": 9, "p2": 4}


@pytest.mark.django_db
def test_unique_members_count_again_in_the_next_period(make_daily_counter, time_machine, builtins):
    counter = make_daily_counter("dau", unique_members=True)
    time_machine.move_to(datetime(2026, 6, 1, 23, 59, 59, tzinfo=TAIPEI), tick=False)
    assert bump(counter, user_id="u1") == 1
    assert bump(counter, user_id="u1") == 1
    time_machine.move_to(datetime(2026, 6, 2, 0, 0, 0, tzinfo=TAIPEI), tick=False)
    assert bump(counter, user_id="u1") == 1
    period_archive_closed()
    assert bump(counter, user_id="u1") == 1
    assert bump(counter, user_id="u2") == 2
    assert PeriodArchive.objects.get(counter_id=counter.id).final_value == 1


def test_a_changed_config_is_seen_by_the_strategy(make_daily_counter, time_machine, builtins):
    counter = make_daily_counter("switch", reset_strategy="keep")
    time_machine.move_to(datetime(2026, 7, 1, 12, tzinfo=TAIPEI), tick=False)
    bump(counter, 8)
    Counter.objects.filter(id=counter.id).update(reset_strategy="difference", reset_difference=5)
    counter = fresh(counter)
    time_machine.move_to(datetime(2026, 7, 2, 12, tzinfo=TAIPEI), tick=False)
    assert read(counter) == 3


def test_a_counter_that_starts_resetting_opens_its_first_period_cleanly(make_daily_counter, time_machine, builtins):
    """Its value from before (period "") is not a period: the first daily period opens by the strategy."""
    counter = make_daily_counter("became_daily", period="none", reset_strategy="keep")
    time_machine.move_to(datetime(2026, 7, 1, 12, tzinfo=TAIPEI), tick=False)
    bump(counter, 8)
    counters_flush()
    Counter.objects.filter(id=counter.id).update(period="daily")
    counter = fresh(counter)
    assert read(counter) == 0
    assert bump(counter, 2) == 2


def test_times_are_written_as_strftime_writes_them():
    """REST v1's seconds and the cloud functions' milliseconds, in UTC whatever the moment's zone
    (``clock.iso_utc``, ``clock.iso_ms``: written with ``isoformat``, which is faster)."""
    from datetime import timedelta

    from counters import clock

    taipei = ZoneInfo("Asia/Taipei")
    moments = [
        datetime(2023, 10, 1, 10, 30, 0, tzinfo=UTC),
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 1, 1, 7, 5, 9, 1000, tzinfo=taipei),  # the day before, in UTC
        datetime(2026, 3, 8, 2, 30, 0, 500, tzinfo=ZoneInfo("America/New_York")),
        datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=1),
    ]
    for moment in moments:
        utc = moment.astimezone(UTC)
        assert clock.iso_utc(moment) == utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert clock.iso_ms(moment) == utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    assert clock.iso_ms(moments[2]) == "2025-12-31T23:05:09.001Z"
    assert clock.iso_utc(None) is None and clock.iso_ms(None) is None
