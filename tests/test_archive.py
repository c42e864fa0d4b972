"""The archive task: idempotent and concurrent runs, missed midnights, safe trimming, retention,
history and resets over REST, Beat schedules, and one end-to-end run by a real Celery worker."""

import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
import redis
import time_machine
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection
from django_celery_beat.models import PeriodicTask

from archive import services as archive_services
from archive.models import PeriodArchive, ResetLog
from archive.services import archive_retention_enforce, period_archive_closed, period_keys_trim
from counters import keyspace
from counters.flush import counters_flush
from counters.models import CounterValue, FlushedBatch, StatBucket, UniqueMember

from .processes import ROOT, CeleryWorker, service_env, wait_until
from .test_periods import TAIPEI, bump, post, read


def keys_of(store, counter) -> set[str]:
    return {k.decode() for k in store.scan_iter(match=keyspace.counter_keys_pattern(counter.id))}


def fill_days(time_machine, counter, first: datetime, days: int, *, per_day=lambda day: day + 1, **kwargs) -> None:
    """One update a day at noon (Taipei) for ``days`` days: day i adds ``per_day(i)``."""
    for day in range(days):
        time_machine.move_to(first + timedelta(days=day), tick=False)
        bump(counter, per_day(day), **kwargs)


@pytest.mark.django_db
def test_running_the_archive_twice_archives_once(make_daily_counter, time_machine, builtins):
    counter = make_daily_counter("twice")
    fill_days(time_machine, counter, datetime(2026, 4, 1, 12, tzinfo=TAIPEI), 2)
    time_machine.move_to(datetime(2026, 4, 3, 0, 1, tzinfo=TAIPEI), tick=False)
    first = period_archive_closed()
    second = period_archive_closed()
    assert (first.periods, first.resets_logged) == (2, 2)
    assert (second.periods, second.resets_logged, second.keys_trimmed) == (0, 0, 0)
    assert sorted(PeriodArchive.objects.values_list("period", "final_value")) == [("2026-04-01", 1), ("2026-04-02", 2)]
    assert ResetLog.objects.filter(kind="automatic").count() == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_archive_runs_archive_once(make_daily_counter, time_machine, builtins):
    counters = [make_daily_counter(f"busy{i}", scope="user") for i in range(3)]
    for counter in counters:
        for player in range(20):
            fill_days(time_machine, counter, datetime(2026, 4, 1, 12, tzinfo=TAIPEI), 3, subject=f"p{player}")
    time_machine.move_to(datetime(2026, 4, 4, 0, 1, tzinfo=TAIPEI), tick=False)
    barrier = threading.Barrier(4)
    results, errors = [], []

    def run(task) -> None:
        try:
            barrier.wait(timeout=10)
            results.append(task())
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(period_archive_closed,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4
    assert sum(r.periods for r in results) == 9
    assert PeriodArchive.objects.count() == 3 * 3 * 20
    assert ResetLog.objects.filter(kind="automatic").count() == 3 * 3 * 20

    # Without the lock too: the unique constraints alone keep one archive row and one reset log.
    PeriodArchive.objects.all().delete()
    ResetLog.objects.all().delete()
    barrier.reset()
    results.clear()
    job = lambda: archive_services._archive_period(counters[0], "2026-04-02", archive_services.ArchiveStats())  # noqa: E731
    threads = [threading.Thread(target=run, args=(job,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert PeriodArchive.objects.count() == 20 and ResetLog.objects.count() == 20
    assert set(PeriodArchive.objects.values_list("final_value", flat=True)) == {2}


@pytest.mark.django_db
def test_beat_missing_midnights_is_caught_up_by_the_next_run(make_daily_counter, time_machine, builtins, store):
    daily = make_daily_counter("daily_games")
    weekly = make_daily_counter("weekly_games", period="weekly", time_zone="America/Los_Angeles")
    fill_days(time_machine, daily, datetime(2026, 4, 1, 12, tzinfo=TAIPEI), 4)
    fill_days(time_machine, weekly, datetime(2026, 4, 1, 12, tzinfo=TAIPEI), 14, per_day=lambda d: 1)
    time_machine.move_to(datetime(2026, 4, 15, 0, 20, tzinfo=TAIPEI), tick=False)
    stats = period_archive_closed()
    assert stats.trims_deferred == 0
    rows = PeriodArchive.objects.order_by("counter_id", "period").values_list("counter_id", "period", "final_value")
    # 1 April (Taipei, noon) is 31 March in Los Angeles: the week of Monday 30 March holds 6 updates.
    assert list(rows) == [
        (daily.id, "2026-04-01", 1),
        (daily.id, "2026-04-02", 2),
        (daily.id, "2026-04-03", 3),
        (daily.id, "2026-04-04", 4),
        (weekly.id, "2026-03-30", 6),
        (weekly.id, "2026-04-06", 7),
    ]
    assert ResetLog.objects.filter(kind="automatic").count() == 6
    # Only the live weekly period (13 April) is left in Redis.
    assert {k.split(":")[3] for k in keys_of(store, weekly)} == {"2026-04-13"}
    assert not keys_of(store, daily)
    assert read(weekly) == 1


@pytest.mark.django_db
def test_trimming_waits_for_pending_deltas(make_daily_counter, time_machine, builtins, store):
    """A closed period whose deltas are not in PostgreSQL yet keeps its Redis keys until they are."""
    counter = make_daily_counter("late_flush", unique_members=True)
    time_machine.move_to(datetime(2026, 4, 1, 23, 59, 59, tzinfo=TAIPEI), tick=False)
    bump(counter, user_id="u1")
    bump(counter, user_id="u2")
    time_machine.move_to(datetime(2026, 4, 2, 0, 1, tzinfo=TAIPEI), tick=False)
    assert period_keys_trim() == (0, 1)
    assert {k for k in keys_of(store, counter) if ":2026-04-01" in k}
    counters_flush()
    deleted, deferred = period_keys_trim()
    assert deleted == 2 and deferred == 0
    assert not {k for k in keys_of(store, counter) if ":2026-04-01" in k}
    assert CounterValue.objects.get(counter_id=counter.id, period="2026-04-01").value == 2
    assert UniqueMember.objects.filter(counter_id=counter.id, period="2026-04-01").count() == 2


@pytest.mark.django_db
def test_a_late_update_of_a_trimmed_period_rehydrates_it_exactly(make_daily_counter, time_machine, builtins):
    counter = make_daily_counter("straggler", unique_members=True)
    time_machine.move_to(datetime(2026, 4, 1, 23, 59, 59, tzinfo=TAIPEI), tick=False)
    bump(counter, user_id="u1")
    time_machine.move_to(datetime(2026, 4, 2, 0, 1, tzinfo=TAIPEI), tick=False)
    period_archive_closed()
    # An update whose period was computed just before midnight arrives after the trim.
    time_machine.move_to(datetime(2026, 4, 1, 23, 59, 59, 999000, tzinfo=TAIPEI), tick=False)
    assert bump(counter, user_id="u1") == 1
    assert bump(counter, user_id="u2") == 2
    counters_flush()
    assert CounterValue.objects.get(counter_id=counter.id, period="2026-04-01").value == 2


@pytest.mark.django_db
def test_retention_deletes_what_is_older_than_the_setting_and_never_the_last_week(
    make_daily_counter, time_machine, builtins, settings
):
    dropped = make_daily_counter("dropped")
    carried = make_daily_counter("carried", reset_strategy="keep")
    fill_days(time_machine, dropped, datetime(2026, 4, 1, 12, tzinfo=TAIPEI), 12)
    fill_days(time_machine, carried, datetime(2026, 4, 1, 12, tzinfo=TAIPEI), 1)
    time_machine.move_to(datetime(2026, 4, 13, 0, 1, tzinfo=TAIPEI), tick=False)
    period_archive_closed()
    FlushedBatch.objects.update(applied_at=datetime(2026, 4, 10, tzinfo=UTC))
    assert PeriodArchive.objects.filter(counter_id=dropped.id).count() == 12

    settings.COUNTER_ARCHIVE_RETENTION_DAYS = 6
    with pytest.raises(ImproperlyConfigured):
        archive_retention_enforce()
    assert PeriodArchive.objects.filter(counter_id=dropped.id).count() == 12

    settings.COUNTER_ARCHIVE_RETENTION_DAYS = 7
    time_machine.move_to(datetime(2026, 4, 13, 3, 40, tzinfo=TAIPEI), tick=False)
    stats = archive_retention_enforce()
    # Days ending on or before 6 April 03:40 (Taipei) go; 6 to 12 April, the last 7 days, stay.
    kept = sorted(PeriodArchive.objects.filter(counter_id=dropped.id).values_list("period", flat=True))
    assert kept == [f"2026-04-{d:02d}" for d in range(6, 13)]
    assert stats.archives == 5 + 1
    assert sorted(CounterValue.objects.filter(counter_id=dropped.id).values_list("period", flat=True)) == kept
    # The keep strategy still needs 1 April's value to open its next period: that row stays.
    assert CounterValue.objects.filter(counter_id=carried.id, period="2026-04-01").exists()
    assert read(carried) == 1
    assert not StatBucket.objects.filter(minute__lt=datetime(2026, 4, 5, 19, 40, tzinfo=UTC)).exists()
    assert StatBucket.objects.filter(counter_id=dropped.id).count() == 7
    assert not FlushedBatch.objects.exists()


def test_a_retention_below_seven_days_refuses_to_start():
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=service_env(COUNTER_ARCHIVE_RETENTION_DAYS="3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "COUNTER_ARCHIVE_RETENTION_DAYS=3" in result.stderr and "at least 7 days" in result.stderr


@pytest.mark.django_db
def test_history_reads_closed_periods_from_the_archive(make_daily_counter, client, writer, time_machine):
    counter = make_daily_counter("history_games")
    fill_days(time_machine, counter, datetime(2026, 4, 1, 12, tzinfo=TAIPEI), 10)
    time_machine.move_to(datetime(2026, 4, 10, 18, tzinfo=TAIPEI), tick=False)
    period_archive_closed()
    body = client.get("/api/v1/counter/history_games/history?days=3", **writer).json()
    assert body["period"] == "daily" and body["time_zone"] == "Asia/Taipei" and body["days"] == 3
    assert body["current"]["period"] == "2026-04-10" and body["current"]["value"] == 10
    assert body["current"]["next_reset"] == "2026-04-10T16:00:00Z"
    assert [(h["period"], h["value"]) for h in body["history"]] == [
        ("2026-04-09", 9),
        ("2026-04-08", 8),
        ("2026-04-07", 7),
    ]
    assert body["history"][0] == {
        "period": "2026-04-09",
        "start": "2026-04-08T16:00:00Z",
        "end": "2026-04-09T16:00:00Z",
        "value": 9,
        "peak": 9,
        "operations": 1,
    }
    assert len(client.get("/api/v1/counter/history_games/history", **writer).json()["history"]) == 7
    for query, code, status in [("days=0", 4001, 400), ("days=x", 4001, 400), ("days=99999", 4001, 400)]:
        r = client.get(f"/api/v1/counter/history_games/history?{query}", **writer)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    r = client.get("/api/v1/counter/matches_running/history", **writer)
    assert r.status_code == 409 and "no period history" in r.json()["error"]["message"]
    assert client.get("/api/v1/counter/history_games/history").status_code == 401
    assert client.get("/api/v1/counter/nope/history", **writer).status_code == 404


@pytest.mark.django_db
def test_single_reset_takes_a_reason_and_a_value_and_is_logged(client, writer, midday):
    post(client, "/api/v1/counter/total_games_played/increment", {"value": 9}, writer)
    r = post(client, "/api/v1/counter/total_games_played/reset", {"reason": "bad data", "reset_value": 2}, writer)
    assert r.json() == {"success": True, "current_value": 2, "previous_value": 9}
    log = ResetLog.objects.get(kind="manual")
    assert (log.reason, log.value_before, log.value_after) == ("bad data", 9, 2)
    assert log.operator.startswith("api-key:ck_")


@pytest.mark.django_db
def test_batch_reset_validates_everything_before_changing_anything(
    make_daily_counter, client, writer, make_key, midday
):
    make_daily_counter("event_points", scope="user", max_value=100)
    for name, body in [("total_games_played", {"value": 5}), ("matches_running", {"value": 3})]:
        post(client, f"/api/v1/counter/{name}/increment", body, writer)
    post(client, "/api/v1/counter/event_points/increment", {"value": 50, "user_id": "p1"}, writer)
    url = "/api/v1/counters/reset"
    good = [{"name": "total_games_played"}, {"name": "matches_running", "reset_value": 1}]
    refused = [
        ({"counters": good}, 400, 4001),
        ({"counters": good, "reason": ""}, 400, 4001),
        ({"counters": [], "reason": "x"}, 400, 4001),
        ({"counters": [*good, {"name": "event_points"}], "reason": "x"}, 409, 4001),
        (
            {"counters": [*good, {"name": "event_points", "user_id": "p1", "reset_value": 101}], "reason": "x"},
            409,
            4005,
        ),
        ({"counters": [*good, {"name": "nope"}], "reason": "x"}, 404, 4004),
        ({"counters": [*good, {"name": "total_games_played"}], "reason": "x"}, 409, 4001),
        ({"counters": [{"name": f"c{i}"} for i in range(51)], "reason": "x"}, 400, 4001),
    ]
    for body, status, code in refused:
        r = post(client, url, body, writer)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.content)
    writer_only = {"HTTP_AUTHORIZATION": f"Bearer {make_key(('write',))}"}
    assert post(client, url, {"counters": good, "reason": "x"}, writer_only).status_code == 403
    assert post(client, url, {"counters": good, "reason": "x"}, {}).status_code == 401
    assert not ResetLog.objects.exists()
    assert client.get("/api/v1/counter/total_games_played").json()["value"] == 5

    body = {"counters": [*good, {"name": "event_points", "user_id": "p1"}], "reason": "season end"}
    r = post(client, url, body, writer)
    assert r.status_code == 200
    assert r.json() == {
        "success": True,
        "reason": "season end",
        "results": [
            {"name": "total_games_played", "success": True, "previous_value": 5, "current_value": 0},
            {"name": "matches_running", "success": True, "previous_value": 3, "current_value": 1},
            {"name": "event_points", "success": True, "user_id": "p1", "previous_value": 50, "current_value": 0},
        ],
    }
    logs = ResetLog.objects.filter(kind="manual")
    assert logs.count() == 3 and {(log.reason, log.operator[:11]) for log in logs} == {("season end", "api-key:ck_")}
    assert client.get("/api/v1/counter/matches_running").json()["value"] == 1


@pytest.mark.django_db
def test_beat_schedules_are_created_once_with_explicit_time_zones(builtins):
    call_command("setup_schedules")
    task = PeriodicTask.objects.get(task="archive.close_periods")
    assert str(task.crontab.timezone) == "UTC" and task.crontab.minute == "1,16,31,46"
    task.crontab.minute = "5"
    task.crontab.save()
    call_command("setup_schedules")
    assert PeriodicTask.objects.filter(task__startswith="archive.").count() == 2
    assert PeriodicTask.objects.get(task="archive.close_periods").crontab.minute == "5"
    assert PeriodicTask.objects.get(task="archive.enforce_retention").crontab.hour == "3"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_celery_worker_archives_yesterday(make_daily_counter, builtins):
    """The worker runs in real time: the data is written "yesterday" (Taipei) and archived today."""
    counter = make_daily_counter("worker_games")
    yesterday = datetime.now(TAIPEI) - timedelta(days=1)
    with time_machine.travel(yesterday, tick=False):
        bump(counter, 4)
        bump(counter, 3)
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.flushdb()
    worker = CeleryWorker(pool="solo")
    try:
        from counterproject.celery import app

        app.send_task("archive.close_periods")
        wait_until(lambda: PeriodArchive.objects.filter(counter_id=counter.id).exists(), timeout=60, what="archive")
    finally:
        worker.stop()
        output = worker.output()
        worker.close()
    archived = PeriodArchive.objects.get(counter_id=counter.id)
    assert (archived.period, archived.final_value, archived.operations) == (yesterday.date().isoformat(), 7, 2)
    assert ResetLog.objects.get(counter_id=counter.id, kind="automatic").value_before == 7
    assert "archive.close_periods" in output and "succeeded" in output


@pytest.mark.django_db
def test_history_of_a_user_counter_is_per_player(make_daily_counter, client, writer, time_machine):
    counter = make_daily_counter("player_wins", scope="user")
    time_machine.move_to(datetime(2026, 4, 1, 12, tzinfo=TAIPEI), tick=False)
    bump(counter, 3, subject="p1")
    bump(counter, 5, subject="p2")
    time_machine.move_to(datetime(2026, 4, 2, 12, tzinfo=TAIPEI), tick=False)
    period_archive_closed()
    url = "/api/v1/counter/player_wins/history"
    assert [h["value"] for h in client.get(f"{url}?user_id=p2", **writer).json()["history"]] == [5]
    assert client.get(f"{url}?user_id=p3", **writer).json()["history"] == []
    r = client.get(url, **writer)
    assert r.status_code == 409 and r.json()["error"]["code"] == 4001
