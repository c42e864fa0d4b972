"""Started with every Python process a test starts (``PYTHONPATH``, see tests/clock.py): the test's clock.

``TEST_CLOCK_OFFSET_SECONDS`` is how far the test's clock is from the real one when the process
starts; from then on both run at the real rate. time-machine moves the wall clock (``time.time``,
``datetime.now``) and leaves monotonic clocks, sleeps and timed waits alone; the travel survives
the forks of gunicorn and Celery's prefork pool.
"""

import os

_offset = os.environ.get("TEST_CLOCK_OFFSET_SECONDS")
if _offset:
    import time

    import time_machine

    time_machine.travel(time.time() + float(_offset), tick=True).start()
