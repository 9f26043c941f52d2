"""Run every benchmark (what `make bench` runs), then print the targets side by side.

    python -m bench.run_all [--quick] [--only NAME ...] [--out DIR]

Each benchmark runs in its own process, prints its table and writes
`bench/results/<name>.json` (or under `--out`). A benchmark that fails is reported and
the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR, ROOT

# name -> (command args, results file name)
BENCHES = {
    "opd_vs_trl": (["-m", "bench.bench_opd_vs_trl"], "opd_vs_trl"),
    "kl_kernel": (["-m", "bench.bench_kl_kernel"], "kl_kernel"),
    "cache": (["-m", "bench.bench_cache"], "cache"),
    "grpo_vs_trl": (["-m", "bench.bench_grpo_vs_trl"], "grpo_vs_trl"),
    "flops": (["-m", "bench.bench_flops"], "flops"),
    "rewards": (["bench/bench_rewards.py"], "rewards"),
}


def command(name: str, quick: bool, out: str | None) -> list[str]:
    args, _ = BENCHES[name]
    cmd = [sys.executable, *args]
    if name == "rewards":  # the existing script: its own flags, fixed output path
        return cmd + (["--n", "50"] if quick else [])
    return cmd + (["--quick"] if quick else []) + (["--out", out] if out else [])


def _target_lines(results: Path) -> list[str]:
    """One line per target, read back from the JSON files."""
    def load(name):
        f = results / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    lines = []
    if (r := load("opd_vs_trl")) is not None:
        t = r["targets"]
        lines.append(f"OPD step tokens/s ours/TRL, 4x teacher: {t['ours_over_trl_tokens_per_s_4x_teacher']['measured']:.2f}x"
                     " padded, without the prefill; packed with the prefill: "
                     f"{t['ours_packed_with_prefill_over_trl_tokens_per_s_4x_teacher']['measured']:.2f}x (target >= 1.5x)")
        lines.append(f"our training peak RSS, {r['teacher_sweep'][-1]['teachers']} teachers / 1 teacher: "
                     f"{t['train_peak_rss_n_max_over_n1']:.2f} (target: flat, ~1.0)")
    if (r := load("kl_kernel")) is not None and r["targets"]["memory_ratio_at_32k"]["measured"] is not None:
        t = r["targets"]
        lines.append(f"chunked KL at 32k vocab: {t['memory_ratio_at_32k']['measured']:.1f}x less peak memory "
                     f"(target >= 4x), {t['time_ratio_at_32k']['measured']:.2f}x the time (target < 1.3x)")
    if (r := load("grpo_vs_trl")) is not None:
        t = r["targets"]["throughput_ours_packed_over_trl"]
        lines.append(f"GRPO tokens/s ours (packed)/TRL: training step {t['measured_train_step']:.2f}x, whole step "
                     f"{t['measured_whole_step']:.2f}x (target >= 1.3x)")
    if (r := load("flops")) is not None:
        lines.append(f"training step at {r['fraction_of_matmul']:.2f} of the fp32 matmul rate (6ND)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    p.add_argument("--out", default=None, help="results directory (bench_rewards always writes bench/results)")
    opts = p.parse_args(sys.argv[1:] if argv is None else argv)
    failed, times = [], {}
    for name in opts.only or list(BENCHES):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(command(name, opts.quick, opts.out), cwd=ROOT).returncode
        times[name] = time.perf_counter() - t0
        if rc != 0:
            failed.append(name)
            print(f"!!! {name} failed (exit {rc})", flush=True)
    print("\n=== targets ===")
    for line in _target_lines(Path(opts.out) if opts.out else RESULTS_DIR):
        print("  " + line)
    print("  wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
