"""SFT stage on the synthetic `math` domain (tiny model, CPU): eval loss falls, the domain
verifier's greedy score rises above the base model's, and the final checkpoint is an HF
directory that `AutoModelForCausalLM.from_pretrained` loads and generates from."""

import json

import pytest
import torch

from engine.model import TinySpec, load_tokenizer, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer, with_overrides
from experts.sft import SFTSettings, run_sft

torch.set_num_threads(1)
SPEC = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192)


def greedy_score(model_dir, rows, tokenizer, verifier) -> float:
    from transformers import AutoModelForCausalLM

    from engine.chat import render_prompt

    lm = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompts = [render_prompt(r["messages"], tokenizer) for r in rows]
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(p)) + p for p in prompts])  # left padding
    attn = (torch.arange(T)[None, :] >= torch.tensor([T - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=attn, max_new_tokens=24, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, T:], skip_special_tokens=True)
    return sum(verifier(t, r["reference"]).score for t, r in zip(texts, rows)) / len(rows)


def test_sft_math_learns_and_checkpoint_loads(tmp_path):
    from engine.domains import get_domain
    from engine.metrics import MetricsLogger
    from rewards import get_verifier

    domain = get_domain("math")
    train, evals = domain.generate("train", 1500, seed=0), domain.generate("eval", 48, seed=0)
    base = materialize_tiny(SPEC, tmp_path / "base", seed=0)
    tok = load_tokenizer(base)
    verifier = get_verifier(domain.verifier)
    settings = SFTSettings(steps=200, batch_size=48, micro_batch_size=8, max_length=128, pack=True, lr=1e-2,
                           warmup_steps=5, eval_every=100, save_every=100, keep_last=1)
    trainer = build_trainer(with_overrides(TrainerSettings(), **settings.trainer_overrides()), base)
    logger = MetricsLogger(tmp_path / "sft", total_steps=settings.steps, wandb_mode="disabled", progress=False)
    result = run_sft(settings, trainer=trainer, tokenizer=tok, train_rows=train, eval_rows=evals,
                     out_dir=tmp_path / "sft", logger=logger)
    logger.close()

    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 201))  # step 0: the base model's eval loss
    evals_logged = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals_logged) == 3 and evals_logged[2] < evals_logged[1] < evals_logged[0]
    rows = rows[1:]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in rows)
    ckpt = result["checkpoint"]
    assert ckpt.endswith("step-200") and result["final"]["eval_loss"] == evals_logged[-1]
    base_score = greedy_score(base, evals, tok, verifier)
    sft_score = greedy_score(ckpt, evals, tok, verifier)
    print(f"eval loss {evals_logged}, verifier score base {base_score:.3f} -> sft {sft_score:.3f}")
    assert sft_score > base_score and sft_score >= 0.05  # measured: 0.0 -> 0.104


def test_sft_rejects_rows_without_assistant_tokens(tmp_path):
    base = materialize_tiny(TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64), tmp_path / "m", seed=0)
    tok = load_tokenizer(base)
    rows = [{"id": "r0", "domain": "x", "messages": [{"role": "user", "content": "hi"}], "reference": {}}]
    with pytest.raises(ValueError, match="id 'r0'.* no assistant tokens"):
        run_sft(SFTSettings(steps=1), trainer=None, tokenizer=tok, train_rows=rows, out_dir=tmp_path / "o")
