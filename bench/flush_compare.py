"""``bench/flush_bench.py`` on two git refs, alternately, in one run.

    .venv/bin/python bench/flush_compare.py [base ref] [new ref] [rounds] [subjects] [members]

Each ref (default ``main`` and ``HEAD``) is checked out in a temporary git worktree and runs this
tree's ``flush_bench.py`` (so both print the same figures: deltas/s and CPU seconds of Python,
PostgreSQL and Redis per 50,000 deltas), each run with its own private redis-server, against the
same bench database. The load average is printed before each run: on a shared machine compare
runs next to each other, and the CPU seconds rather than the wall time.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tree: Path, subjects: int, members: int) -> dict:
    args = [sys.executable, str(tree / "bench" / "flush_bench.py"), str(subjects), str(members)]
    out = subprocess.run(args, cwd=tree, capture_output=True, text=True, check=False).stdout
    found = {"load": os.getloadavg()[0]}
    rate = re.search(r"flush: ([\d,]+) deltas/s", out)
    cpu = re.search(r"python ([\d.]+), postgres ([\d.]+), redis ([\d.]+) \(total ([\d.]+)\)", out)
    seconds = re.search(r"deltas in ([\d.]+)s", out)
    if not (rate and cpu and seconds):
        raise SystemExit(f"flush_bench failed in {tree}:\n{out}")
    found.update(rate=int(rate[1].replace(",", "")), seconds=float(seconds[1]), exact="exactness: OK" in out)
    found.update(zip(("python", "postgres", "redis", "total"), map(float, cpu.groups()), strict=True))
    return found


def main(refs: list[str], rounds: int, subjects: int, members: int) -> int:
    trees = []
    try:
        for ref in refs:
            tree = Path(tempfile.mkdtemp(prefix="flush-compare-")) / "tree"
            args = ["git", "worktree", "add", "--detach", str(tree), ref]
            subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
            trees.append((ref, tree))
            shutil.copy(ROOT / "bench" / "flush_bench.py", tree / "bench" / "flush_bench.py")
        header = f"{'run':<14}{'load':>6}{'deltas/s':>10}{'flush s':>9} | CPU s per 50k deltas:"
        print(header + f"{'python':>8}{'postgres':>9}{'redis':>7}{'total':>7}  exact", flush=True)
        for _ in range(rounds):
            for name, tree in trees:
                load = os.getloadavg()[0]
                r = run(tree, subjects, members)
                line = f"{name[:13]:<14}{load:>6.1f}{r['rate']:>10,}{r['seconds']:>9.2f} |" + " " * 21
                line += f"{r['python']:>8.2f}{r['postgres']:>9.2f}{r['redis']:>7.2f}{r['total']:>7.2f}  "
                print(line + ("OK" if r["exact"] else "FAILED"), flush=True)
    finally:
        for _, tree in trees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
            shutil.rmtree(tree.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    refs = (argv[:2] + ["main", "HEAD"][len(argv[:2]) :])[:2]
    numbers = [int(a) for a in argv[2:5]]
    rounds, subjects, members = numbers + [2, 50_000, 50_000][len(numbers) :]
    sys.exit(main(refs, rounds, subjects, members))
