"""Throughput of `score_batch` on 1,000 code completions (a mix of passing and failing).

    python bench/bench_rewards.py [--n 1000] [--workers N]

Prints items/s and writes bench/results/rewards.json atomically. The mix: 50% correct,
20% wrong answer, 10% partially correct (3 of 4 tests), 10% runtime error, 10% syntax error; every
item runs in the full sandbox (namespaces, rlimits, throwaway uid, fresh directory).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rewards import score_batch  # noqa: E402
from rewards.sandbox_isolation import probe  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "rewards.json"
REF = {"tests": [f"assert add(*{(a, b)}) == {a + b}" for a, b in [(1, 2), (3, 4), (-5, 5), (10, 20)]]}
PROGRAMS = (
    ["```python\ndef add(a, b):\n    return a + b\n```"] * 5
    + ["def add(a, b):\n    return a - b"] * 2
    + ["def add(a, b):\n    return a + b if a < 5 else 0"]  # fails (10, 20): 3 of 4
    + ["def add(a, b):\n    return a + undefined_name"]
    + ["def add(a, b) return a + b"]
)


def write_atomic(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    completions = [PROGRAMS[i % len(PROGRAMS)] for i in range(args.n)]
    start = time.perf_counter()
    results = score_batch("code", completions, [REF] * args.n, num_workers=args.workers)
    elapsed = time.perf_counter() - start
    mean = sum(r.score for r in results) / args.n
    payload = {
        "benchmark": "score_batch code", "items": args.n, "seconds": round(elapsed, 3),
        "items_per_s": round(args.n / elapsed, 2), "mean_score": round(mean, 4),
        "expected_mean_score": round((5 * 1.0 + 2 * 0.0 + 0.75 + 0 + 0) / 10, 4),
        "workers": args.workers or len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
        "isolation": probe(), "python": platform.python_version(), "machine": platform.machine(),
    }
    write_atomic(RESULTS, payload)
    print(f"{args.n} code completions in {elapsed:.2f}s: {args.n / elapsed:.1f} items/s (mean score {mean:.3f})")


if __name__ == "__main__":
    main()
