"""Celery's task metrics, exported here (not by celery-exporter): counted by signals in each worker.

A pool process that exits (max_tasks_per_child, a crash) is marked dead so that its live gauges
stop counting; its counters stay in the totals, as Prometheus expects of a counter.
"""

import os
import time

from celery import signals

from . import definitions as m
from .processes import process_dead

_started: dict[str, float] = {}


@signals.task_prerun.connect
def _task_started(task_id=None, **kwargs) -> None:
    _started[task_id] = time.perf_counter()


@signals.task_postrun.connect
def _task_finished(task_id=None, task=None, state=None, **kwargs) -> None:
    started = _started.pop(task_id, None)
    name = getattr(task, "name", None) or "unknown"
    m.celery_tasks.labels(name, state or "UNKNOWN").inc()
    if started is not None:
        m.celery_task_duration.labels(name).observe(time.perf_counter() - started)


@signals.worker_process_shutdown.connect
def _pool_process_exited(pid=None, **kwargs) -> None:
    process_dead(pid=pid or os.getpid())
