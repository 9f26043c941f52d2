"""Every verifier runs in time linear in its input: adversarial text of 200k characters
costs at most 4x what linear growth from 25k predicts, half the 64x of a quadratic
pass (math's brace matching on 30k unclosed `\\boxed{`, ifeval's postscript regex on
spaces, its title / bullet / placeholder regexes: up to 85 s at 20k characters before).

The times are measured in a subprocess with a wall-clock cap, since a regex inside `re`
cannot be interrupted: a quadratic verifier fails by the cap instead of hanging the run.
Each case is timed at n = 25k and 8n = 200k characters (best of several runs) and must
satisfy t(8n) <= 32 t(n) + 0.1 s (linear: 8x, measured 2-35x on these, the high ones
milliseconds; quadratic: 64x).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL, FACTOR = 25_000, 8

# Each case: verifier, reference, completion of n characters (a Python expression in n).
_PS = {"instruction_id_list": ["detectable_content:postscript"], "kwargs": [{"postscript_marker": "P.S."}]}
_PPS = {"instruction_id_list": ["detectable_content:postscript"], "kwargs": [{"postscript_marker": "P.P.S"}]}


def _ifeval(instruction: str, **kwargs) -> dict:
    return {"instruction_id_list": [instruction], "kwargs": [kwargs]}


CASES = {
    "math/unclosed_boxed": ("math", {"answer": "4"}, '"\\\\boxed{" * (n // 7)'),
    "math/open_braces": ("math", {"answer": "4"}, '"\\\\boxed{" + "{" * n'),
    "math/spaces_after_answer_is": ("math", {"answer": "4"}, '"the answer is" + " " * n + "x"'),
    "math/numbers_and_slashes": ("math", {"answer": "4"}, '"1 / " * (n // 4)'),
    "ifeval/postscript_spaces": ("ifeval", _PS, '" " * n + "x"'),
    "ifeval/pps_spaces": ("ifeval", _PPS, '" " * n + "x"'),
    "ifeval/title_unclosed": ("ifeval", _ifeval("detectable_format:title"), '"<" * n'),
    "ifeval/bullets_blank_lines": ("ifeval", _ifeval("detectable_format:number_bullet_lists", num_bullets=2),
                                   '"\\n" * n + "x"'),
    "ifeval/bullets_space_lines": ("ifeval", _ifeval("detectable_format:number_bullet_lists", num_bullets=2),
                                   '" \\n" * (n // 2) + "x"'),
    "ifeval/placeholders_unclosed": ("ifeval", _ifeval("detectable_content:number_placeholders", num_placeholders=2),
                                     '"[" * n'),
    "ifeval/highlights": ("ifeval", _ifeval("detectable_format:number_highlighted_sections", num_highlights=2),
                          '"*a" * (n // 2)'),
    "ifeval/sentences": ("ifeval", _ifeval("length_constraints:number_sentences", num_sentences=2,
                                           relation="at least"), '"a. " * (n // 3)'),
    "ifeval/sections": ("ifeval", _ifeval("detectable_format:multiple_sections", section_spliter="Section",
                                          num_sections=2), '"Section " * (n // 8)'),
    "ifeval/json_open_brackets": ("ifeval", _ifeval("detectable_format:json_format"), '"[" * n'),
    "ifeval/capital_words": ("ifeval", _ifeval("change_case:capital_word_frequency", capital_frequency=2,
                                               capital_relation="at least"), '"A-" * (n // 2)'),
    "ifeval/two_responses": ("ifeval", _ifeval("combination:two_responses"), '"*" * n'),
    "ifeval/paragraphs": ("ifeval", _ifeval("length_constraints:nth_paragraph_first_word", num_paragraphs=2,
                                            nth_paragraph=1, first_word="a"), '"\\n" * n + "a"'),
    "format/answer_spaces": ("format", {}, '"<think>x</think><answer>" + " " * n'),
    "format/many_closers": ("format", {}, '"<think>x</think><answer>" + "</answer> " * (n // 10) + "x"'),
    "tool/unclosed_invokes": ("tool", {"calls": [{"name": "a"}]},
                              '"<tool_call>" + \'<invoke name="a">\' * (n // 17) + "</tool_call>"'),
    "tool/unclosed_parameters": ("tool", {"calls": [{"name": "a"}]},
                                 '\'<tool_call><invoke name="a">\' + \'<parameter name="x">\' * (n // 20) + "</invoke></tool_call>"'),
    "tool/deep_parameter": ("tool", {"calls": [{"name": "a"}]},
                            '\'<tool_call><invoke name="a"><parameter name="x">\' + "[" * n + "</parameter></invoke></tool_call>"'),
    "tool/unclosed_string_parameter": ("tool", {"calls": [{"name": "a"}]},
                                       '\'<tool_call><invoke name="a"><parameter name="x">\' + \'"\\\\"[\' * (n // 3) + "</parameter></invoke></tool_call>"'),
}

_CHILD = r"""
import json, sys, time
from rewards.registry import get_verifier
cases, small, factor = json.loads(sys.stdin.read())
get_verifier("math")(r"\boxed{1/2}", {"answer": "0.5"})  # imports math-verify outside the timings
out = {}
for name, (verifier, reference, expr) in cases.items():
    fn, times = get_verifier(verifier), []
    for n, repeats in ((small, 5), (small * factor, 2)):
        text = eval(expr, {"n": n})
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(text, reference)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    out[name] = times
    print(name, times, file=sys.stderr, flush=True)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_verifier_is_linear_on_adversarial_input(fault_log):
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([CASES, SMALL, FACTOR]), cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        done = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"the verifiers took > 240 s on {SMALL * FACTOR} characters; finished: {done}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    times = json.loads(proc.stdout)
    slow = {name: (round(t, 4), round(t8, 4)) for name, (t, t8) in times.items() if t8 > 4 * FACTOR * t + 0.1}
    assert not slow, f"super-linear growth from {SMALL} to {SMALL * FACTOR} characters: {slow}"
    for name, (_, t8) in times.items():
        fault_log(f"{name}: {SMALL * FACTOR // 1000}k adversarial characters in {t8:.2f}s", "contained")
