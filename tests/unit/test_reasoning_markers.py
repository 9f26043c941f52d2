"""A model's reasoning markers come from the experiment config (`model.reasoning_markers`)
or are read off its chat template, not hard-coded `<think>`/`</think>` (engine.chat.reasoning_markers, engine.reasoning):
derived from what the template writes around `reasoning_content`; used for the SFT mask's
inserted empty block, the prompt-opened check, tool calls inside reasoning, and the
answer-only rewards of GRPO / OPD / eval (through `RolloutSample.scored_text`, which writes
the model's markers as the default ones). The model here is the Qwen3 test template with
its `<think>` markers renamed (`<|begin_of_thought|>` / `<|end_of_thought|>`, the markers of
some open reasoning models), so a path that still assumed `<think>` gets these rows wrong."""

import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine import chat
from engine.domain_spec import DomainSpec
from engine.generation import Completion
from engine.chat import derive_markers, reasoning_markers
from engine.reasoning import DEFAULT_MARKERS, UNFINISHED, ReasoningMarkers, canonical_reasoning, set_reasoning_markers
from engine.tokenizer import build_tiny_tokenizer
from rewards.registry import get_verifier

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "templates"))
from families import CHATML_TAGS, FAMILIES, Family, build_family_tokenizer  # noqa: E402

OPEN, CLOSE = "<|begin_of_thought|>", "<|end_of_thought|>"
THOUGHT = ReasoningMarkers(OPEN, CLOSE)
MATH = {"answer": "7"}


def thought_tokenizer():
    """Qwen3's test template and tokenizer with the reasoning markers renamed."""
    q = FAMILIES["qwen3"]
    fam = Family("qwen3-thought", q.template, q.specials, eos=q.eos, end_of_turn=q.end_of_turn,
                 tags=[OPEN, CLOSE] + CHATML_TAGS, generation_eos=q.generation_eos, thinks=True)
    tok = build_family_tokenizer(fam)
    tok.chat_template = tok.chat_template.replace("<think>", OPEN).replace("</think>", CLOSE)
    assert "think>" not in tok.chat_template
    return tok


class LocalScorer:
    def score(self, verifier, texts, refs):
        return [get_verifier(verifier)(t, r) for t, r in zip(texts, refs)]


def test_markers_are_read_off_the_template_or_default():
    assert derive_markers(build_family_tokenizer(FAMILIES["qwen3"])) == DEFAULT_MARKERS
    tok = thought_tokenizer()
    assert derive_markers(tok) == THOUGHT and reasoning_markers(tok) == THOUGHT
    for plain in (build_tiny_tokenizer(), build_family_tokenizer(FAMILIES["chatml"]),
                  build_family_tokenizer(FAMILIES["llama3"])):  # templates without reasoning_content
        assert derive_markers(plain) is None and reasoning_markers(plain) == DEFAULT_MARKERS


def test_configured_markers_win_and_survive_pickling():
    tok = thought_tokenizer()
    set_reasoning_markers(tok, ReasoningMarkers("[[", "]]"))
    assert reasoning_markers(pickle.loads(pickle.dumps(tok))) == ReasoningMarkers("[[", "]]")
    set_reasoning_markers(tok, None)
    assert reasoning_markers(tok) == THOUGHT


def test_canonical_text_is_byte_identical_with_default_markers():
    text = "<think>a</think> b <|begin_of_thought|>"
    assert canonical_reasoning(text, None) is text and canonical_reasoning(text, DEFAULT_MARKERS) is text
    assert canonical_reasoning(f"{OPEN}x{CLOSE}y", THOUGHT) == "<think>x</think>y"


