from django.conf import settings
from django.core.management.base import BaseCommand
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask


def schedules() -> list[dict]:
    """The periodic tasks the service needs; each is created once and stays editable in the admin."""
    return [
        {
            "name": "Flush counter deltas to PostgreSQL",
            "task": "counters.flush",
            "every_seconds": settings.COUNTER_FLUSH_INTERVAL_SECONDS,
        },
        {
            # Counters live in many time zones (some at :30 or :45 from UTC), so rather than one
            # run per zone this runs every quarter hour: each zone's boundary is archived within
            # 16 minutes, and a run with nothing closed costs a few queries.
            "name": "Archive closed periods and trim Redis",
            "task": "archive.close_periods",
            "crontab": {"minute": "1,16,31,46", "hour": "*", "timezone": "UTC"},
        },
        {
            "name": "Enforce archive retention",
            "task": "archive.enforce_retention",
            "crontab": {"minute": "40", "hour": "3", "timezone": "UTC"},
        },
        {
            # Reads and writes sweep lapsed leases themselves; this brings down the presence
            # counters nobody reads, so their stored value and alerts follow too.
            "name": "Sweep lapsed presence leases",
            "task": "counters.presence_sweep",
            "every_seconds": settings.COUNTER_PRESENCE_SWEEP_SECONDS,
        },
        {
            "name": "Trim the operation log (COUNTER_OPERATION_LOG_RETENTION_DAYS)",
            "task": "counters.trim_operation_log",
            "every_seconds": 3600,
        },
        {
            "name": "Repair threshold alert deliveries (lost tasks, crashed flushes)",
            "task": "alerts.sweep",
            "every_seconds": settings.ALERTS_SWEEP_INTERVAL_SECONDS,
        },
    ]


def _schedule(spec: dict) -> dict:
    if "crontab" in spec:
        crontab, _ = CrontabSchedule.objects.get_or_create(
            day_of_week="*", day_of_month="*", month_of_year="*", **spec["crontab"]
        )
        return {"crontab": crontab}
    every = max(1, int(spec["every_seconds"]))
    interval, _ = IntervalSchedule.objects.get_or_create(every=every, period=IntervalSchedule.SECONDS)
    return {"interval": interval}


class Command(BaseCommand):
    help = "Create the Celery Beat schedules (idempotent: existing ones keep their edited timing)."

    def handle(self, *args, **options):
        for spec in schedules():
            task, created = PeriodicTask.objects.get_or_create(
                name=spec["name"], defaults={"task": spec["task"], **_schedule(spec)}
            )
            self.stdout.write(f"{'created' if created else 'kept'}: {task.name} ({task.task})")
