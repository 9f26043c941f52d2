"""`trainer.lora` and `trainer.gradient_checkpointing` through `pipeline run` (the real
runner: embedded local Ray, a stage process per stage, trainer ranks as Ray actors) on
configs/small-hf.yaml with command-line overrides only, every stage kind (sft, grpo,
mixed_rl, opd), each trainer stage on 2 DeepSpeed ZeRO-2 ranks (gloo).

Checks per model stage: the manifest records the LoRA and checkpointing settings; losses
are finite; `final/` loads with plain transformers (merged weights, no peft names) and
differs from the stage's start model (read from the adapter's own
`base_model_name_or_path`) only in the targeted projections; `final/adapter/` over the
start model reproduces `final/`'s logits; DeepSpeed's checkpoint holds no frozen base
weight. SFT and OPD must move the weights. GRPO and mixed RL on the random toy model give
every rollout of a group the same reward (mostly 0), so every advantage is 0, and the
adapter starts at B = 0, so the policy is the reference and the KL gradient is 0 too: where
their weights did not move the test asserts a zero gradient norm at every step, then only
the invariants (GRPO steps that move a LoRA adapter: tests/integration/test_lora_deepspeed.py).
Then `sft:math` again on one torch rank, from the same prepared data: the same merged
weights as the 2 DeepSpeed ranks (fp32; 1e-6 absolute: one micro-batch per step, so
rank 1 adds a zero padding gradient and the sums are the same numbers)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # one small-hf graph on 2 ranks + one SFT stage: a few minutes on 2 cores

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "v_proj", "down_proj"]
LORA = ["trainer.lora.r=4", "trainer.lora.alpha=8", f"trainer.lora.target_modules=[{','.join(TARGETS)}]",
        "trainer.gradient_checkpointing=true"]
TWO_RANKS = ["trainer.backend=deepspeed", "trainer.zero_stage=2", "resources.default.trainer_ranks=2",
             "resources.num_cpus=4"]  # logical CPUs: a stage's two rank bundles + OPD's teacher tasks
SHORT = [f"domains.{d}.sft.{k}=2" for d in ("math", "code", "ifeval", "tool") for k in ("steps", "save_every")] \
    + ["student_sft.steps=2", "student_sft.save_every=2"]  # 2 steps, not 3


def _run(run_dir: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/small-hf.yaml", f"run_dir={run_dir}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.rglob("stage.log")))
        raise AssertionError(f"pipeline run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}")


def _manifests(run_dir: Path) -> dict[str, dict]:
    out = {}
    for f in run_dir.glob("*/manifest.json"):
        m = json.loads(f.read_text())
        out[m["stage"]] = m
    return out


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "small-hf"
    _run(run_dir, *LORA, *TWO_RANKS, *SHORT)
    return run_dir


def test_lora_and_checkpointing_through_every_stage_kind_on_two_ranks(two_rank_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifests = _manifests(two_rank_run)
    trained = {s: m for s, m in manifests.items() if s.split(":")[0] in ("sft", "grpo", "mixed_rl", "opd")}
    assert {s.split(":")[0] for s in trained} == {"sft", "grpo", "mixed_rl", "opd"}, sorted(manifests)
    assert len(trained) == 11  # 4 sft + 4 grpo + sft:all + mixed_rl + opd (sft:ifeval has no rows: base model)
    assert json.loads((two_rank_run / "eval" / "results.json").read_text())["models"]
    ids = torch.tensor([[5, 17, 40, 99, 250, 7, 8, 300, 12]])
    moved = {}
    for stage, m in sorted(trained.items()):
        assert m["status"] == "done", stage
        trainer = m["inputs"]["trainer"] if "trainer" in m["inputs"] else None
        if trainer is not None:
            assert trainer["lora"]["target_modules"] == TARGETS and trainer["gradient_checkpointing"], stage
            assert trainer["backend"] == "deepspeed", stage
        for k, v in m["metrics"].items():
            if "loss" in k and isinstance(v, float):
                assert math.isfinite(v), (stage, k, v)
        final = Path(m["outputs"]["final"])
        adapter = final / "adapter"
        if not adapter.is_dir():  # a stage with nothing to train passes its start model through
            continue
        start = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
        w, w0 = _weights(final), _weights(start)
        assert not any("lora" in k or "base_layer" in k for k in w), stage
        # the merged dict names the tied head too (equal to the embeddings); the base may omit it
        assert set(w) ^ set(w0) <= {"lm_head.weight"}, (stage, set(w) ^ set(w0))
        if "lm_head.weight" in w:
            assert torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"]), stage
        w0 = {k: w0.get(k, w0["model.embed_tokens.weight"]) for k in w}
        changed = {k for k in w if not torch.equal(w[k], w0[k])}
        assert all(k.rsplit(".", 2)[-2] in TARGETS for k in changed), (stage, sorted(changed))
        moved[stage] = len(changed)
        lm = AutoModelForCausalLM.from_pretrained(str(final))
        with torch.no_grad():
            want = lm(input_ids=ids).logits
            adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(start)), str(adapter))
            torch.testing.assert_close(adapted(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5, msg=stage)
        for states in Path(m["outputs"]["model"], "deepspeed").rglob("*model_states.pt"):
            module = torch.load(states, weights_only=False)["module"] or {}
            # DeepSpeed drops frozen parameters by their `named_parameters` name; the toy ties its
            # head to the embeddings, so the head's second name stays (one vocab x hidden tensor)
            assert any(".lora_" in k for k in module), stage
            assert {k for k in module if ".lora_" not in k} <= {"lm.lm_head.weight"}, (stage, sorted(module)[:4])
        if stage.split(":")[0] in ("grpo", "mixed_rl") and not changed:  # see the module docstring
            rows = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]
            norms = [r["train/grad_norm"] for r in rows if "train/grad_norm" in r]
            assert norms and all(n == 0.0 for n in norms), (stage, norms)
    n_layers = 2
    for stage in ("sft:math", "sft:code", "sft:tool", "sft:all", "opd"):
        assert moved.get(stage) == len(TARGETS) * n_layers, (stage, moved)


def test_two_deepspeed_ranks_match_one_torch_rank(two_rank_run, tmp_path):
    one = tmp_path / "small-hf"
    shutil.copytree(two_rank_run / "prepare", one / "prepare")  # the same base model and data
    _run(one, *LORA, *SHORT, "--only", "prepare", "sft:math")
    m1, m2 = _manifests(one)["sft:math"], _manifests(two_rank_run)["sft:math"]
    assert m1["inputs"]["trainer"]["backend"] == "torch"
    w1, w2 = _weights(Path(m1["outputs"]["final"])), _weights(Path(m2["outputs"]["final"]))
    assert w1.keys() == w2.keys()
    for k, v in w1.items():
        torch.testing.assert_close(w2[k], v, atol=1e-6, rtol=0, msg=k)
    assert m1["metrics"]["final_loss"] == pytest.approx(m2["metrics"]["final_loss"], rel=1e-6)
