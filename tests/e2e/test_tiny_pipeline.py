"""The whole tiny experiment on an embedded local Ray, with fewer steps than `make demo`.

Runs `python -m pipeline run configs/tiny.yaml` exactly as a user would (subprocess),
then checks the run directory: every stage done, the eval table covers every model and
domain, OPD kept one head resident and loaded each teacher's head once per step, and a
second run skips everything.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Small but complete: every stage runs its real code path.
FAST = [
    "domains.math.sft.steps=20", "domains.code.sft.steps=20", "domains.ifeval.sft.steps=20",
    "domains.tool.sft.steps=20", "student_sft.steps=20",
    "domains.math.grpo.steps=2", "domains.code.grpo.steps=2", "domains.ifeval.grpo.steps=2",
    "domains.tool.grpo.steps=2", "mixed_rl.grpo.steps=2",
    "opd.rounds=2", "opd.prompts_per_domain=8", "opd.mini_batch_size=16", "opd.heldout_prompts_per_domain=8",
    "eval.max_prompts=8", "eval.samples=2", "logging.progress=false",
]


def _run(run_dir, extra=()):
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/tiny.yaml", f"run_dir={run_dir}", *FAST, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def test_tiny_pipeline_end_to_end(tmp_path):
    run_dir = tmp_path / "tiny"
    first = _run(run_dir)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    models = results["models"]
    domains = {"math", "code", "ifeval", "tool"}
    expected = {"base", "student", "mixed_rl", "sft:all"} | {f"{k}:{d}" for k in ("sft", "grpo") for d in domains}
    assert expected <= set(models), sorted(models)
    for name, scores in models.items():
        assert set(scores) == domains, name
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    opd = json.loads((run_dir / "opd" / "manifest.json").read_text())["metrics"]
    assert opd["max_resident_heads"] == 1
    assert opd["head_loads_per_step"] == opd["teachers_per_step"]
    assert len(opd["kl_per_teacher"]) == 2
    assert [k["after_round"] for k in opd["kl_heldout_per_teacher"]] == [0, 2]  # before training, after the last
    assert opd["cache_bytes_per_token"] > 0
    report = run_dir / "report" / "report.md"
    assert report.is_file() and "| student |" in report.read_text().replace("|student|", "| student |")
    assert str(report) in first.stdout
    second = _run(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "running" not in second.stdout.lower().replace("not running", "")
