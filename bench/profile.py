"""Profile one hot endpoint under load: py-spy samples a gunicorn worker while wrk drives it.

    .venv/bin/python bench/profile.py increment   # or: dau, get, get10, batch, baseline

Prints where the worker's time goes (inclusive share per function, top 40) and keeps the
collapsed stacks in a temporary file for a flame graph.
"""

import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))


def main(name: str) -> None:
    scenario = next(s for s in run.SCENARIOS if s.name == name)
    os.environ["WEB_CONCURRENCY"] = "1"
    run.ensure_database(run.DATABASE_URL)
    processes = run.Processes()
    stacks = tempfile.NamedTemporaryFile(prefix=f"profile-{name}-", suffix=".txt", delete=False).name  # noqa: SIM115
    try:
        processes.start_redis()
        run.REDIS_URL[0] = processes.redis_url
        key = run.django_setup(processes.redis_url)
        processes.start_web(scenario.server)
        run.wrk(scenario, key, connections=16, seconds=2)
        master = run.WEB_PID[scenario.server]
        worker = int(subprocess.check_output(["pgrep", "-P", str(master)], text=True).split()[0])
        spy = [str(run.BIN / "py-spy"), "record", "--pid", str(worker), "--duration", str(SECONDS)]
        spy += ["--format", "raw", "--rate", "500", "--output", stacks, "--nonblocking"]
        load = threading.Thread(
            target=run.wrk, args=(scenario, key), kwargs={"connections": 64, "seconds": SECONDS + 1}
        )
        load.start()
        subprocess.run(spy, check=True, capture_output=True)
        load.join()
    finally:
        processes.stop()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in Path(stacks).read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in set(frames.split(";")):
            inclusive[frame] += int(count)
    print(f"{total} samples; collapsed stacks in {stacks}")
    for frame, count in inclusive.most_common(40):
        print(f"{100 * count / total:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "increment")
