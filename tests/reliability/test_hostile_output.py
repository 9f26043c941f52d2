"""Hostile model output reaching every verifier and the tool environment: XML and JSON
bombs (deep nesting, billion-laughs entities), 10 MB strings, control characters, NUL
bytes, lone surrogates. Each is contained: a score in [0, 1] (0 with a reason when it
fails), never an exception out of the batch, in bounded time.

Verifiers are driven through `rewards.score_batch`, the path RL and eval use (worker
processes, a per-item timeout). `ToolEnvironment.execute` runs inside the rollout
process itself, with no worker or timeout around it, so it is called directly and must
return a bounded string quickly on its own. Hostile *programs* for the code sandbox are
in test_code_sandbox.py.
"""

from __future__ import annotations

import time

import pytest

from engine.domains import get_domain
from engine.domains.tool import MAX_OUTPUT_CHARS, ToolEnvironment
from rewards import score_batch

ITEM_TIMEOUT_S = 6.0
CALL = '<tool_call><invoke name="add"><parameter name="a">{a}</parameter><parameter name="b">2</parameter></invoke></tool_call>'
UNCLOSED = '<tool_call><invoke name="add"><parameter name="a">'
LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
          + ']><lolz>&lol9;</lolz>')

HOSTILE = {
    "xml_deep_nesting": "<tool_call>" + "<invoke>" * 50_000 + "</invoke>" * 50_000 + "</tool_call>",
    "xml_billion_laughs": f'<tool_call><invoke name="add"><parameter name="a">{LAUGHS}</parameter>'
                          '<parameter name="b">1</parameter></invoke></tool_call>',
    "json_deep_nesting": "\\boxed{" + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}",
    "boxed_deep_nesting": "\\boxed{" * 20_000 + "4" + "}" * 20_000,
    "latex_frac_tower": "\\boxed{" + "\\frac{1}{" * 2_000 + "2" + "}" * 2_000 + "}",
    "huge_integer_argument": CALL.format(a="9" * 100_000),
    "ten_mb_string": "x" * 10_000_000,
    "ten_mb_of_tool_calls": CALL.format(a=1) * 80_000,
    "unclosed_tags": UNCLOSED * 20_000,
    "control_characters": "".join(map(chr, range(32))) * 200 + "\x7f\x1b[2J\x1b]0;pwned\x07 \\boxed{4}",
    "nul_bytes": "\x00" * 1000 + "\\boxed{4}\x00" + CALL.format(a="1\x002"),
    "lone_surrogates": "\ud800 \udfff \udc80\\boxed{\ud83d}" + CALL.format(a="\udcff"),
}


def _references() -> dict[str, dict]:
    tool_row = get_domain("tool").generate("train", 1, seed=0)[0]
    return {
        "math": {"answer": "4"},
        "code": {"tests": ["assert f(2) == 4"]},
        "ifeval": {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
                   "kwargs": [{}, {"num_words": 5, "relation": "less than"}]},
        "tool": tool_row["reference"],
        "format": {},
    }


