"""`pipeline run` with two trainer ranks per trainer stage (SFT, GRPO, OPD), on the
embedded local Ray, gloo on CPU: the torch backend's data parallelism and DeepSpeed ZeRO-2.

Checks: every stage finishes; the OPD teach phase runs in Ray tasks, one per teacher
(`resources.stages.teach`); OPD's head loads per step on each rank never exceed the
teachers in that rank's share; and 2 ranks x micro-batch m end with the same weights as
1 rank x micro-batch 2m, for SFT and for OPD (the same rollouts and teacher cache: the
stages upstream are shared). Tolerance: 1e-4 absolute + 1e-4 relative on every weight
(fp32; gradients summed in a different order, then a few Adam steps).
The OPD teachers are external checkpoints (tiny random models sharing the vocabulary), so
the graph needs no second domain's SFT and GRPO.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # Ray, rank actors and three stages: ~1-2 min per run on 2 cores

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from test_runner import TINY_MODEL  # noqa: E402

M = 2  # micro-batch per rank


def _config(tmp_path: Path, name: str, backend: str, ranks: int, micro: int, teachers: list[str]) -> Path:
    trainer = {"backend": backend, **({"zero_stage": 2} if backend == "deepspeed" else {})}
    rank_res = {"trainer_ranks": ranks, "num_cpus": 1}
    raw = {
        "experiment": f"multirank-{name}", "run_dir": str(tmp_path / name), "model": TINY_MODEL,
        "trainer": trainer,
        "domains": [{"name": d, "data": {"synthetic": {"generator": "math", "train_size": 16, "eval_size": 4}},
                     "verifier": "math",
                     "sft": {"steps": 3, "batch_size": 4 * M, "micro_batch_size": micro, "max_length": 48,
                             "save_every": 3, "lr": 1e-2},
                     "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8,
                              "micro_batch_size": micro, "save_every": 2, "kl_beta": 0.0}}
                    for d in ("math", "arith")],
        "opd": {"student_init": "base", "teachers": [{"domain": "math", "path": teachers[0]},
                                                     {"domain": "arith", "path": teachers[1]}],
                "rounds": 1, "prompts_per_domain": 3, "samples_per_prompt": 2, "max_new_tokens": 8,
                "mini_batch_size": 12, "micro_batch_size": micro, "cache_dtype": "fp32", "lr": 1e-2,
                "heldout_prompts_per_domain": 0, "eval_prompts_per_round": 0,
                "reward_weight": 0.5},  # the reward term's path too: scored rollouts, advantages dealt to ranks
        # 4 logical CPUs: the two ranks' bundles, and the two teachers' prefill tasks beside them
        "resources": {"num_cpus": 4, "default": {"num_cpus": 1}, "concurrent_stages": 1,
                      "stages": {"sft": rank_res, "grpo": rank_res, "opd": rank_res, "teach": {"num_cpus": 1}}},
        "logging": {"progress": False, "wandb": "disabled"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(config: Path, *only: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--only", *only], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(config.parent.rglob("stage.log")))
        raise AssertionError(f"pipeline run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}")
    return proc


def _manifest(run: Path, stage: str) -> dict:
    from pipeline.rundir import RunDir

    return RunDir(run).read_manifest(stage)


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(_manifest(run, stage)["outputs"]["model"]) / "model.safetensors"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from engine.model import TinySpec, materialize_tiny

    spec = TinySpec(**TINY_MODEL["tiny"])
    root = tmp_path_factory.mktemp("teachers")
    return [str(materialize_tiny(spec, root / f"t{i}", seed=10 + i)) for i in range(2)]


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_two_ranks_run_sft_grpo_opd_and_match_one_rank(tmp_path, teachers, backend):
    two = _config(tmp_path, "two", backend, ranks=2, micro=M, teachers=teachers)
    _run(two, "prepare", "sft:math", "grpo:math", "opd")
    run2 = tmp_path / "two"
    for stage in ("sft:math", "grpo:math", "opd"):
        assert _manifest(run2, stage)["status"] == "done", stage
    log = (run2 / "opd" / "stage.log").read_text()  # the teach phase ran in Ray workers, one per teacher
    assert log.count("tokens prefilled in Ray worker") == 2, log[-3000:]
    opd = _manifest(run2, "opd")["metrics"]
    assert opd["max_resident_heads"] == 1
    assert set(opd["reward_per_round"][0]) == {"math", "arith"}  # every rollout scored by its route's verifier
    loads, shares = opd["head_loads_per_rank"], opd["teachers_per_rank"]
    assert loads and all(len(step) == 2 for step in loads)
    for step_loads, step_teachers in zip(loads, shares):
        assert all(n <= t for n, t in zip(step_loads, step_teachers)), (step_loads, step_teachers)
    if backend != "torch":
        return  # the equality check is the torch backend's (DeepSpeed's is in test_trainer_ray)
    one = _config(tmp_path, "one", backend, ranks=1, micro=2 * M, teachers=teachers)
    shutil.copytree(run2 / "prepare", tmp_path / "one" / "prepare")  # the same base model and data
    _run(one, "prepare", "sft:math", "opd")
    run1 = tmp_path / "one"
    for stage in ("sft:math", "opd"):
        w2, w1 = _weights(run2, stage), _weights(run1, stage)
        assert w2.keys() == w1.keys()
        for k in w2:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-4, msg=f"{stage}: {k}")
