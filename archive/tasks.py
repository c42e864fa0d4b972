from dataclasses import asdict

from celery import shared_task

from .services import archive_retention_enforce, period_archive_closed


@shared_task(name="archive.close_periods", ignore_result=True)
def close_periods() -> dict:
    return asdict(period_archive_closed())


@shared_task(name="archive.enforce_retention", ignore_result=True)
def enforce_retention() -> dict:
    return asdict(archive_retention_enforce())