@pytest.mark.slow
def test_every_verifier_contains_hostile_output(fault_log):
    refs = _references()
    timed_out = []
    for verifier, ref in refs.items():
        names = sorted(HOSTILE)
        t0 = time.monotonic()
        results = score_batch(verifier, [HOSTILE[n] for n in names], [ref] * len(names), num_workers=2,
                              timeout_s=ITEM_TIMEOUT_S)
        seconds = time.monotonic() - t0
        assert len(results) == len(names)
        for name, r in zip(names, results):
            assert 0.0 <= r.score <= 1.0, (verifier, name, r)
            if r.score == 0.0 and verifier != "format":
                assert r.info.get("reason"), (verifier, name, r.info)
            if str(r.info.get("reason", "")).startswith("timeout"):
                timed_out.append(f"{verifier}/{name}")
            fault_log(f"{verifier} verifier: {name}", "contained")
        # each item bounded by the pool's timeout; with 2 workers the batch cannot take longer
        assert seconds < ITEM_TIMEOUT_S * len(names) / 2 + 30, (verifier, seconds)
    if timed_out:
        print(f"note: contained only by the per-item timeout ({ITEM_TIMEOUT_S:g}s): {timed_out}")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_tool_environment_returns_a_bounded_error_quickly(name, fault_log):
    env = ToolEnvironment()
    t0 = time.monotonic()
    out = env.execute(HOSTILE[name])
    seconds = time.monotonic() - t0
    assert isinstance(out, str) and len(out) <= MAX_OUTPUT_CHARS, out[:300]
    assert out.startswith("error:") or name in ("nul_bytes", "lone_surrogates", "control_characters"), out
    assert seconds < 5.0, f"{name}: execute took {seconds:.1f}s inside the rollout process"
    fault_log(f"tool environment: {name}", "contained")


@pytest.mark.parametrize("text", [UNCLOSED * 20000, "<tool_response>" * 50000 + CALL.format(a=1),
                                  "<tool_call>" + CALL.format(a=1)[11:-12] * 20000 + "</tool_call>"],
                         ids=["unclosed_tool_call", "unclosed_tool_response", "20k_invokes_one_block"])
def test_tool_environment_unclosed_tags_in_bounded_time(text, fault_log):
    """Was quadratic (`<tool_call>(.*?)</tool_call>` findall: 221 s for the first); the
    `str.find` scanner of rewards/tool_calls.py is linear."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom engine.domains.tool import ToolEnvironment\n"
            "text = sys.stdin.read()\nt0 = time.monotonic()\nout = ToolEnvironment().execute(text)\n"
            "print(f'{time.monotonic() - t0:.3f}', out[:80])")
    try:  # a subprocess, so that a hang is cut off instead of running on beside the other tests
        out = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ToolEnvironment.execute ran > 60 s on {len(text)} characters of tool-call tags")
    assert out.returncode == 0, out.stderr[-500:]
    seconds, result = out.stdout.split(" ", 1)
    assert float(seconds) < 5.0, out.stdout  # measured 0.00-0.2 s (the regex took 221 s on the first)
    assert result.startswith(("error:", "3")), out.stdout  # the second holds one valid call: add(1, 2) = 3
    fault_log(f"tool environment: {len(text) // 1000}k chars of unclosed/many tool tags", "contained")


@pytest.mark.parametrize("name,reason", [("json_deep_nesting", "extracted answer too long (300001 chars)"),
                                         ("latex_frac_tower", "extracted answer too long (20001 chars)")])
def test_math_verifier_refuses_huge_answers_before_sympy(name, reason, fault_log):
    """These ran past the 6 s per-item timeout inside math-verify/sympy (README Findings 10)."""
    from rewards.math_reward import math_verifier

    t0 = time.monotonic()
    r = math_verifier(HOSTILE[name], {"answer": "4"})
    assert r.score == 0.0 and r.info["reason"].startswith(reason), r.info
    assert time.monotonic() - t0 < 1.0
    fault_log(f"math verifier: {name} refused before sympy", "contained")


def test_math_verifier_still_scores_long_and_nested_right_answers():
    from rewards.math_reward import math_verifier

    gold = "(" * 55 + "1" + ")" * 55  # deeper than MAX_ANSWER_DEPTH=50, but so is the reference
    assert math_verifier(f"\\boxed{{{gold}}}", {"answer": gold}).score == 1.0
    assert math_verifier("\\boxed{" + "(" * 51 + "1" + ")" * 51 + "}", {"answer": "1"}).info["reason"] \
        == "extracted answer nested too deeply (depth 51)"
    words = "the capital of the country to the north " * 10  # 400 chars of words: compared as text
    assert math_verifier(f"\\boxed{{{words}}}", {"answer": words}).score == 1.0
