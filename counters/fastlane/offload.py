"""Blocking work of the fast lane (PostgreSQL: hydration, degraded reads, write-through, config
reloads) runs here, on a bounded thread pool of its own, never on the event loop."""

import asyncio
import contextvars
import functools
import os
from concurrent.futures import ThreadPoolExecutor

from django.db import close_old_connections

# Separate from Django's request threads: a slow admin page never delays a hydration.
THREADS = int(os.environ.get("COUNTER_LANE_THREADS", "4"))
_pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="lane")


def _run(fn, kwargs):
    # As Django does around each request: drop connections that are broken or past CONN_MAX_AGE.
    close_old_connections()
    try:
        return fn(**kwargs)
    finally:
        close_old_connections()


async def offload(fn, /, **kwargs):
    """``fn(**kwargs)`` on the pool, in a copy of the caller's context (its language, for messages)."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, _run, fn, kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
