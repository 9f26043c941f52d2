"""Reasoning modes (engine/modes.py): config validation, rows per mode, and rendering per
mode with the tiny tokenizer (generation markers) and the toy Qwen3 one (ChatML, prefixes).
A row without a mode renders exactly as before (tests/unit/test_chat.py holds the tiny format)."""

import pathlib

import pytest
import yaml

from engine import chat
from engine.modes import (DEFAULT_THINK_MAX_INSTRUCTION, ModeSettings, expand_modes, mode_template_kwargs,
                          route_key, split_route, strip_thinking)
from engine.tokenizer import build_tiny_tokenizer
from engine.toy_hf import build_toy_tokenizer
from pipeline.config import ConfigError, load_config
from pipeline.graph import build_graph, input_hashes

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODES = {"non-think": ModeSettings(max_new_tokens=16),
         "think-high": ModeSettings(max_new_tokens=64, length_budget=32, length_penalty=0.01),
         "think-max": ModeSettings(max_new_tokens=128, instruction="Think as long as you can.")}
ROW = {"id": "r1", "domain": "math", "reference": {"answer": "7"},
       "messages": [{"role": "user", "content": "3+4"},
                    {"role": "assistant", "content": "<think>3+4=7</think>\\boxed{7}"}]}


@pytest.fixture(scope="module")
def tokenizers():
    return {"tiny": build_tiny_tokenizer(), "toy_hf": build_toy_tokenizer()}


def test_rows_per_mode():
    rows = expand_modes([ROW], MODES)
    assert [r["id"] for r in rows] == ["r1@non-think", "r1@think-high", "r1@think-max"]
    assert [r["mode"] for r in rows] == list(MODES)
    non, high, mx = rows
    assert non["messages"][-1]["content"] == "\\boxed{7}"  # the direct answer
    assert high["messages"] == ROW["messages"]  # the worked trace inside <think>
    assert mx["messages"][0] == {"role": "system", "content": "Think as long as you can."}
    assert mx["messages"][1:] == ROW["messages"]
    default = expand_modes([ROW], {"think-max": ModeSettings(max_new_tokens=8)})[0]
    assert default["messages"][0]["content"] == DEFAULT_THINK_MAX_INSTRUCTION
    assert expand_modes([ROW], None) == [ROW]
    assert strip_thinking("<think>a\nb</think> \\boxed{1}") == "\\boxed{1}"
    assert route_key("math", "think-max") == "math@think-max" and route_key("math", None) == "math"
    assert split_route("math@think-max") == ("math", "think-max") and split_route("math") == ("math", None)


def test_template_kwargs_per_mode():
    assert mode_template_kwargs(None) == {}
    assert mode_template_kwargs("non-think") == {"enable_thinking": False}
    assert mode_template_kwargs("think-high") == mode_template_kwargs("think-max") == {"enable_thinking": True}
    with pytest.raises(ValueError, match="unknown mode 'think-low'"):
        mode_template_kwargs("think-low")


# What each template writes after the generation prompt, per mode.
PROMPTS = {
    "tiny": {None: "<|user|>3+4<|end|><|assistant|>",
             "non-think": "<|user|>3+4<|end|><|assistant|><think></think>",
             "think-high": "<|user|>3+4<|end|><|assistant|>",
             "think-max": "<|system|>Think as long as you can.<|end|><|user|>3+4<|end|><|assistant|>"},
    "toy_hf": {None: "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n",
               "non-think": "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
               "think-high": "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n",
               "think-max": "<|im_start|>system\nThink as long as you can.<|im_end|>\n"
                            "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n"},
}
TRAINED = {  # the SFT loss mask's tokens, decoded
    "tiny": {None: "<think>3+4=7</think>\\boxed{7}<|end|>", "non-think": "\\boxed{7}<|end|>",
             "think-high": "<think>3+4=7</think>\\boxed{7}<|end|>", "think-max": "<think>3+4=7</think>\\boxed{7}<|end|>"},
    "toy_hf": {None: "<think>3+4=7</think>\\boxed{7}<|im_end|>", "non-think": "\\boxed{7}<|im_end|>",
               "think-high": "<think>3+4=7</think>\\boxed{7}<|im_end|>",
               "think-max": "<think>3+4=7</think>\\boxed{7}<|im_end|>"},
}


@pytest.mark.parametrize("name", ["tiny", "toy_hf"])
def test_rendering_per_mode(name, tokenizers):
    tok = tokenizers[name]
    rows = {None: ROW, **{r["mode"]: r for r in expand_modes([ROW], MODES)}}
    for mode, row in rows.items():
        ids = chat.render_row_prompt(row, tok)
        assert tok.decode(ids) == PROMPTS[name][mode], mode
        prompt = chat.prompt_messages(row["messages"])
        assert ids == list(tok.apply_chat_template(prompt, add_generation_prompt=True,
                                                   **mode_template_kwargs(mode))["input_ids"])
        full = chat.render_row(row, tok)
        assert full.input_ids[:len(ids)] == ids  # the SFT stream starts with the rollout prompt
        trained = tok.decode([t for t, m in zip(full.input_ids, full.loss_mask) if m])
        assert trained == TRAINED[name][mode], mode
    # no kwarg: exactly the template's render without modes
    assert chat.render_row_prompt(ROW, tok) == chat.render_prompt(ROW["messages"], tok)


