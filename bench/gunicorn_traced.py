"""Diagnostic only: ``gunicorn.conf.py`` plus tracemalloc in every worker (see ``bench/tracehook.py``)."""

import runpy
import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
globals().update(
    {k: v for k, v in runpy.run_path(str(_BENCH.parent / "gunicorn.conf.py")).items() if not k.startswith("__")}
)


def post_fork(server, worker) -> None:
    sys.path.insert(0, str(_BENCH))
    import tracehook

    tracehook.start("web")
