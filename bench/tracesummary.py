"""Summarise the per-process reports of ``bench/soak.py --trace-dir DIR`` (``bench/tracehook.py``).

For each web worker and pool process: every column's value at the first and the last report, and
its least-squares slope per minute over the first and the second half of the reports. A leak grows
in both halves; warm-up and fragmentation level off. ``soak.py`` prints this at the end of a
traced run; it can also be run on a directory while a soak is still going:

    python bench/tracesummary.py DIR
"""

import sys
from pathlib import Path


def slope_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if var == 0 else sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def summarise(directory: Path) -> str:
    lines = []
    for path in sorted(directory.glob("*.txt")):
        if path.name.endswith(".top.txt"):
            continue
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if len(rows) < 3 or rows[0][0] != "minutes":
            continue
        header, data = rows[0], [[float(x) for x in row] for row in rows[1:] if row[0] != "minutes"]
        minutes = data[-1][0]
        middle = minutes / 2
        lines.append(f"{path.stem}: {len(data)} reports over {minutes:.0f} min")
        lines.append(f"  {'column':<18}{'first':>12}{'last':>12}{'per min':>10}{'1st half':>10}{'2nd half':>10}")
        for i, name in enumerate(header[1:], start=1):
            points = [(row[0], row[i]) for row in data]
            first = slope_per_min([p for p in points if p[0] <= middle])
            second = slope_per_min([p for p in points if p[0] >= middle])
            lines.append(
                f"  {name:<18}{points[0][1]:>12.0f}{points[-1][1]:>12.0f}"
                f"{slope_per_min(points):>10.1f}{first:>10.1f}{second:>10.1f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/tracesummary.py DIR")
    print(summarise(Path(sys.argv[1])) or "no reports yet")
