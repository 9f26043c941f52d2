"""Native tool rows (`data.tool_calls: native`, engine.tool_formats.native_tool_row): the
xLAM adapter's and the synthetic tool domain's rows carry their tools in `row["tools"]`
(rendered by the family's chat template through `tools=`) and their calls as assistant
`tool_calls` (written by the template in the family's own syntax), instead of a system
message listing the tools and calls in the project's XML. Checked against the family test
templates (tests/fixtures/templates): the prompt is the template's own rendering with
`tools=`, the trained text of the call turn parses back with the family's parser to the
row's reference calls, the tool result is not trained, and a rollout on such a row is bound
to the row's own tools and executed in the family's format. The default (`xml`) leaves
rows, and the prepare stage's input hash, as they were."""

import json
import random
import sys
from pathlib import Path

import pytest

from engine import chat
from engine.data import load_rows, row_problem
from engine.tool_formats import Call, detect_tool_format, native_tool_row, parse_calls

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "templates"))
from families import FAMILIES, build_family_tokenizer  # noqa: E402
from test_chat_families import masked_segments  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ["qwen3", "chatml", "llama3", "deepseek_r1", "mistral"]


@pytest.fixture(scope="module")
def toks():
    return {n: build_family_tokenizer(FAMILIES[n]) for n in NAMES}


@pytest.fixture(scope="module")
def xlam_rows():
    return load_rows(FIXTURES / "xlam.jsonl", adapter="xlam", domain="tool", on_bad_row="error")


def test_xlam_row_becomes_native(xlam_rows):
    xml = xlam_rows[1]
    row = native_tool_row(xml)
    assert xml["messages"][0]["role"] == "system"  # the input is not modified
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["tools"] == xml["reference"]["tools"] and row_problem(row) is None
    assert row["messages"][1]["content"] == ""
    assert row["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "convert_currency",
                                          "arguments": {"amount": 100.0, "source": "USD", "target": "EUR"}}},
        {"type": "function", "function": {"name": "random_ints", "arguments": {"count": 5, "upper": 10}}}]
    # arguments typed by the schema, as the XML verifier reads them
    assert native_tool_row(xlam_rows[2])["messages"][1]["tool_calls"][0]["function"]["arguments"] == \
        {"numbers": [3, 1, 2], "descending": True}


@pytest.mark.parametrize("name", NAMES)
def test_xlam_native_row_renders_and_parses_in_each_family(name, toks, xlam_rows):
    tok = toks[name]
    fmt = detect_tool_format(tok)
    for xml in xlam_rows:
        row = native_tool_row(xml)
        want = [Call(c["name"], c["arguments"]) for c in xml["reference"]["calls"]]
        if name == "llama3" and len(want) > 1:  # Llama 3's template: one call per turn
            with pytest.raises(Exception, match="single tool-calls"):
                chat.render_row(row, tok)
            continue
        prompt = chat.render_row_prompt(row, tok)
        hf = tok.apply_chat_template(row["messages"][:1], tokenize=True, add_generation_prompt=True,
                                     tools=row["tools"])
        assert prompt == list(hf["input_ids"])  # tools rendered by the template, not a system message
        text = tok.decode(prompt, skip_special_tokens=False)
        assert "You can call these tools" not in text
        tool_name = xml["reference"]["tools"][0]["function"]["name"]
        if name == "deepseek_r1":  # R1's template ignores tools=: with the tokenizer the listing stays
            assert tool_name not in text
            kept = native_tool_row(xml, tok)
            assert kept["messages"][0] == xml["messages"][0] and kept["messages"][-1]["tool_calls"]
            assert tool_name in tok.decode(chat.render_row_prompt(kept, tok), skip_special_tokens=False)
        else:
            assert tool_name in text
            assert native_tool_row(xml, tok) == row
        (call_turn,) = masked_segments(tok, chat.render_row(row, tok))
        assert "<invoke" not in call_turn
        assert parse_calls(call_turn, fmt) == want, (name, call_turn)


