"""Frontend speed: time to parse, validate and lower every spec of the library.

Not a test: run `python benchmarks/frontend.py`. Reports the median of several runs, after a
warm-up run that builds the LALR tables (a one-time cost per process).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import seqdsl

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "specs").glob("*.seq")) + sorted((ROOT / "specs" / "std").glob("*.seq"))


def main(repeats: int = 7) -> None:
    seqdsl.load(FILES[0])  # warm-up: grammar tables, imports
    per_file = {f.name: [] for f in FILES}
    totals = []
    for _ in range(repeats):
        start_all = time.perf_counter()
        for f in FILES:
            start = time.perf_counter()
            seqdsl.load(f)
            per_file[f.name].append(time.perf_counter() - start)
        totals.append(time.perf_counter() - start_all)
    print(f"{'spec':28s} {'median ms':>10s}")
    for name, ts in per_file.items():
        print(f"{name:28s} {statistics.median(ts) * 1000:10.1f}")
    print(f"{'whole library':28s} {statistics.median(totals) * 1000:10.1f}  ({len(FILES)} files, "
          f"median of {repeats})")


if __name__ == "__main__":
    main()