def _tiny_raw():
    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def _load(tmp_path, raw):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_config(p)


def test_modes_config_and_graph(tmp_path):
    raw = _tiny_raw()
    plain = input_hashes(build_graph(_load(tmp_path, raw)))
    raw["domains"][0]["modes"] = {"non-think": {"max_new_tokens": 16},
                                  "think-high": {"max_new_tokens": 64, "length_budget": 32, "length_penalty": 0.01},
                                  "think-max": {"max_new_tokens": 128}}
    cfg = _load(tmp_path, raw)
    names = [s.name for s in build_graph(cfg)]
    assert {"grpo:math@non-think", "grpo:math@think-high", "grpo:math@think-max"} <= set(names)
    assert "grpo:math" not in names and "grpo:code" in names
    routes = [route_key(t.domain, t.mode) for t in cfg.teachers()]
    assert routes == ["math@non-think", "math@think-high", "math@think-max", "code", "ifeval", "tool"]
    opd = next(s for s in build_graph(cfg) if s.name == "opd")
    assert set(opd.deps) >= {"grpo:math@think-max", "grpo:code"}
    modes = input_hashes(build_graph(cfg))
    # modes change prepare (the rows) and what depends on it; other domains' hashes too
    # (through prepare), but without modes nothing moves: the tiny graph is as before
    assert modes["prepare"] != plain["prepare"]
    del raw["domains"][0]["modes"]
    assert input_hashes(build_graph(_load(tmp_path, raw))) == plain


@pytest.mark.parametrize("modes, path, reason", [
    ({"think-low": {"max_new_tokens": 8}}, "domains[0]", "modes.think-low: unknown mode 'think-low'"),
    ({"non-think": {"max_new_tokens": 8, "length_budget": 4}}, "domains[0]", "modes.non-think: length_budget"),
    ({"think-high": {"max_new_tokens": 8, "instruction": "x"}}, "domains[0]", "modes.think-high.instruction"),
    ({"think-high": {"max_new_tokens": 8, "length_budget": 9}}, "domains[0]", "modes.think-high.length_budget: 9 >"),
    ({"think-high": {}}, "domains[0].modes.think-high.max_new_tokens", "Field required"),
    ({"non-think": {"max_new_tokens": 8, "budget": 3}}, "domains[0].modes.non-think.budget", "Extra inputs"),
    ({}, "domains[0]", "modes: empty"),
    ({"think-max": {"max_new_tokens": 8, "grpo": {"lr": -1.0}}}, "domains[0]", "modes.think-max.grpo.lr: Input should"),
    ({"think-max": {"max_new_tokens": 8, "grpo": {"stepz": 3}}}, "domains[0]", "modes.think-max.grpo.stepz: Extra"),
    ({"think-max": {"max_new_tokens": 8, "grpo": {"max_new_tokens": 9}}}, "domains[0]",
     "modes.think-max.grpo.max_new_tokens: the mode's own max_new_tokens is its budget"),
])
def test_bad_modes_name_their_yaml_path(tmp_path, modes, path, reason):
    raw = _tiny_raw()
    raw["domains"][0]["modes"] = modes
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, raw)
    assert any(p == path and reason in r for p, r in exc.value.errors), exc.value.errors


def test_teacher_modes_are_checked(tmp_path):
    raw = _tiny_raw()
    raw["domains"][0]["modes"] = {"non-think": {"max_new_tokens": 16}, "think-high": {"max_new_tokens": 32}}
    raw["opd"]["teachers"] = [{"domain": "math", "mode": "think-max"}, {"domain": "math", "mode": "non-think"},
                              {"domain": "math", "mode": "non-think"}]
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, raw)
    errors = dict(exc.value.errors)
    assert "'think-max' is not one of domain 'math'" in errors["opd.teachers[0].mode"]
    assert "second teacher for route 'math@non-think'" in errors["opd.teachers[2].domain"]


def test_a_mode_s_own_grpo_settings_reach_its_expert_alone(tmp_path):
    raw = _tiny_raw()
    raw["domains"][0]["modes"] = {"think-high": {"max_new_tokens": 48}, "think-max": {"max_new_tokens": 96}}
    before = input_hashes(build_graph(_load(tmp_path, raw)))
    raw["domains"][0]["modes"]["think-max"]["grpo"] = {"lr": 6.0e-5, "steps": 48}
    cfg = _load(tmp_path, raw)
    math = cfg.domain("math")
    high, top = math.expert_grpo("think-high"), math.expert_grpo("think-max")
    assert (high.lr, high.steps, high.max_new_tokens) == (math.grpo.lr, math.grpo.steps, 48)
    assert (top.lr, top.steps, top.max_new_tokens) == (6.0e-5, 48, 96)
    assert top.group_size == math.grpo.group_size  # the rest is the domain's
    after = input_hashes(build_graph(cfg))
    # only the think-max expert and what reads it rerun: not prepare, not the other experts
    assert {k for k in before if before[k] != after[k]} == {"grpo:math@think-max", "opd", "eval", "report"}
