"""Diagnostic only: ``celery -A counterproject ARGS`` with tracemalloc in every pool process.

Run as ``python bench/celery_traced.py worker --concurrency=1 ...``; see ``bench/tracehook.py``.
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import tracehook  # noqa: E402
from celery.signals import worker_process_init  # noqa: E402

from counterproject.celery import app  # noqa: E402


@worker_process_init.connect
def _trace(**kwargs) -> None:
    tracehook.start("celery-pool")


if __name__ == "__main__":
    app.worker_main(sys.argv[1:])
