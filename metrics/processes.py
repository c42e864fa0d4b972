"""Clean-up of a dead process's metric files (kept apart from the metrics: the gunicorn master imports it)."""

import os


def process_dead(*, pid: int) -> None:
    """Forget a dead process's live gauges (gunicorn's child_exit and Celery's pool call this)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
