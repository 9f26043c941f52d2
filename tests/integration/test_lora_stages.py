"""`trainer.lora` through the pipeline's stages (`run_stage`, in process) on the toy
Qwen3-shaped model: sft:math, grpo:math, sft:all + mixed_rl (GRPO's driver) and opd
(external teacher). Each stage's `final/` holds merged weights that load with plain
transformers and differ from the stage's start only in the adapted modules (SFT and OPD
move them; GRPO's rewards on the random model are all 0, so its weights must not move), plus
`final/adapter/` (peft format) that reproduces them over the start model; the stage's
checkpoint holds optimiser state for the adapter only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml


ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "tests/fixtures/templates/qwen3.jinja"
TARGETS = ["q_proj", "v_proj", "up_proj"]


def _check_final(final: Path, start: Path, must_move: bool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(start)).eval()
    m, b = merged.state_dict(), base.state_dict()
    assert m.keys() == b.keys()
    changed = {k for k in m if not torch.equal(m[k], b[k])}
    assert changed or not must_move, "LoRA training changed nothing"
    assert all(k.endswith(tuple(f"{t}.weight" for t in TARGETS)) for k in changed), sorted(changed)
    ids = torch.tensor([[5, 17, 40, 99, 250, 7, 8]])
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        got = PeftModel.from_pretrained(base, str(final / "adapter"))(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _adapter_only_optimiser(model_dir: Path):
    from safetensors.torch import load_file

    ckpt = Path(model_dir)
    n_adapter = sum(t.numel() for t in load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).values())
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    n_state = sum(t.numel() for st in state.values() for t in st.values() if torch.is_tensor(t) and t.dim())
    assert 0 < n_state <= 2 * n_adapter, (n_state, n_adapter)


def test_lora_through_sft_grpo_mixed_rl_and_opd(tmp_path, monkeypatch):
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf
    from pipeline.config import load_config
    from pipeline.stages import run_stage

    torch.set_num_threads(1)
    monkeypatch.chdir(ROOT)
    spec = ToyHFSpec(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    base = materialize_toy_hf(spec, tmp_path / "base", seed=1)
    teacher = materialize_toy_hf(spec, tmp_path / "teacher", seed=2)
    fixture = "tests/fixtures/gsm8k.jsonl"
    raw = {"experiment": "lora", "run_dir": str(tmp_path / "run"),
           "model": {"base": str(base), "chat_template": TEMPLATE},
           "trainer": {"lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": TARGETS}},
           "domains": [{"name": "math", "verifier": "math",
                        "data": {"train": {"hf": {"path": "json", "data_files": fixture, "split": "train[:2]"}},
                                 "eval": {"hf": {"path": "json", "data_files": fixture, "split": "train[2:]"}},
                                 "adapter": "gsm8k"},
                        "sft": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "max_length": 256,
                                "save_every": 2, "lr": 1e-2},
                        "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8,
                                 "micro_batch_size": 2, "save_every": 2, "kl_beta": 0.0, "lr": 1e-2}}],
           "student_sft": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "max_length": 256,
                           "save_every": 2, "lr": 1e-2},
           "mixed_rl": {"enabled": True, "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 2,
                                                  "max_new_tokens": 8, "micro_batch_size": 2, "save_every": 2,
                                                  "kl_beta": 0.0, "lr": 1e-2}},
           "opd": {"student_init": "base", "teachers": [{"domain": "math", "path": str(teacher)}],
                   "rounds": 2, "prompts_per_domain": 2, "samples_per_prompt": 2, "max_new_tokens": 8,
                   "mini_batch_size": 4, "micro_batch_size": 2, "cache_dtype": "fp32", "lr": 1e-2,
                   "heldout_prompts_per_domain": 0, "eval_prompts_per_round": 0, "reward_weight": 0.5},
           "logging": {"wandb": "disabled", "progress": False}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    run_stage(cfg, str(path), "prepare")
    outputs = {}
    for stage, begin in (("sft:math", None), ("grpo:math", "sft:math"), ("sft:all", None),
                         ("mixed_rl", "sft:all"), ("opd", None)):
        m = run_stage(cfg, str(path), stage)
        begin_dir = base if begin is None else Path(outputs[begin]["final"])  # prepare copies the base weights
        # GRPO on the random toy model: every reward is 0, so every advantage is 0 and the
        # adapter (B = 0 at the start) must stay exactly at zero: the merged model is the start
        rl = stage in ("grpo:math", "mixed_rl")
        if rl:
            assert m["metrics"]["reward_mean"] == 0.0, m["metrics"]
        _check_final(Path(m["outputs"]["final"]), begin_dir, must_move=not rl)
        _adapter_only_optimiser(Path(m["outputs"]["model"]))
        outputs[stage] = m["outputs"]
