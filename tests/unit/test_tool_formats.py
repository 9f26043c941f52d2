"""Tool calls in each family's native format (engine.tool_formats): a two-turn tool episode
per family rendered through its template with `tools=` and `tool_calls`, the model's turns
parsed back by the family's parser (picked by rendering a probe call), the context of each
turn as the template renders it (cross-turn reasoning kept or dropped as the template
does), and the episode scored by the `tool` verifier."""

import sys
from pathlib import Path

import pytest

from engine import chat
from engine.tool_formats import Call, ToolFormatError, canonical_episode, detect_tool_format, parse_calls
from rewards.registry import get_verifier

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "templates"))
from families import FAMILIES, build_family_tokenizer  # noqa: E402
from test_chat_families import WEATHER, masked_segments  # noqa: E402

TOOL_FAMILIES = ["qwen3", "chatml", "llama3", "deepseek_r1", "mistral"]
FORMAT = {"qwen3": "hermes", "chatml": "hermes", "llama3": "llama3_json", "deepseek_r1": "deepseek",
          "mistral": "mistral"}
RESULT = '{"sky": "sunny", "temp_c": 21}'


def _episode(city: str, reasoning: str | None = None):
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}
    if reasoning:
        call["reasoning_content"] = reasoning
    return [{"role": "user", "content": "Weather in Paris?"}, call, {"role": "tool", "content": RESULT},
            {"role": "assistant", "content": "It is sunny"}]


REFERENCE = {"calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}], "answer": "It is sunny",
             "tools": [WEATHER]}


@pytest.fixture(scope="module")
def toks():
    return {n: build_family_tokenizer(FAMILIES[n]) for n in TOOL_FAMILIES + ["gemma"]}


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_parser_is_picked_from_the_template(name, toks):
    assert detect_tool_format(toks[name]) == FORMAT[name]


def test_tiny_template_keeps_the_xml_format_and_gemma_has_none(toks):
    from engine.tokenizer import build_tiny_tokenizer

    tiny = build_tiny_tokenizer()
    tiny.chat_template = tiny.chat_template.replace(  # the tiny template, rendering tool_calls in XML
        "{{ message['content'] }}<|end|>{% endgeneration %}",
        "{{ message['content'] }}{%- for c in message.tool_calls or [] -%}"
        '<tool_call><invoke name="{{ c.function.name }}">'
        "{%- for k, v in c.function.arguments.items() -%}"
        '<parameter name="{{ k }}">{{ v }}</parameter>'
        "{%- endfor -%}</invoke></tool_call>{%- endfor -%}<|end|>{% endgeneration %}")
    assert detect_tool_format(tiny) == "xml"
    with pytest.raises(chat.ChatTemplateError):
        detect_tool_format(toks["gemma"])


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_two_turn_tool_episode_native_render_parse_and_score(name, toks):
    tok = toks[name]
    fmt = detect_tool_format(tok)
    verifier = get_verifier("tool")
    for city, want in (("Paris", 1.0), ("Rome", 0.5)):  # a wrong argument loses the calls half
        episode = _episode(city)
        r = chat.render(episode, tok, tools=[WEATHER])
        call_turn, answer_turn = masked_segments(tok, r)  # what the model writes, in its own format
        assert parse_calls(call_turn, fmt) == [Call("get_weather", {"city": city})]
        assert parse_calls(answer_turn, fmt) == []
        # turn 2's context is the template's rendering of the episode so far, token for token
        ctx = chat.render(episode[:3], tok, add_generation_prompt=True, tools=[WEATHER]).input_ids
        hf = tok.apply_chat_template(episode[:3], tokenize=True, add_generation_prompt=True, tools=[WEATHER])
        assert ctx == list(hf["input_ids"])
        assert r.input_ids[:len(ctx)] == ctx  # the reply continues that context
        final = tok.decode(chat.encode(tok, answer_turn), skip_special_tokens=True).strip()
        text = canonical_episode([(call_turn, RESULT), (answer_turn, None)], fmt, final_answer=final)
        got = verifier(text, REFERENCE)
        assert got.score == want, (name, text, got.info)


