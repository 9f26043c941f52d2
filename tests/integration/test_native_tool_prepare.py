"""`prepare` with `data.tool_calls: native` on a toy Qwen3-architecture model carrying the
Qwen3-behaviour template (tests/fixtures/templates/qwen3.jinja): the synthetic tool domain's
and the xLAM adapter's rows are written in the native form (tools for the template's
`tools=`, calls as `tool_calls`), which the template renders as Hermes `<tool_call>` JSON
in the SFT mask; a domain left at the default keeps its XML rows."""

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "tests/fixtures/templates/qwen3.jinja"


def _rows(run: Path, domain: str, split: str) -> list[dict]:
    return [json.loads(x) for x in (run / "prepare" / "data" / domain / f"{split}.jsonl").read_text().splitlines()]


def test_prepare_writes_native_tool_rows(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from engine.chat import render_row, render_row_prompt
    from engine.tool_formats import Call, parse_calls
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf
    from pipeline.config import load_config
    from pipeline.stages import run_stage

    monkeypatch.chdir(ROOT)
    base = materialize_toy_hf(ToyHFSpec(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64),
                              tmp_path / "chat-model", seed=1)
    xlam = "tests/fixtures/xlam.jsonl"
    raw = {"experiment": "native-tools", "run_dir": str(tmp_path / "run"),
           "model": {"base": str(base), "chat_template": TEMPLATE},
           "domains": [{"name": "tool", "verifier": "tool",
                        "data": {"synthetic": {"generator": "tool", "train_size": 8, "eval_size": 4},
                                 "tool_calls": "native"}},
                       {"name": "fc", "verifier": "tool",
                        "data": {"train": xlam, "eval": xlam, "adapter": "xlam", "tool_calls": "native"}},
                       {"name": "fc_xml", "verifier": "tool", "data": {"train": xlam, "eval": xlam, "adapter": "xlam"}}],
           "opd": {"student_init": "base"}, "logging": {"wandb": "disabled", "progress": False}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    run_stage(cfg, str(path), "prepare")
    run = tmp_path / "run"
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.chat_template = (ROOT / TEMPLATE).read_text()

    for row in _rows(run, "tool", "eval"):  # eval rows always call a tool
        assert row["tools"] == row["reference"]["tools"]
        call = row["messages"][1]
        assert call["content"] == "" and call["tool_calls"][0]["function"]["name"] == row["reference"]["calls"][0]["name"]
        r = render_row(row, tok)
        trained = tok.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m], skip_special_tokens=False)
        untrained = tok.decode([t for t, m in zip(r.input_ids, r.loss_mask) if not m], skip_special_tokens=False)
        ref = row["reference"]["calls"][0]
        call_turn, answer_turn, rest = trained.split("<|im_end|>")
        assert parse_calls(call_turn, "hermes") == [Call(ref["name"], ref["arguments"])]
        assert answer_turn.endswith(row["messages"][3]["content"]) and rest == ""
        # the tool result is not trained: it is in the untrained part, in Qwen3's tool-response user turn
        assert f"<tool_response>\n{row['messages'][2]['content']}\n</tool_response>" in untrained
        assert "<tools>" in tok.decode(render_row_prompt(row, tok))  # Qwen3 lists tools= in its system turn
    native, xml = _rows(run, "fc", "train"), _rows(run, "fc_xml", "train")
    assert [m["role"] for m in native[0]["messages"]] == ["user", "assistant"] and native[0]["tools"]
    assert xml[0]["messages"][0]["role"] == "system" and "tools" not in xml[0]  # the default: as before
    assert xml[0]["messages"][-1]["content"].startswith("<tool_call><invoke")
