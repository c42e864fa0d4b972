from dataclasses import asdict

from celery import shared_task

from metrics.recorders import Stopwatch, archive_record

from .services import archive_retention_enforce, period_archive_closed


@shared_task(name="archive.close_periods", ignore_result=True)
def close_periods() -> dict:
    watch = Stopwatch()
    try:
        stats = period_archive_closed()
    except Exception:
        archive_record(outcome="error")
        raise
    if stats.locked_out:
        archive_record(outcome="locked_out")
    elif not stats.flushed:
        archive_record(outcome="flush_busy")
    else:
        archive_record(outcome="ok", seconds=watch.seconds, periods=stats.periods)
    return asdict(stats)


@shared_task(name="archive.enforce_retention", ignore_result=True)
def enforce_retention() -> dict:
    return asdict(archive_retention_enforce())
