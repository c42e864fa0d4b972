"""Diagnostic only, for ``bench/soak.py --trace-dir``: what grows inside a live gunicorn or Celery process.

Nothing in the service imports this. ``bench/gunicorn_traced.py`` (a gunicorn config that extends
``gunicorn.conf.py``) calls ``start`` in ``post_fork``; ``bench/celery_traced.py`` (a Celery launcher)
calls it in ``worker_process_init``. ``start`` begins a daemon thread that, after
``MEM_TRACE_WARMUP`` seconds and then every ``MEM_TRACE_EVERY`` seconds, appends to
``<MEM_TRACE_DIR>/<label>-<pid>.txt`` one line with the RSS (and its anonymous and file-backed
parts), the number of Python memory blocks (``sys.getallocatedblocks``), the pymalloc arenas
mapped (from ``sys._debugmallocstats``), and the glibc heap in use and free-but-kept
(``mallinfo2``). That tells a Python leak (blocks grow), a leak in C code (malloc in use grows with
flat blocks), fragmentation of pymalloc (arenas grow with flat blocks) or of glibc (only the free
part grows) and pages of code and libraries touched for the first time (file-backed RSS grows)
apart, without slowing the process.

With ``MEM_TRACE_TRACEMALLOC=1`` it also runs ``tracemalloc`` (which costs memory and time itself)
and rewrites ``<label>-<pid>.top.txt`` with the allocation sites that grew most since the first
report.
"""

import ctypes
import gc
import linecache
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

TOP = 25
FRAMES = 10


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _malloc_kib() -> tuple[int, int]:
    """glibc heap in use (with mmapped blocks) and free-but-kept, in KiB; (-1, -1) without glibc."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return -1, -1
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) // 1024, info.fordblks // 1024


def rss_kib(pid: int | str = "self") -> tuple[int, int, int] | None:
    """VmRSS, RssAnon and RssFile of a process (this one by default), in KiB; None if it is gone
    (or a zombie: its status has no VmRSS)."""
    fields = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(rest.split()[0])
    if "VmRSS" not in fields:
        return None
    return fields["VmRSS"], fields.get("RssAnon", 0), fields.get("RssFile", 0)


def _pymalloc_arenas() -> int:
    """pymalloc arenas mapped now (-1 if unknown).

    ``sys._debugmallocstats`` writes to the C stream stderr only, so fd 2 is pointed at a temporary
    file for the call (a few milliseconds; anything another thread logs meanwhile lands there).
    """
    if not hasattr(sys, "_debugmallocstats"):
        return -1
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        for line in capture.read().decode(errors="replace").splitlines():
            if line.startswith("# arenas allocated current"):
                return int(line.split("=")[-1].replace(",", "").strip())
    return -1


def _snapshot() -> tracemalloc.Snapshot:
    # Leave out the hook's own allocations (the report, linecache's source lines).
    ignored = [
        tracemalloc.Filter(False, tracemalloc.__file__, all_frames=True),
        tracemalloc.Filter(False, __file__, all_frames=True),
        tracemalloc.Filter(False, linecache.__file__, all_frames=True),
    ]
    return tracemalloc.take_snapshot().filter_traces(ignored)


HEADER = "minutes rss_kib rss_anon_kib rss_file_kib py_blocks pymalloc_arenas malloc_used_kib malloc_free_kib"


def _measure() -> tuple[int, ...]:
    gc.collect()
    used, free = _malloc_kib()
    return (*rss_kib(), sys.getallocatedblocks(), _pymalloc_arenas(), used, free)


def _run(path: Path, warmup: float, every: float, traced: bool) -> None:
    time.sleep(warmup)
    started = time.monotonic()
    baseline = _snapshot() if traced else None
    base = _measure()
    with path.open("a") as out:
        out.write(HEADER + "\n")
        out.write("0.0 " + " ".join(map(str, base)) + "\n")
    while True:
        time.sleep(every)
        values = _measure()
        with path.open("a") as out:
            out.write(f"{(time.monotonic() - started) / 60:.1f} " + " ".join(map(str, values)) + "\n")
        if baseline is None:
            continue
        report = [f"top {TOP} allocation sites grown since the first report:"]
        for stat in _snapshot().compare_to(baseline, "traceback")[:TOP]:
            report.append(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks")
            report += ["      " + line for line in stat.traceback.format(limit=FRAMES)]
        linecache.clearcache()
        path.with_suffix(".top.txt").write_text("\n".join(report) + "\n")


def start(label: str) -> None:
    directory = os.environ.get("MEM_TRACE_DIR")
    if not directory:
        return
    traced = os.environ.get("MEM_TRACE_TRACEMALLOC") == "1"
    if traced:
        tracemalloc.start(FRAMES)
    path = Path(directory) / f"{label}-{os.getpid()}.txt"
    warmup = float(os.environ.get("MEM_TRACE_WARMUP", "60"))
    every = float(os.environ.get("MEM_TRACE_EVERY", "60"))
    threading.Thread(target=_run, args=(path, warmup, every, traced), daemon=True, name="memtrace").start()
