import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "counterproject.settings")

app = Celery("counterproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Task metrics: counted by signals in every worker process (docs/metrics.md).
import metrics.worker  # noqa: E402, F401


@signals.worker_init.connect
@signals.beat_init.connect
def _store_check(**_) -> None:
    """A Redis Cluster that is misconfigured (no seed answers, slots not served) stops the worker at start."""
    from counters.redis_store import store_check

    store_check()
