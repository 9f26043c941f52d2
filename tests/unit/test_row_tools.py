"""Tool environments of real tool rows (xLAM): calls checked against the row's own tool
schemas, answered from the row (recorded result, else a deterministic echo), and bound
to each episode by its prompt in a multi-turn rollout."""

import json
from pathlib import Path

import pytest

from engine.chat import render_prompt
from engine.data import load_rows
from engine.generation import SamplingParams
from engine.row_tools import RowEnvironments, row_environment
from engine.rollout import rollout
from engine.tokenizer import build_tiny_tokenizer
from tests.integration.test_rollout import ScriptedGenerator

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def rows():
    return load_rows(FIXTURES / "xlam.jsonl", adapter="xlam", on_bad_row="error")


def test_calls_are_checked_against_the_rows_schema_and_answered(rows):
    env = row_environment(rows[0]["reference"])  # get_weather(city: string, required)
    ok = env.execute('<tool_call><invoke name="get_weather"><parameter name="city">Oslo</parameter></invoke></tool_call>')
    assert json.loads(ok) == {"name": "get_weather", "arguments": {"city": "Oslo"}, "status": "ok"}
    assert "unknown tool" in env.execute('<tool_call><invoke name="rm"></invoke></tool_call>')
    bad = env.execute('<tool_call><invoke name="get_weather"><parameter name="town">Oslo</parameter>'
                      '</invoke></tool_call>')
    assert bad.startswith("error:") and "town" in bad
    recorded = row_environment({**rows[0]["reference"], "results": ["12 C, rain"]})
    call = rows[0]["messages"][-1]["content"]  # the demonstration: the recorded call itself
    assert recorded.execute(call) == "12 C, rain"
    assert row_environment({"calls": []}) is None


def test_rollout_binds_each_episode_to_its_rows_tools(rows):
    tok = build_tiny_tokenizer()
    prompts = [render_prompt(r["messages"], tok) for r in rows[:2]]
    calls = [r["messages"][-1]["content"] for r in rows[:2]]
    gen = ScriptedGenerator(tok, {tuple(p): [c, "done<|end|>"] for p, c in zip(prompts, calls)})
    sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=400,
                              stop_token_ids=[tok.convert_tokens_to_ids("</tool_call>")])
    trajs = rollout(gen, prompts, sampling, tokenizer=tok, environment=RowEnvironments(rows, tok), max_turns=2)
    for t, r in zip(trajs, rows[:2]):
        assert t.num_turns == 2 and t.finish_reason == "stop"
        first = r["reference"]["calls"][0]
        assert json.dumps({"name": first["name"], "arguments": first["arguments"], "status": "ok"},
                          sort_keys=True) in t.text
    assert "get_weather" in trajs[0].text and "get_weather" not in trajs[1].text
    with pytest.raises(KeyError, match="no row"):
        RowEnvironments(rows, tok).bind([1, 2, 3])
