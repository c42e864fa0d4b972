from celery import shared_task

from .services import counters_flush


@shared_task(name="counters.flush", ignore_result=True)
def flush() -> dict:
    stats = counters_flush()
    return {"batches": stats.batches, "skipped": stats.skipped, "values": stats.values}
