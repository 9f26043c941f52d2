"""The worked example a user copies (configs/examples/my_project/): a local model
directory, JSONL and parquet files whose fields have other names (mapped with
`data.fields`), and a verifier, an adapter and a tool environment in the user's own module
(found through `python_path`), run through `pipeline run` with every stage in its own Ray
process: prepare, SFT, GRPO (the calc domain multi-turn with the user's tool), OPD, eval.

The model directory is a toy Qwen3 (engine/toy_hf.py), built offline here as a user's
checkpoint would be on disk. Tiny steps: 7-13 min measured on 2 cores shared with a running experiment (not measured idle).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/examples/my_project/my_project.yaml"


def _model_dir(tmp_path: Path) -> Path:
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf

    spec = ToyHFSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                     intermediate_size=64, vocab_size=512)
    return materialize_toy_hf(spec, tmp_path / "my-model", seed=0)


def _cli(*args, timeout=1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_my_project_example_runs_through_the_pipeline(tmp_path):
    model, run = _model_dir(tmp_path), tmp_path / "run"
    over = [f"model.base={model}", f"run_dir={run}"]
    # without the field mapping: validate names the field, the file and the row, exit 2
    bad = _cli("validate", CONFIG, *over, "domains.math.data.fields=null")
    assert bad.returncode == 2
    assert ("data error: domains[0].data.train: the first 8 rows read with adapter 'gsm8k': 8 bad of 8; first: "
            "configs/examples/my_project/math_train.jsonl:1: missing field 'question'; the record has: "
            "problem, solution") in bad.stderr, bad.stderr[-2000:]
    assert not run.exists()

    done = _cli("run", CONFIG, *over)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    def manifest(stage):
        return json.loads((run / stage.replace(":", "-") / "manifest.json").read_text())

    assert manifest("prepare")["metrics"]["rows"] == {"math": {"train": 8, "eval": 3}, "calc": {"train": 4, "eval": 2}}
    assert not (run / "prepare" / "bad_rows.jsonl").exists()
    for d in ("math", "calc"):
        assert manifest(f"sft:{d}")["metrics"]["steps"] == 2  # trained, not the base model passed on
        # 4 prompts x 2 samples scored by my_verifiers:last_number in the stage's scoring workers:
        # had the workers failed to import it, all 8 would be verifier errors and the stage would
        # stop (rewards.raise_if_all_verifier_errors), so `done` says the user's code scored them
        grpo = manifest(f"grpo:{d}")
        assert grpo["status"] == "done" and 0.0 <= grpo["metrics"][f"reward/{d}"] <= 1.0
    # the user's tool environment served the calc episodes, in the grpo stage's own process
    assert "my_verifiers.calculator: an environment for a row" in (run / "grpo-calc" / "stage.log").read_text()
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert {"base", "sft:math", "grpo:math", "sft:calc", "grpo:calc", "student"} <= set(results)
    assert all(set(scores) == {"math", "calc"} for scores in results.values())
