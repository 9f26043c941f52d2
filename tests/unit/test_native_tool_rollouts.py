"""Multi-turn rollouts execute the native tool calls of the families whose call is the whole
assistant turn, ended by the end-of-turn token (engine.tool_formats.TURN_END_FORMATS):
Llama 3 JSON (`<|eot_id|>`), DeepSeek's tool-call tokens (`<｜end▁of▁sentence｜>`) and
Mistral's `[TOOL_CALLS]` (`</s>`), through `engine.episode.roll_out` with the family test
templates (tests/fixtures/templates) and their offline tokenizers.

The policy is scripted: no model here can write a family's call, so each turn the
"generator" writes the text the family's template trains on for that turn (the trained
segments of `chat.render` of the whole episode), which is what an SFT'd student of that
family writes. Everything else is the real code: the turn's stop, the parser, the
environment executing the call, the template's rendering of the tool result after the
call turn, the loss mask and the `tool` verifier's score."""

import sys
from pathlib import Path

import pytest

from engine import chat
from engine.domain_spec import DomainSpec
from engine.domains.tool import ToolEnvironment
from engine.episode import roll_out, score_samples
from engine.generation import Completion
from rewards.registry import get_verifier

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "templates"))
from families import FAMILIES, build_family_tokenizer  # noqa: E402
from test_chat_families import WEATHER, masked_segments  # noqa: E402

NATIVE = ["llama3", "deepseek_r1", "mistral"]
REASONING = "I need the weather tool\n</think>\n\n"  # R1's generation prompt opened the block


def _episode(city: str, result: str) -> list[dict]:
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}
    return [{"role": "user", "content": "Weather in Paris?"}, call, {"role": "tool", "content": result},
            {"role": "assistant", "content": "It is sunny"}]


class Scripted:
    """Writes `turns[k]` on its k-th call (one episode); records each context it is given."""

    def __init__(self, tok, turns: list[str]):
        self.tok, self.turns, self.contexts = tok, turns, []

    def generate(self, prompts, sampling):
        assert len(prompts) == 1 and not sampling.stop_token_ids  # the call ends at the end of turn
        self.contexts.append(list(prompts[0]))
        ids = chat.encode(self.tok, self.turns[len(self.contexts) - 1])
        return [Completion(ids, [-0.5] * len(ids), "stop")] * sampling.n


class Recording(ToolEnvironment):
    def __init__(self):
        self.calls = []
        super().__init__({"get_weather": (WEATHER, lambda city: self.calls.append(city) or f"sunny in {city}")})


@pytest.fixture(scope="module")
def toks():
    return {n: build_family_tokenizer(FAMILIES[n]) for n in NATIVE}


def _row(city="Paris"):
    return {"id": "w", "domain": "tool", "tools": [WEATHER], "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "reference": {"calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}], "answer": "It is sunny",
                          "tools": [WEATHER]}}


def _script(name, tok, city):
    """The family's own trained text for the call turn and the answer turn."""
    call_turn, answer_turn = masked_segments(tok, chat.render(_episode(city, f"sunny in {city}"), tok,
                                                              tools=[WEATHER]))
    return [(REASONING if name == "deepseek_r1" else "") + call_turn, answer_turn]


def _run(name, tok, turns, max_turns=3):
    env, gen = Recording(), Scripted(tok, turns)
    samples = roll_out([_row()], "tool", DomainSpec("tool", env), generator=gen, tokenizer=tok, n=1, temperature=1.0,
                       max_new_tokens=400, max_turns=max_turns)
    return samples[0], env, gen


class LocalScorer:
    def score(self, verifier, texts, refs):
        return [get_verifier(verifier)(t, r) for t, r in zip(texts, refs)]


