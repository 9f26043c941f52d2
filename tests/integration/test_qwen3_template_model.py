"""A toy Qwen3-architecture model carrying the Qwen3-behaviour template
(tests/fixtures/templates/qwen3.jinja: the empty `<think>\\n\\n</think>\\n\\n` on the last
assistant turn) runs `prepare` and `sft:math`; the SFT loss mask leaves the inserted block
out; `final/` carries the template and `<|im_end|>` in generation_config.json, and the HF
generator on `final/` stops at `<|im_end|>` (not the tokenizer's EOS, `<|endoftext|>`)."""

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "tests/fixtures/templates/qwen3.jinja"


def test_qwen3_template_prepare_sft_and_final_stops_at_im_end(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.chat import render_prompt, render_row
    from engine.generation import HFGenerator, SamplingParams
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf
    from pipeline.config import load_config
    from pipeline.stages import run_stage

    torch.set_num_threads(1)
    monkeypatch.chdir(ROOT)
    base = materialize_toy_hf(ToyHFSpec(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64),
                              tmp_path / "chat-model", seed=1)
    fixture = "tests/fixtures/gsm8k.jsonl"
    raw = {"experiment": "qwen3-template", "run_dir": str(tmp_path / "run"),
           "model": {"base": str(base), "chat_template": TEMPLATE},
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
    tok = AutoTokenizer.from_pretrained(str(final))
    assert tok.chat_template == (ROOT / TEMPLATE).read_text()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>" and im_end != tok.eos_token_id
    assert im_end in json.loads((final / "generation_config.json").read_text())["eos_token_id"]

    train = [json.loads(x) for x in (tmp_path / "run" / "prepare" / "data" / "math" / "train.jsonl")
             .read_text().splitlines()]
    r = render_row(train[0], tok)
    trained = tok.decode([t for t, k in zip(r.input_ids, r.loss_mask) if k], skip_special_tokens=False)
    reply = train[0]["messages"][-1]["content"]
    assert "<think>\n\n</think>\n\n" + reply + "<|im_end|>" in tok.decode(r.input_ids, skip_special_tokens=False)
    assert trained == reply + "<|im_end|>"  # the inserted empty think block is not trained

    row = json.loads((tmp_path / "run" / "prepare" / "data" / "math" / "eval.jsonl").read_text().splitlines()[0])
    prompt = render_prompt(row["messages"], tok)
    assert prompt == list(tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True)["input_ids"])
    lm = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    assert im_end in lm.generation_config.eos_token_id  # plain transformers' generate stops there as well
    lm.generation_config.eos_token_id = tok.eos_token_id  # from here on, without a tokenizer only EOS ends a turn
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    free = HFGenerator(lm, None).generate([prompt], greedy)[0]
    k = 0
    assert im_end not in free.token_ids[:k + 1] and len(free.token_ids) == 8
    with torch.no_grad():  # untie, then give <|im_end|> the output row of the first token (argmax takes the lower id)
        lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())
        lm.lm_head.weight[im_end] = lm.lm_head.weight[free.token_ids[k]]
    assert im_end < free.token_ids[k]
    out = HFGenerator(lm, tok).generate([prompt], greedy)[0]
    assert out.token_ids == free.token_ids[:k] + [im_end] and out.finish_reason == "stop"
    runs_on = HFGenerator(lm, None).generate([prompt], greedy)[0]  # without the template's end of turn it goes on
    assert runs_on.token_ids[:k + 1] == free.token_ids[:k] + [im_end] and len(runs_on.token_ids) > k + 1
    # the pipeline's generator built from final/ alone (its tokenizer and generation_config) stops there too
    assert im_end in HFGenerator(str(final)).end_ids
