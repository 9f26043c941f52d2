"""A user's own verifier that fails on some rows of their data, inside a real `pipeline run`
(the runner, each stage in its own process under Ray, the GRPO stage's scoring workers).

tests/fixtures/fragile_grader/grader.py evaluates each gold answer as an arithmetic
expression: the row whose gold is "twelve" makes it raise, the row whose gold is "9**9**9"
makes it hang (its declared `timeout_s = 3` ends it). Which rows fail depends on the data,
not on the toy model's output. Those rows cost only themselves: the stage finishes, each of
their completions scores 0 with a line naming the row, the verifier and the reason, the
other rows are scored, and the counts are in the manifest and on the console. Then the same
run with a verifier that raises on every row stops at grpo with an error naming it.

Cost: about 1.5-2 min on the 2 shared cores (prepare, a 1-step SFT, a 1-step GRPO of 4
prompts x 2 samples on a 1-layer tiny model, then the GRPO stage again).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/fixtures/fragile_grader/project.yaml"
VERIFIER = "grader:expression_answer"


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_user_verifier_raising_or_hanging_on_some_rows_costs_only_those_rows(tmp_path):
    run = tmp_path / "run"
    done = _cli("run", CONFIG, f"run_dir={run}", "--only", "prepare", "sft:math", "grpo:math")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    grpo_dir = run / "grpo-math"
    manifest = json.loads((grpo_dir / "manifest.json").read_text())
    assert manifest["status"] == "done"
    # 4 prompts x 2 samples; the 2 samples of 'q-raises' raised, the 2 of 'q-hangs' timed out
    assert {k: v for k, v in manifest["metrics"].items() if k.startswith("scoring/")} == {
        "scoring/completions": 8, "scoring/failed": 4, "scoring/verifier_errors": 2, "scoring/timeouts": 2}
    note = ("4 of 8 completions scored 0 without a verdict (2 verifier errors, 2 timeouts); first: row "
            f"'q-raises' (verifier '{VERIFIER}'): verifier error: NameError: name 'twelve' is not defined")
    assert manifest["note"].startswith(note)
    assert f"[grpo:math] done" in done.stdout and note in done.stdout  # console line and summary
    # one stage-log line per failed completion, naming the row, the verifier and the reason
    lines = [ln for ln in (grpo_dir / "stage.log").read_text().splitlines() if "without a verdict from" in ln]
    where = "GRPO rollouts (seed 0), domain 'math'"
    assert sorted(lines) == sorted(
        [f"{where}: row 'q-raises' scored 0 without a verdict from verifier '{VERIFIER}': verifier error: "
         "NameError: name 'twelve' is not defined"] * 2
        + [f"{where}: row 'q-hangs' scored 0 without a verdict from verifier '{VERIFIER}': timeout: item took "
           "longer than 3s"] * 2)
    # the other rows got the verifier's verdict, and every sample was trained on
    samples = [json.loads(x) for x in (grpo_dir / "samples.jsonl").read_text().splitlines()]
    by_row = {}
    for s in samples:
        by_row.setdefault(s["row_id"], []).append(s)
    assert sorted(by_row) == ["q-hangs", "q-ok-1", "q-ok-2", "q-raises"] and all(len(v) == 2 for v in by_row.values())
    for row in ("q-ok-1", "q-ok-2"):
        assert all("scoring_failure" not in s for s in by_row[row])
    assert all(s["reward"] == 0.0 and s["scoring_failure"].startswith("verifier error: NameError")
               for s in by_row["q-raises"])
    assert all(s["scoring_failure"] == "timeout: item took longer than 3s" for s in by_row["q-hangs"])
    step = json.loads((grpo_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert step["samples_trained"] == 8 and step["verifier_errors"] == 2 and step["scoring_failures"] == 4

    # a verifier that raises on every row (a package the machine lacks) stops the stage
    # (max_verifier_error_rate, default: every item of a batch of 8 or more) naming it
    # (prepare and sft:math are done for this config: only grpo:math runs again)
    broken = "grader:with_symbolic_check"
    failed = _cli("run", CONFIG, f"run_dir={run}", f"domains.math.verifier={broken}", "--only", "grpo:math")
    assert failed.returncode == 1, failed.stdout[-4000:] + failed.stderr[-4000:]
    error = (f"GRPO rollouts (seed 0), domain 'math': the '{broken}' verifier raised on all 8 items "
             "(max_verifier_error_rate 1; an environment problem, not the model's output); first: verifier error: "
             "ModuleNotFoundError: No module named 'sympy_grader_pro'")
    assert "FAILED: grpo:math: RuntimeError: " + error in failed.stdout, failed.stdout[-4000:]
    # the failed attempt's manifest (the done output stays until a rerun succeeds)
    m = json.loads((run / "grpo-math.unfinished" / "manifest.json").read_text())
    assert m["status"] == "failed" and error in m["error"]
    kept = json.loads((grpo_dir / "manifest.json").read_text())
    assert kept["status"] == "done" and kept["metrics"] == manifest["metrics"]
    assert error in kept["last_failed"]["error"]