@pytest.mark.parametrize("name", NATIVE)
def test_native_call_is_executed_its_result_rendered_by_the_template_and_masked(name, toks):
    tok = toks[name]
    turns = _script(name, tok, "Paris")
    s, env, gen = _run(name, tok, turns)
    assert s.finish_reason == "stop" and s.tool_format == FAMILIES[name].tool_format
    assert env.calls == ["Paris"]  # the call was parsed from the native markup and executed once
    assert len(gen.contexts) == 2
    # the second turn's context: the template's rendering of the episode so far
    hf = tok.apply_chat_template(_episode("Paris", "sunny in Paris")[:3], tokenize=False,
                                 add_generation_prompt=True, tools=[WEATHER])
    ctx = tok.decode(gen.contexts[1], skip_special_tokens=False)
    if name == "deepseek_r1":  # the template drops the turn's reasoning from history; the rollout keeps its tokens
        assert ctx.replace("<think>\n" + REASONING, "") == hf
        assert ctx.endswith("<｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
                            "sunny in Paris<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    else:
        assert ctx == hf
    # loss mask: exactly the two generated turns (end-of-turn tokens included), never the tool result
    p = len(gen.contexts[0])
    response = s.input_ids[p:]
    mask = s.loss_mask[p:]
    trained = masked_segments(tok, chat.Rendered(response, mask))
    assert trained == turns
    untrained = tok.decode([t for t, m in zip(response, mask) if not m], skip_special_tokens=False)
    assert "sunny in Paris" in untrained and untrained == tok.decode(gen.contexts[1][p + len(chat.encode(tok, turns[0])):],
                                                                      skip_special_tokens=False)
    assert s.loss_mask[:p] == [0] * p
    if name != "deepseek_r1":  # whole episode == the template's SFT rendering, mask included
        full = chat.render(_episode("Paris", "sunny in Paris"), tok, tools=[WEATHER])
        assert s.input_ids == full.input_ids and s.loss_mask == full.loss_mask
    # the verifier reads the call in its XML form and the final answer
    assert '<invoke name="get_weather"><parameter name="city">Paris</parameter></invoke>' in s.text
    assert score_samples(LocalScorer(), DomainSpec("tool", env), [s], "test") == [1.0]


@pytest.mark.parametrize("name", NATIVE)
def test_wrong_argument_is_executed_and_scored_half(name, toks):
    tok = toks[name]
    s, env, _ = _run(name, tok, _script(name, tok, "Rome"))
    assert env.calls == ["Rome"]
    assert score_samples(LocalScorer(), DomainSpec("tool", Recording()), [s], "test") == [0.5]


@pytest.mark.parametrize("name", NATIVE)
def test_plain_answer_ends_the_episode_and_last_turn_call_is_left_unanswered(name, toks):
    tok = toks[name]
    turns = _script(name, tok, "Paris")
    s, env, gen = _run(name, tok, [("\n</think>\n\n" if name == "deepseek_r1" else "") + turns[1]])
    assert (s.finish_reason, env.calls, len(gen.contexts)) == ("stop", [], 1)
    s, env, gen = _run(name, tok, turns, max_turns=1)
    assert (s.finish_reason, env.calls, len(gen.contexts)) == ("max_turns", [], 1)


@pytest.mark.parametrize("name", NATIVE)
def test_malformed_call_gets_an_error_result(name, toks):
    tok = toks[name]
    call, answer = _script(name, tok, "Paris")
    bad = call.replace('"city"', "city", 1)  # not JSON any more
    assert bad != call
    s, env, gen = _run(name, tok, [bad, answer])
    assert env.calls == [] and len(gen.contexts) == 2
    assert "error: malformed tool call" in tok.decode(gen.contexts[1], skip_special_tokens=False)


def test_deepseek_call_inside_unfinished_reasoning_is_not_executed(toks):
    tok = toks["deepseek_r1"]
    call, _ = _script("deepseek_r1", tok, "Paris")
    inside = "still thinking " + call.replace(REASONING, "")  # the block the prompt opened never closes
    s, env, gen = _run("deepseek_r1", tok, [inside, "It is sunny<｜end▁of▁sentence｜>"])
    assert (s.finish_reason, env.calls, len(gen.contexts)) == ("stop", [], 1)
    assert score_samples(LocalScorer(), DomainSpec("tool", env), [s], "test") == [0.0]


def test_hermes_families_keep_the_tool_call_stop(toks):
    """Qwen3 / ChatML calls still end at `</tool_call>` (a stop id), as before."""
    from engine.tool_formats import TURN_END_FORMATS, tool_format_of

    qwen = build_family_tokenizer(FAMILIES["qwen3"])
    assert tool_format_of(qwen) == "hermes" and "hermes" not in TURN_END_FORMATS
    assert {tool_format_of(toks[n]) for n in NATIVE} == set(TURN_END_FORMATS)


@pytest.mark.parametrize("mode", ["non-think", "think-high"])
def test_tool_result_is_rendered_in_the_rows_mode(mode):
    """Qwen3 in non-think mode: the generation prompt after the tool result closes an empty
    think block, as `apply_chat_template(..., enable_thinking=False)` writes it; in a
    thinking mode it does not."""
    from engine.modes import mode_template_kwargs

    tok = build_family_tokenizer(FAMILIES["qwen3"])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

    class Gen:
        contexts = []

        def generate(self, prompts, sampling):
            self.contexts.append(list(prompts[0]))
            text = call if len(self.contexts) == 1 else "It is sunny<|im_end|>"
            ids = chat.encode(tok, text)
            return [Completion(ids, [0.0] * len(ids), "stop")]

    gen = Gen()
    row = {**_row(), "mode": mode}
    roll_out([row], "tool", DomainSpec("tool", Recording()), generator=gen, tokenizer=tok, n=1, temperature=1.0,
             max_new_tokens=300, max_turns=2)
    episode = _episode("Paris", "sunny in Paris")[:3]
    episode[1] = {**episode[1], "content": ""}
    hf = tok.apply_chat_template(episode, tokenize=False, add_generation_prompt=True, tools=[WEATHER],
                                 **mode_template_kwargs(mode))
    ctx = tok.decode(gen.contexts[1], skip_special_tokens=False)
    # after the call: the tool result and the mode's generation prompt, as the template writes them
    assert ctx.endswith(hf[hf.rindex("</tool_call>"):])
    assert hf.endswith("<think>\n\n</think>\n\n") == (mode == "non-think")
    if mode != "non-think":  # the whole context too (non-think: the template re-renders the call turn
        assert ctx == hf     # without the empty block its prompt had; the rollout keeps the tokens it sampled on)
