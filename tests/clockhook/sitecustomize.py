"""Started with every Python process a test starts (``PYTHONPATH``, see tests/clock.py): the test's clock.

``TEST_CLOCK_OFFSET_SECONDS`` is how far the test's clock is from the real one when the process
starts; from then on both run at the real rate. time-machine moves the wall clock (``time.time``,
``datetime.now``) and leaves monotonic clocks, sleeps and timed waits alone; the travel survives
the forks of gunicorn and Celery's prefork pool.

``TEST_CLOCK_FILE`` (the contract run's server, tests/clock.py ``ServerClock``): while that file
exists, it holds the wall clock in nanoseconds, stopped there; read at every clock reading, so a
test that moves it (and then sends a request) moves the clock of every worker at once.
"""

import os

_offset = os.environ.get("TEST_CLOCK_OFFSET_SECONDS")
_clock_file = os.environ.get("TEST_CLOCK_FILE")
if _offset or _clock_file:
    import time

    import time_machine

    _traveller = time_machine.travel(time.time() + float(_offset or 0), tick=True).start()

    if _clock_file:
        _ticking = _traveller.time_ns

        def _time_ns() -> int:
            try:
                with open(_clock_file, "rb") as file:
                    pinned = file.read()
            except FileNotFoundError:
                return _ticking()
            return int(pinned) if pinned else _ticking()

        _traveller.time_ns = _time_ns
