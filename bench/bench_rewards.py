"""Throughput of `score_batch` on 1,000 code completions (a mix of passing and failing).

    python bench/bench_rewards.py [--n 1000] [--workers N]
    python bench/bench_rewards.py --cost     # per-verifier cost of its worst accepted inputs

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


def _cost_cases() -> list[tuple[str, str, str, dict]]:
    """(verifier, label, completion, reference): the costliest inputs each verifier still
    evaluates (the guards refuse the next size up) and a plain one."""
    ps = {"instruction_id_list": ["detectable_content:postscript", "change_case:capital_word_frequency"],
          "kwargs": [{"postscript_marker": "P.S."}, {"capital_frequency": 2, "capital_relation": "at least"}]}
    tool_ref = {"calls": [{"name": "f", "arguments": {"a": 1, "b": [1, 2, 3]}}]}
    call = '<tool_call><invoke name="f"><parameter name="a">1</parameter><parameter name="b">[1, 2, 3]</parameter></invoke></tool_call>'
    return [
        ("math", "plain fraction", "so the answer is \\boxed{\\frac{5}{6}}", {"answer": "\\frac{5}{6}"}),
        ("math", "(x+1)^{64} (largest symbolic power accepted)", "\\boxed{(x+1)^{64}}", {"answer": "x"}),
        ("math", "2^{99999} (a 30k-digit power)", "\\boxed{2^{99999}}", {"answer": "3"}),
        ("math", "99999! (largest factorial accepted)", "\\boxed{99999!}", {"answer": "3"}),
        ("math", "256 chars of sums", "\\boxed{" + "+".join(["\\frac{1}{x}"] * 21) + "}", {"answer": "1"}),
        ("math", "200k chars of text", "x " * 100_000 + "\\boxed{4}", {"answer": "4"}),
        ("ifeval", "200k chars", "Word " * 40_000 + "P.S. x", ps),
        ("tool", "200k chars + a call", "x" * 200_000 + call + " done", tool_ref),
        ("format", "200k chars", "<think>" + "x" * 200_000 + "</think><answer>4</answer>", {}),
    ]


def measure_cost() -> None:
    """Seconds per verifier call, in this process: the first call of each verifier (its
    imports) and the slowest of 3 warm calls per case."""
    from rewards.registry import get_verifier

    seen, rows = set(), []
    for name, label, text, ref in _cost_cases():
        verifier = get_verifier(name)
        if name not in seen:  # this first case once more, cold: the verifier's imports
            start = time.perf_counter()
            verifier(text, ref)
            rows.append((name, f"first call, cold ({label})", time.perf_counter() - start))
            seen.add(name)
        worst = 0.0
        for _ in range(3):
            start = time.perf_counter()
            verifier(text, ref)
            worst = max(worst, time.perf_counter() - start)
        rows.append((name, label, worst))
    for name, label, secs in rows:
        print(f"{name:7s} {secs:8.3f} s  {label}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--cost", action="store_true", help="per-verifier cost of the worst accepted inputs")
    args = parser.parse_args()
    if args.cost:
        measure_cost()
        return
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
