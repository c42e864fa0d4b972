from celery import shared_task

from metrics.recorders import Stopwatch, flush_record

from .flush import counters_flush, deleted_counters_purge, operation_log_trim
from .presence import presence_sweep
from .write_through import store_reconcile


@shared_task(name="counters.flush", ignore_result=True)
def flush() -> dict:
    watch = Stopwatch()
    try:
        stats = counters_flush()
    except Exception:
        flush_record(outcome="error")
        raise
    if stats.locked_out:
        flush_record(outcome="locked_out")
    else:
        flush_record(outcome="ok", seconds=watch.seconds, deltas=stats.operations, rows=stats.values + stats.members)
    # Values written through to PostgreSQL during a Redis outage: correct Redis once it is back.
    reconciled = store_reconcile().corrected
    purged = deleted_counters_purge()
    return {
        "batches": stats.batches,
        "skipped": stats.skipped,
        "values": stats.values,
        "refused_behind_postgresql": stats.refused,
        "reconciled": reconciled,
        "purged_keys": purged,
    }


@shared_task(name="counters.trim_operation_log", ignore_result=True)
def trim_operation_log() -> int:
    return operation_log_trim()


@shared_task(name="counters.presence_sweep", ignore_result=True)
def sweep_presence() -> int:
    return presence_sweep()
