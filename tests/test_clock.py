"""The test clock reaches the processes a test starts (tests/clock.py, tests/clockhook/)."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import time_machine

from .clock import CLOCK_VARIABLE, start_of_test
from .processes import ROOT, service_env

SIX_HOURS = 6 * 3600


def test_a_process_started_under_the_test_clock_runs_on_it(monkeypatch):
    real = datetime.now(UTC)
    monkeypatch.setenv(CLOCK_VARIABLE, (real - timedelta(hours=6)).strftime("%H:%M:%S"))
    with time_machine.travel(start_of_test(), tick=True):
        test_now = datetime.now(UTC).timestamp()
        child = subprocess.run(
            [sys.executable, "-c", "import time; print(time.time())"],
            cwd=ROOT,
            env=service_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    child_now = float(child.stdout)
    # Six hours behind the real clock, like the test; the margin only covers the child's start-up.
    assert abs(child_now - test_now) < 600
    assert abs(child_now - real.timestamp() + SIX_HOURS) < 600


def test_without_the_variable_processes_keep_the_real_clock(monkeypatch):
    monkeypatch.delenv(CLOCK_VARIABLE, raising=False)
    assert "TEST_CLOCK_OFFSET_SECONDS" not in service_env()