def test_sft_mask_leaves_out_the_inserted_empty_block_with_the_models_markers():
    tok = thought_tokenizer()
    r = chat.render([{"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "7"}], tok)
    text = tok.decode(r.input_ids, skip_special_tokens=False)
    assert f"{OPEN}\n\n{CLOSE}\n\n7<|im_end|>" in text
    trained = tok.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m], skip_special_tokens=False)
    assert trained == "7<|im_end|>"
    set_reasoning_markers(tok, DEFAULT_MARKERS)  # the old hard-coded markers: the block would be trained
    r = chat.render([{"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "7"}], tok)
    assert tok.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m]).startswith(OPEN)


class Scripted:
    def __init__(self, tok, texts):
        self.tok, self.texts = tok, texts

    def generate(self, prompts, sampling):
        out = []
        for _ in prompts:
            for text in self.texts[:sampling.n]:
                ids = chat.encode(self.tok, text)
                stop = text.endswith("<|im_end|>") or ids[-1] in sampling.stop_token_ids
                out.append(Completion(ids, [-0.5] * len(ids), "stop" if stop else "length"))
        return out


GROUP = [f"{OPEN}3+4 is \\boxed{{7}}{CLOSE}The answer is 8<|im_end|>",  # right draft, wrong answer
         f"{OPEN}3+4 makes 7",  # cut off inside the reasoning
         f"{OPEN}so 3+4{CLOSE}\\boxed{{7}}<|im_end|>",
         "\\boxed{7}<|im_end|>"]
WANT = [0.0, 0.0, 1.0, 1.0]


def _row():
    return {"id": "r", "domain": "d", "reference": MATH, "messages": [{"role": "user", "content": "3+4?"}]}


def test_grpo_scores_the_answer_by_the_models_markers():
    from engine.prompt_stream import PromptStream
    from experts.grpo import collect_step
    from experts.grpo_settings import GRPOSettings

    tok = thought_tokenizer()
    assert get_verifier("math")(GROUP[0], MATH).score == 1.0  # the whole text would score the draft
    settings = GRPOSettings(group_size=4, prompts_per_step=1, max_new_tokens=64, dynamic_sampling=False)
    groups, stats = collect_step(settings, PromptStream([_row()], seed=0), {"d": DomainSpec("math")},
                                 generator=Scripted(tok, GROUP), scorer=LocalScorer(), tokenizer=tok, step=0)
    assert [s.reward for s in groups[0]] == WANT
    assert stats["unfinished_reasoning_frac"] == 0.25


def test_opd_reward_term_and_eval_score_the_answer_by_the_models_markers():
    from engine.episode import roll_out
    from pipeline.evaluate import EvalSet, EvalSettings, evaluate_model
    from pipeline.stage_opd import _rollout_scores
    from pipeline.stage_workers import checked_scores

    tok = thought_tokenizer()
    samples = roll_out([_row()], "d", DomainSpec("math"), generator=Scripted(tok, GROUP), tokenizer=tok, n=4,
                       temperature=1.0, max_new_tokens=64, max_turns=1)
    assert _rollout_scores(LocalScorer(), {"d": DomainSpec("math")}, samples) == WANT
    assert samples[1].scored_text == "<think>3+4 makes 7"

    def policy(es, rows_, temperature, n):  # eval_policy's rollout (pipeline.eval_policy), scripted
        out = []
        for k, row in enumerate(rows_):
            s = roll_out([row], es.domain, DomainSpec(es.verifier), generator=Scripted(tok, [GROUP[k]]),
                         tokenizer=tok, n=n, temperature=temperature, max_new_tokens=64, max_turns=1)
            out += [x.scored_text for x in s]
        return out

    rows = [{**_row(), "id": f"r{k}"} for k in range(4)]
    entry = evaluate_model(policy, [EvalSet("d", "math", rows)], checked_scores(LocalScorer(), "eval"),
                           EvalSettings(samples=0), log=lambda _: None)
    assert entry["greedy_per_prompt"]["d"] == WANT and entry["unfinished_reasoning"]["d"] == 0.25


def test_tool_call_inside_the_models_reasoning_is_not_executed():
    from engine.domains.tool import ToolEnvironment
    from engine.episode import roll_out
    from test_chat_families import WEATHER

    tok = thought_tokenizer()
    calls = []
    env = ToolEnvironment({"get_weather": (WEATHER, lambda city: calls.append(city) or "sunny")})
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    row = {"id": "w", "domain": "tool", "messages": [{"role": "user", "content": "Weather?"}],
           "reference": {"calls": [], "answer": "sunny", "tools": [WEATHER]}}
    s = roll_out([row], "tool", DomainSpec("tool", env), generator=Scripted(tok, [f"{OPEN}maybe {call}"]),
                 tokenizer=tok, n=1, temperature=1.0, max_new_tokens=256, max_turns=2)[0]
    assert calls == [] and s.finish_reason == "stop" and s.num_model_tokens == len(chat.encode(tok, f"{OPEN}maybe {call}"))
    s = roll_out([row], "tool", DomainSpec("tool", env), generator=Scripted(tok, [f"{OPEN}ok{CLOSE}{call}"]),
                 tokenizer=tok, n=1, temperature=1.0, max_new_tokens=256, max_turns=1)[0]
    assert s.finish_reason == "max_turns"  # a call after the closed reasoning is a call


def test_prompt_opened_by_the_models_marker():
    tok = thought_tokenizer()
    tok.chat_template = tok.chat_template.replace("'<|im_start|>assistant\\n' -}}\n{%- if enable_thinking",
                                                  "'<|im_start|>assistant\\n" + OPEN + "\\n' -}}\n{%- if enable_thinking")
    if OPEN + "\\n' -}}" not in tok.chat_template:
        pytest.skip("the generation prompt line of the fixture changed")
    assert chat.row_prompt_opens_reasoning(_row(), tok)
    assert not chat.row_prompt_opens_reasoning(_row(), build_family_tokenizer(FAMILIES["qwen3"]))


def test_config_key_reaches_the_stage_tokenizer(tmp_path):
    from pipeline.config import ModelConfig
    from pipeline.graph import _dump
    from pipeline.stage_io import stage_tokenizer

    assert "reasoning_markers" not in _dump(ModelConfig())  # default: stage hashes unchanged
    with pytest.raises(ValueError, match="two different non-empty strings"):
        ModelConfig(reasoning_markers=["<r>", "<r>"])
    build_tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    cfg = SimpleNamespace(model=ModelConfig(tokenizer=str(tmp_path / "tok"), reasoning_markers=[OPEN, CLOSE]))
    assert reasoning_markers(stage_tokenizer(cfg, tmp_path)) == THOUGHT
    cfg = SimpleNamespace(model=ModelConfig(tokenizer=str(tmp_path / "tok")))
    assert reasoning_markers(stage_tokenizer(cfg, tmp_path)) == DEFAULT_MARKERS


def test_rewards_cli_markers(tmp_path):
    from rewards.__main__ import main

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"completion": t.replace("<|im_end|>", ""), "reference": MATH}) + "\n"
                           for t in GROUP))
    main(["score", "math", str(inp), "-o", str(tmp_path / "out.jsonl"), "--workers", "1", "--answer-only",
          "--reasoning-markers", OPEN, CLOSE])
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["score"] for r in out] == WANT and out[1]["info"] == {"reason": UNFINISHED}
    with pytest.raises(SystemExit):
        main(["score", "math", str(inp), "--answer-only", "--reasoning-markers", "x", "x"])