def test_cross_turn_reasoning_kept_or_dropped_as_the_template_does(toks):
    """Qwen3 keeps the reasoning of a tool-call turn in the context of the next turn (same
    query) and drops it once a new user query comes; DeepSeek-R1 drops it always."""
    episode = _episode("Paris", reasoning="need the weather tool")
    qwen, ds = toks["qwen3"], toks["deepseek_r1"]
    ctx = qwen.decode(chat.render(episode[:3], qwen, add_generation_prompt=True, tools=[WEATHER]).input_ids)
    assert "<think>\nneed the weather tool\n</think>" in ctx
    later = episode + [{"role": "user", "content": "And tomorrow?"}]
    assert "need the weather tool" not in qwen.decode(chat.render(later, qwen, add_generation_prompt=True,
                                                                  tools=[WEATHER]).input_ids)
    ds_episode = [dict(m) for m in episode]
    ds_episode[1] = {**ds_episode[1], "content": "<think>need the weather tool</think>"}
    assert "need the weather tool" not in ds.decode(chat.render(ds_episode[:3], ds, add_generation_prompt=True,
                                                                tools=[WEATHER]).input_ids)
    # the reasoning of the tool-call turn is trained where the template renders it (Qwen3)
    segs = masked_segments(qwen, chat.render(episode, qwen, tools=[WEATHER]))
    assert segs[0].startswith("<think>\nneed the weather tool\n</think>\n\n<tool_call>")


def test_calls_inside_reasoning_are_not_read_and_bad_markup_is_an_error():
    text = '<think><tool_call>\n{"name": "x", "arguments": {}}\n</tool_call></think>It is sunny'
    assert canonical_episode([(text, None)], "hermes") == "It is sunny"
    with pytest.raises(ToolFormatError, match="not JSON"):
        parse_calls("<tool_call>\n{name: x}\n</tool_call>", "hermes")
    with pytest.raises(ToolFormatError, match="not closed"):
        parse_calls('<tool_call>\n{"name": "x"}', "hermes")
    with pytest.raises(ValueError, match="unknown tool-call format"):
        parse_calls("", "nope")
    assert parse_calls('{"name": "a", "parameters": {"k": 1}}; {"name": "b", "parameters": {}}<|eot_id|>',
                       "llama3_json") == [Call("a", {"k": 1}), Call("b", {})]


def test_qwen3_native_calls_run_in_a_rollout_and_score(toks):
    """A multi-turn rollout of a Qwen3-format student: its Hermes JSON call stops at
    `</tool_call>`, is executed by the tool environment, the result comes back in the
    template's `<tool_response>` user turn, and the tool verifier scores the episode."""
    from engine.domain_spec import DomainSpec
    from engine.domains.tool import ToolEnvironment
    from engine.episode import roll_out, score_samples
    from engine.generation import Completion

    tok = toks["qwen3"]
    env = ToolEnvironment({"get_weather": (WEATHER, lambda city: f"sunny in {city}")})
    row = {"id": "w", "domain": "tool", "reference": {**REFERENCE, "answer": "It is sunny"},
           "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    turns = {0: call, 1: "<think>\nthe tool said sunny\n</think>\n\nIt is sunny<|im_end|>"}

    class Gen:
        contexts = []

        def generate(self, prompts, sampling):
            out = []
            for p in prompts:
                self.contexts.append(tok.decode(p, skip_special_tokens=False))
                ids = chat.encode(tok, turns[self.contexts[-1].count("<tool_response>")])
                out += [Completion(ids, [-0.1] * len(ids), "stop")] * sampling.n
            return out

    gen = Gen()
    samples = roll_out([row], "tool", DomainSpec("tool", env), generator=gen, tokenizer=tok, n=1, temperature=1.0,
                       max_new_tokens=256, max_turns=2)  # byte-level: one token per byte
    s = samples[0]
    assert s.finish_reason == "stop" and s.tool_format == "hermes"
    assert gen.contexts[1].endswith("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny in Paris\n"
                                    "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert score_samples(LocalScorer(), DomainSpec("tool", env), samples, "test") == [1.0]


class LocalScorer:
    def score(self, verifier, texts, refs):
        return [get_verifier(verifier)(t, r) for t, r in zip(texts, refs)]
