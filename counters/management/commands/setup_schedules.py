from django.conf import settings
from django.core.management.base import BaseCommand
from django_celery_beat.models import IntervalSchedule, PeriodicTask


def schedules() -> list[dict]:
    """The periodic tasks the service needs; each is created once and stays editable in the admin."""
    return [
        {
            "name": "Flush counter deltas to PostgreSQL",
            "task": "counters.flush",
            "every_seconds": settings.COUNTER_FLUSH_INTERVAL_SECONDS,
        },
        {
            "name": "Trim the operation log (COUNTER_OPERATION_LOG_RETENTION_DAYS)",
            "task": "counters.trim_operation_log",
            "every_seconds": 3600,
        },
    ]


class Command(BaseCommand):
    help = "Create the Celery Beat schedules (idempotent: existing ones keep their edited timing)."

    def handle(self, *args, **options):
        for spec in schedules():
            every = max(1, int(spec["every_seconds"]))
            interval, _ = IntervalSchedule.objects.get_or_create(every=every, period=IntervalSchedule.SECONDS)
            task, created = PeriodicTask.objects.get_or_create(
                name=spec["name"], defaults={"task": spec["task"], "interval": interval}
            )
            self.stdout.write(f"{'created' if created else 'kept'}: {task.name} ({task.task})")
