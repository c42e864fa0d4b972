"""Clean-up of a dead process's metric files (kept apart from the metrics: the gunicorn master imports it)."""

import os


def process_dead(*, pid: int) -> None:
    """Forget a dead process's live gauges (gunicorn's child_exit and Celery's pool call this)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def dead_processes_forget() -> int:
    """Drop the live gauges left by processes that are gone (a previous run, a kill -9 of the host's
    workers before the master could see it); returns how many processes were forgotten."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return 0
    pids = set()
    for name in os.listdir(directory):
        stem, _, pid = name.removesuffix(".db").rpartition("_")
        if stem.startswith("gauge_live") and pid.isdigit():
            pids.add(int(pid))
    gone = [pid for pid in pids if not _alive(pid)]
    for pid in gone:
        process_dead(pid=pid)
    return len(gone)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