@pytest.mark.parametrize("name", NAMES)
def test_tool_domain_native_episode_trains_the_call_and_answer_not_the_result(name, toks):
    from engine.domains.tool import draw

    tok = toks[name]
    fmt = detect_tool_format(tok)
    rng = random.Random(3)
    for _ in range(20):
        _, row = draw(rng, "eval")  # eval rows always call the tool
        if row["reference"]["calls"][0]["name"] == "get_weather":
            break
    row = native_tool_row({"id": "t", "domain": "tool", **row})
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    call_turn, answer_turn = masked_segments(tok, chat.render_row(row, tok))
    ref = row["reference"]["calls"][0]
    assert parse_calls(call_turn, fmt) == [Call(ref["name"], ref["arguments"])]
    assert isinstance(parse_calls(call_turn, fmt)[0].arguments["day"], int)
    assert row["messages"][3]["content"] in answer_turn and row["messages"][2]["content"] not in call_turn + answer_turn


def test_native_xlam_row_rollout_is_bound_to_its_own_tools(toks, xlam_rows):
    """A Llama 3 rollout of a native xLAM row: the prompt (rendered with `tools=`) finds
    the row's environment (engine.row_tools), which executes the JSON call."""
    from engine.domain_spec import DomainSpec
    from engine.episode import roll_out
    from engine.generation import Completion
    from engine.row_tools import RowEnvironments

    tok = toks["llama3"]
    row = native_tool_row(xlam_rows[0])
    (call_turn,) = masked_segments(tok, chat.render_row(row, tok))

    class Gen:
        contexts = []

        def generate(self, prompts, sampling):
            self.contexts.append(tok.decode(prompts[0], skip_special_tokens=False))
            text = call_turn if len(self.contexts) == 1 else "done<|eot_id|>"
            ids = chat.encode(tok, text)
            return [Completion(ids, [0.0] * len(ids), "stop")]

    gen = Gen()
    s = roll_out([row], "tool", DomainSpec("tool", RowEnvironments([row], tok)), generator=gen, tokenizer=tok, n=1,
                 temperature=1.0, max_new_tokens=300, max_turns=2)[0]
    echo = json.dumps({"name": "get_weather", "arguments": {"city": "Berlin"}, "status": "ok"}, sort_keys=True)
    assert gen.contexts[1].endswith(f"<|start_header_id|>ipython<|end_header_id|>\n\n{echo}<|eot_id|>"
                                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert s.finish_reason == "stop" and '<parameter name="city">Berlin</parameter>' in s.text


def test_bad_native_rows_are_named():
    row = {"id": "r", "domain": "tool", "reference": {"tools": [{"type": "function", "function": {"name": "f"}}]},
           "messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": 'sure <tool_call><invoke name="f"></invoke></tool_call>'}]}
    with pytest.raises(ValueError, match=r"row 'r' messages\[1\]: .* only the calls"):
        native_tool_row(row)
    row["messages"][1]["content"] = '<tool_call><invoke name="f">'
    with pytest.raises(ValueError, match=r"row 'r' messages\[1\]: its tool calls do not parse"):
        native_tool_row(row)
    plain = {"id": "p", "domain": "math", "reference": {"answer": "4"}, "messages": [{"role": "user", "content": "2+2"}]}
    assert native_tool_row(plain) is plain
    assert "field 'tools' must be a list" in row_problem({**plain, "tools": "f"})


def test_default_is_xml_and_leaves_the_prepare_hash_alone():
    from pipeline.config import DataConfig
    from pipeline.graph import _dump

    d = DataConfig(synthetic={"generator": "tool"})
    assert d.tool_calls == "xml" and "tool_calls" not in _dump(d)
    assert _dump(DataConfig(synthetic={"generator": "tool"}, tool_calls="native"))["tool_calls"] == "native"
    with pytest.raises(ValueError):
        DataConfig(synthetic={"generator": "tool"}, tool_calls="json")


def test_native_rows_need_a_template_that_renders_tool_calls(toks, xlam_rows):
    from engine.tokenizer import build_tiny_tokenizer
    from engine.tool_formats import native_tool_rows

    with pytest.raises(ValueError, match="domain 'fc': data.tool_calls: native needs a chat template"):
        native_tool_rows(xlam_rows, build_tiny_tokenizer(), "domain 'fc'")  # its template writes no tool_calls
    assert native_tool_rows(xlam_rows, toks["qwen3"], "x") == [native_tool_row(r) for r in xlam_rows]
