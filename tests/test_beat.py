"""Beat end to end: ``celery beat`` with the DatabaseScheduler and a worker, as the Procfile runs them.
Values reach PostgreSQL with nobody flushing by hand, and every schedule the service needs exists and
names a task the worker knows."""

import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django_celery_beat.models import PeriodicTask

from counters.models import CounterValue

from .http import post
from .processes import BIN, ROOT, CeleryWorker, service_env, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SCHEDULED = {
    "counters.flush",
    "counters.trim_operation_log",
    "archive.close_periods",
    "archive.enforce_retention",
    "alerts.sweep",
    "counters.presence_sweep",
}


def test_beat_and_a_worker_bring_values_to_postgresql_with_no_manual_flush(client, writer):
    call_command("setup_schedules", verbosity=0)
    assert set(PeriodicTask.objects.filter(enabled=True).values_list("task", flat=True)) == SCHEDULED

    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    worker = CeleryWorker(pool="solo")
    log = tempfile.NamedTemporaryFile(prefix="beat-", suffix=".log", delete=False)  # noqa: SIM115
    args = [str(BIN / "celery"), "-A", "counterproject", "beat", "--loglevel=INFO"]
    args += ["--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"]
    beat = subprocess.Popen(args, cwd=ROOT, env=service_env(), stdout=log, stderr=log)
    try:
        for task in SCHEDULED:  # every scheduled name is a task the worker has registered
            assert f". {task}\n" in worker.output(), task
        for _ in range(7):
            reply = post(client, "/api/v1/counter/matches_running/increment", {}, writer)
            assert reply.status_code == 200
        wait_until(
            lambda: CounterValue.objects.get(counter__name="matches_running").value == 7,
            timeout=90,
            what="Beat's flush to reach PostgreSQL",
        )
        assert post(client, "/api/v1/counter/matches_running/increment", {"value": 3}, writer).status_code == 200
        wait_until(
            lambda: CounterValue.objects.get(counter__name="matches_running").value == 10,
            timeout=90,
            what="the next scheduled flush",
        )
    finally:
        beat.send_signal(signal.SIGTERM)
        beat.wait(timeout=60)
        output = Path(log.name).read_text()
        Path(log.name).unlink(missing_ok=True)
        worker.stop(timeout=60)
        worker_output = worker.output()
        worker.close()
    assert "Sending due task" in output and "(counters.flush)" in output
    assert "counters.flush" in worker_output and "succeeded" in worker_output
