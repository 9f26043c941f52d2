"""A config whose `model.base` is a local HF chat-model directory (here the toy Qwen3 with a
ChatML template, built offline) runs `prepare` and an SFT stage with no code change; the
stage's `final/` loads with plain transformers, and its greedy generation equals the
pipeline's own greedy rollout from the stage's checkpoint."""

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_local_chat_model_prepare_sft_and_final(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.chat import render_prompt
    from engine.generation import HFGenerator, SamplingParams
    from engine.rollout import rollout
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf
    from pipeline.config import load_config
    from pipeline.stages import run_stage

    torch.set_num_threads(1)
    monkeypatch.chdir(ROOT)
    base = materialize_toy_hf(ToyHFSpec(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64),
                              tmp_path / "chat-model", seed=1)
    fixture = "tests/fixtures/gsm8k.jsonl"
    raw = {"experiment": "local", "run_dir": str(tmp_path / "run"), "model": {"base": str(base)},
           "domains": [{"name": "math", "verifier": "math",
                        "data": {"train": {"hf": {"path": "json", "data_files": fixture, "split": "train[:2]"}},
                                 "eval": {"hf": {"path": "json", "data_files": fixture, "split": "train[2:]"}},
                                 "adapter": "gsm8k"},
                        "sft": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "max_length": 256,
                                "save_every": 2}}],
           "opd": {"student_init": "base"}, "logging": {"wandb": "disabled", "progress": False}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    run_stage(cfg, str(path), "prepare")
    m = run_stage(cfg, str(path), "sft:math")
    final = Path(m["outputs"]["final"])
    assert final == tmp_path / "run" / "sft-math" / "final"
    lm = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    row = json.loads((tmp_path / "run" / "prepare" / "data" / "math" / "eval.jsonl").read_text().splitlines()[0])
    prompt = list(tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True)["input_ids"])
    assert prompt == render_prompt(row["messages"], tok)
    with torch.no_grad():
        out = lm.generate(torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt):].tolist()
    stage = HFGenerator(m["outputs"]["model"], tok)
    traj = rollout(stage, [prompt], SamplingParams(temperature=0.0, max_new_tokens=12), tokenizer=tok)[0]
    assert out == traj.response_ids
