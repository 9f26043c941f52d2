"""The format and tool verifiers and the tool-call parser, on hand-worked cases."""

import pytest

from rewards import get_verifier, parse_tool_calls
from rewards.tool_calls import ToolCall, ToolCallParseError, final_answer

WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city"],
    },
}


def call(name, **args):
    params = "".join(f'<parameter name="{k}">{v}</parameter>' for k, v in args.items())
    return f'<tool_call><invoke name="{name}">{params}</invoke></tool_call>'


@pytest.mark.parametrize(
    "text, score",
    [
        ("<think>2+2=4</think>The answer is 4.", 1.0),
        ("  <think>x</think>\n<answer>4</answer>\n", 1.0),
        ("<think>x</think>", 0.0),  # empty answer
        ("4 <think>x</think> 4", 0.0),  # text before think
        ("<think>a</think><think>b</think>4", 0.0),
        ("</think>4<think>", 0.0),
        ("<think>x</think><answer>4</answer> trailing", 0.0),
        ("<think>x</think><answer> </answer>", 0.0),
        ("just 4", 0.0),  # think required by default
    ],
)
def test_format_verifier(text, score):
    res = get_verifier("format")(text, {})
    assert res.score == score, res.info


def test_format_options():
    fmt = get_verifier("format")
    assert fmt("just 4", {}, require_think=False).score == 1.0
    assert fmt("<think>x</think>4", {}, require_answer_tags=True).score == 0.0


def test_parse_several_invokes_and_value_types():
    text = ('hi <tool_call><invoke name="a"><parameter name="x">3</parameter><parameter name="s">hello world</parameter>'
            '</invoke>\n<invoke name="b"><parameter name="l">[1, "2"]</parameter></invoke></tool_call> bye')
    assert parse_tool_calls(text) == [ToolCall("a", {"x": 3, "s": "hello world"}), ToolCall("b", {"l": [1, "2"]})]


def test_schema_types_decide_decoding():
    # "42" is a string when the schema says so, an int otherwise.
    assert parse_tool_calls(call("get_weather", city="42"), [WEATHER])[0].arguments == {"city": "42"}
    assert parse_tool_calls(call("get_weather", city="42"))[0].arguments == {"city": 42}


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call><invoke name=\"a\"></invoke>",  # unclosed block
        "<tool_call>junk<invoke name=\"a\"></invoke></tool_call>",
        "<tool_call></tool_call>",
        '<tool_call><invoke name="a"><parameter name="x">1</parameter><parameter name="x">2</parameter></invoke></tool_call>',
        '<tool_call><invoke name="a"><parameter name="x">1</invoke></tool_call>',
    ],
)
def test_malformed_markup_raises_parse_error_and_scores_zero(text):
    with pytest.raises(ToolCallParseError):
        parse_tool_calls(text)
    res = get_verifier("tool")(text, {"calls": [{"name": "a", "arguments": {}}]})
    assert res.score == 0.0 and "malformed" in res.info["reason"]


def test_tool_call_exact_and_one_wrong_argument():
    ref = {"calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}], "tools": [WEATHER]}
    tool = get_verifier("tool")
    assert tool(call("get_weather", city="Paris", days=3), ref).score == 1.0
    # one of two arguments wrong: that call earns 1/2
    res = tool(call("get_weather", city="Paris", days=4), ref)
    assert res.score == 0.5 and "arguments differ" in res.info["reason"]


def test_tool_schema_violations_score_the_call_zero():
    ref = {"calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}], "tools": [WEATHER]}
    tool = get_verifier("tool")
    assert tool(call("get_weather", city="Paris", days='"three"'), ref).score == 0.0  # days must be an integer
    assert tool(call("get_weather", days=3), ref).score == 0.0  # city is required
    assert tool(call("get_weather", city="Paris", unit="K"), ref).score == 0.0  # not in enum
    assert "missing required" in tool(call("get_weather", days=3), ref).info["reason"]


def test_tool_missing_and_extra_calls_cost():
    ref = {"calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]}
    tool = get_verifier("tool")
    assert tool(call("a"), ref).score == 0.5  # 1 of 2 expected
    assert tool(call("a") + call("b") + call("c") + call("d"), ref).score == 0.5  # 2 right / 4 made


def test_episode_scores_calls_and_final_answer():
    ref = {"calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}], "answer": "5"}
    episode = ("Let me add. " + call("add", a=2, b=3) + "<tool_response>5</tool_response>The sum is 5.")
    tool = get_verifier("tool")
    assert final_answer(episode) == "The sum is 5."
    assert tool(episode, ref).score == 1.0
    # right calls, wrong final answer: 0.5 * 1 + 0.5 * 0
    wrong = episode.replace("The sum is 5.", "The sum is 6.")
    assert tool(wrong, ref).score == 0.5
    # a call hidden in the tool response is not the model's call
    fake = "<tool_response>" + call("add", a=2, b=3) + "</tool_response>5"
    assert tool(fake, ref).score == 0.5
