"""The config snapshot for the fast lane, checked without blocking the event loop.

While the snapshot is fresh it is used as is. When the generation check is due, it is one more
command in the coalesced round trip; if another process changed config, the new snapshot is loaded
on the pool while the loop keeps serving (requests that need the change wait for it). A snapshot
past its TTL with no change announced keeps serving while it is reloaded in the background, so a
periodic refresh never makes requests queue. Without any snapshot (a new worker) requests wait for
the first load.
"""

import asyncio
import logging

from .. import keyspace
from ..config import Snapshot
from ..config import cache as config_cache
from ..redis_store import StoreUnavailable
from .offload import offload
from .store import lane_store

logger = logging.getLogger(__name__)

_loading: dict[str, asyncio.Future] = {}


async def _generation() -> bytes | None:
    """The config generation in Redis; with Redis down, the snapshot's own (the TTL alone bounds staleness)."""
    try:
        return await lane_store().command("GET", keyspace.CONFIG_GENERATION_KEY)
    except StoreUnavailable:
        return config_cache.generation


async def _reload() -> Snapshot:
    """One reload at a time per worker; every request that needs it awaits the same one."""
    loading = _loading.get("snapshot")
    if loading is None:
        loading = _loading["snapshot"] = asyncio.ensure_future(_load_now())
        loading.add_done_callback(_reloaded)
    return await asyncio.shield(loading)


async def _load_now() -> Snapshot:
    generation = await _generation()
    return await offload(config_cache.reload, generation=generation)


def _refresh_in_background() -> None:
    if "snapshot" not in _loading:
        _loading["snapshot"] = loading = asyncio.ensure_future(_load_now())
        loading.add_done_callback(_reloaded)


def _reloaded(loading: asyncio.Future) -> None:
    _loading.pop("snapshot", None)
    if not loading.cancelled() and loading.exception() is not None:
        logger.error("config reload failed", exc_info=loading.exception())


async def current_snapshot() -> Snapshot:
    snapshot, due = config_cache.due()
    if due == "fresh":
        return snapshot
    if due == "reload":
        if snapshot is None:
            return await _reload()
        _refresh_in_background()
        return snapshot
    if config_cache.checked(await _generation()):
        # The current snapshot, not the one seen before the wait: a reload that finished meanwhile
        # (another request's) recorded this generation with a newer snapshot than ``snapshot``.
        current, _ = config_cache.due()
        if current is not None:
            return current
    return await _reload()
