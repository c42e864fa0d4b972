import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "counterproject.settings")

app = Celery("counterproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Task metrics: counted by signals in every worker process (docs/metrics.md).
import metrics.worker  # noqa: E402, F401
