"""What a `pipeline stage` process spends on imports: wall and CPU seconds of the whole
process, and `python -X importtime`'s import seconds, in all and by top-level package (each
module's own time counted to the package it belongs to).

    python -m bench.bench_stage_startup --config configs/tiny.yaml --run-dir RUN \\
        STAGE[:override,override...] ... [--repeats 1] [--out FILE]

RUN must hold the stages' inputs done for this config (e.g. a copy of a finished tiny run);
every stage runs with `--force` in it, with its overrides (e.g. `grpo:math:domains.math.grpo.steps=1`
for one GRPO step). The CPU seconds are the stage process's and its waited-for children's.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict

from bench.common import emit_json


def parse_importtime(stderr: str) -> tuple[float, dict[str, float]]:
    """(seconds of top-level imports, seconds by top-level package) from `-X importtime`."""
    total, by_package = 0.0, defaultdict(float)
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        if not name.startswith("  "):  # a top-level import: its cumulative time is all of it
            total += int(cumulative_us) / 1e6
        by_package[name.strip().split(".")[0]] += int(self_us) / 1e6
    return total, dict(by_package)


def run_stage(config: str, run_dir: str, stage: str, overrides: list[str]) -> dict:
    argv = [sys.executable, "-X", "importtime", "-m", "pipeline", "stage", config, stage, f"run_dir={run_dir}",
            "--force", *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{stage} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    imports, by_package = parse_importtime(proc.stderr)
    top = dict(sorted(by_package.items(), key=lambda kv: -kv[1])[:12])
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "import_s": imports, "import_s_by_package": {k: round(v, 3) for k, v in top.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("stages", nargs="+", help="STAGE or STAGE:override,override")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    out = {"config": args.config, "threads": os.environ.get("OMP_NUM_THREADS"), "stages": {}}
    for spec in args.stages:
        kind, _, rest = spec.partition(":")
        stage, overrides = kind, []
        if rest:  # a stage name may itself hold a colon (grpo:math): overrides are what has '='
            parts = rest.split(":", 1)
            if "=" in parts[0]:
                overrides = rest.split(",")
            else:
                stage = f"{kind}:{parts[0]}"
                overrides = parts[1].split(",") if len(parts) > 1 else []
        runs = [run_stage(args.config, args.run_dir, stage, overrides) for _ in range(args.repeats)]
        out["stages"][spec] = runs if len(runs) > 1 else runs[0]
    emit_json(out, args.out)


if __name__ == "__main__":
    main()
