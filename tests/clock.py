"""The test clock: pinned in-process (time-machine) and carried into the processes the tests start.

``TEST_CLOCK_UTC=23:59:30`` (``make test-midnight``) starts every test's clock at that time of day
(UTC, the most recent such moment, so the clock is never ahead of the real one) and lets it run: a
test that takes longer than 30 seconds meets midnight. The Python processes a test starts
(gunicorn, Celery, ``manage.py``, the soak script) get the same clock, as an offset from the real
one taken when they start, through time-machine too (``clockhook/sitecustomize.py``). Not
libfaketime: Debian's build (0.9.10) breaks Python 3.11's ``time.sleep`` when it leaves the
monotonic clock alone (EINVAL, wolfcw/libfaketime#426) and hangs its timed lock waits when it fakes
it. Without the variable, every clock is the real one.
"""

import os
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import time_machine

CLOCK_VARIABLE = "TEST_CLOCK_UTC"
# The processes a test starts import tests/clockhook/sitecustomize.py, which moves their clock.
CLOCK_HOOK = Path(__file__).resolve().parent / "clockhook"


def start_of_test() -> datetime | None:
    """The moment each test starts at, or None for the real clock."""
    wanted = os.environ.get(CLOCK_VARIABLE)
    if not wanted:
        return None
    now = datetime.now(UTC)
    start = datetime.combine(now.date(), time.fromisoformat(wanted), tzinfo=UTC)
    # Never ahead of the real clock: gunicorn's arbiter compares its time with file times.
    return start if start <= now else start - timedelta(days=1)


def midday_utc() -> datetime:
    """12:00 UTC of the test clock's day: twelve hours from any daily boundary in UTC."""
    return datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)


def zone_at_midday() -> str:
    """A fixed-offset time zone where it is about noon now (by the test clock): a daily counter in it
    is twelve hours away from its boundary, whatever the real time, so processes need no fake clock."""
    offset = 12 - datetime.now(UTC).hour  # UTC-11 .. UTC+12, all of them Etc/GMT zones
    # The Etc/GMT names have the POSIX sign: "Etc/GMT-5" is five hours ahead of UTC.
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"


def process_clock_env() -> dict[str, str]:
    """Environment that gives a Python child process the test's clock (empty when it is the real one)."""
    if not os.environ.get(CLOCK_VARIABLE):
        return {}
    if time_machine.escape_hatch.is_travelling():
        offset = datetime.now(UTC).timestamp() - time_machine.escape_hatch.time.time()
    else:  # started outside a test (a module's fixture): from the clock's start
        offset = start_of_test().timestamp() - datetime.now(UTC).timestamp()
    path = os.pathsep.join(filter(None, [str(CLOCK_HOOK), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "TEST_CLOCK_OFFSET_SECONDS": f"{offset:.6f}"}


class ServerClock:
    """The wall clock of a server the tests start with ``env()``: stopped where ``move_to`` puts it,
    the real one (or the test's) again after ``release`` (``clockhook/sitecustomize.py``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(CLOCK_HOOK), os.environ.get("PYTHONPATH")]))
        return {"PYTHONPATH": path, "TEST_CLOCK_FILE": str(self.path)}

    def move_to(self, moment: datetime) -> None:
        written = self.path.with_suffix(".new")
        written.write_text(str(int(moment.timestamp() * 1_000_000) * 1000))
        os.replace(written, self.path)  # never read half written

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
