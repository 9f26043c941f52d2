"""The real-shaped experiment (configs/small-hf.yaml) end to end on an embedded local Ray:
a toy Qwen3ForCausalLM with a byte-level BPE tokenizer and a ChatML/<think> template, rows
of GSM8K, MBPP, IFEval and xLAM read through `datasets`, every stage kind. Then every
model stage's `final/` loads in transformers and with AutoTokenizer with no arguments."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_small_hf_pipeline_end_to_end(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "small-hf"
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/small-hf.yaml", f"run_dir={run_dir}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    domains = {"math", "code", "ifeval", "tool"}
    expected = {"base", "student", "mixed_rl", "sft:all"} | {f"{k}:{d}" for k in ("sft", "grpo") for d in domains}
    assert expected <= set(results["models"]), sorted(results["models"])
    assert all(set(s) == domains for s in results["models"].values())
    report = (run_dir / "report" / "report.md").read_text()
    finals = []
    for manifest in sorted(run_dir.glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m["stage"].split(":")[0] in ("sft", "grpo", "mixed_rl", "opd"):
            finals.append(pathlib.Path(m["outputs"]["final"]))
    assert len(finals) == 11  # 4 sft + 4 grpo + sft:all + mixed_rl + opd
    for final in finals:
        assert final.parent.parent == run_dir and final.name == "final"
        assert str(final.relative_to(run_dir)) in report
        assert not list(final.glob("*.pt")) and (final / "model.safetensors").is_file()
        lm = AutoModelForCausalLM.from_pretrained(str(final))
        tok = AutoTokenizer.from_pretrained(str(final))
        assert type(lm).__name__ == "Qwen3ForCausalLM"
        gen = json.loads((final / "generation_config.json").read_text())
        assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                         add_generation_prompt=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert lm.generate(prompt, max_new_tokens=4).shape[1] > prompt.shape[1]
