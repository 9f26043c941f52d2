"""Registry behaviour and the math verifier, on hand-worked cases."""

import subprocess
import sys

import pytest

from rewards import RewardResult, get_verifier, known_verifiers
from rewards.math_reward import extract_answer
from rewards.registry import register


def test_known_verifiers_and_miss_lists_names():
    assert {"math", "code", "ifeval", "tool", "format"} <= set(known_verifiers())
    with pytest.raises(KeyError, match="unknown verifier .*; known: .*math"):
        get_verifier("maths")


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register("math")(lambda c, r: RewardResult(0.0))


def test_reward_result_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RewardResult(1.5)
    with pytest.raises(ValueError):
        RewardResult(float("nan"))


def test_import_is_cheap():
    code = "import rewards, sys; rewards.RewardResult; print('torch' in sys.modules, 'math_verify' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize(
    "text, answer, rule",
    [
        (r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}", "boxed"),  # the LAST boxed wins
        (r"\boxed{\{1, {2}\}}", r"\{1, {2}\}", "boxed"),  # nested braces are matched
        ("so the answer is 42.", "42", "answer_is"),
        ("Final answer: $x+1$", "x+1", "answer_is"),
        ("we count 3 cats and 1,250 dogs", "1250", "last_number"),
        ("no digits here", None, "none"),
    ],
)
def test_extract_answer(text, answer, rule):
    assert extract_answer(text) == (answer, rule)


@pytest.mark.parametrize(
    "completion, gold, score",
    [
        (r"\boxed{0.50}", "1/2", 1.0),  # 0.50 == 1/2
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{\{2, 1\}}", r"\{1, 2\}", 1.0),  # sets ignore order
        (r"\boxed{x(x+2)}", "x^2+2x", 1.0),  # expressions compared symbolically
        (r"2x = 1 so x = 1/2, hence \boxed{2}", "1/2", 0.0),  # right value in the wrong place
        ("The answer is 7", "8", 0.0),
        ("The answer is Paris.", "Paris", 1.0),
        ("I do not know", "3", 0.0),
    ],
)
def test_math_verifier(completion, gold, score):
    res = get_verifier("math")(completion, {"answer": gold})
    assert res.score == score, res.info
    if score == 0.0:
        assert res.info["reason"]


def test_math_bad_reference_is_clear():
    with pytest.raises(ValueError, match="'answer'"):
        get_verifier("math")("1", {"solution": "1"})


def test_math_works_off_the_main_thread():
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", get_verifier("math")(r"\boxed{0.25}", {"answer": "1/4"})))
    t.start()
    t.join()
    assert out["r"].score == 1.0


def test_integer_and_identical_string_fast_paths_agree_with_math_verify():
    from rewards.math_reward import _parse, answers_match

    from math_verify import verify

    for gold, ans in (("42", "42"), ("42", "042"), ("-7", "-7"), ("+5", "5"), ("12", "21"), ("0", "-0"),
                      ("\\frac{1}{2}", "\\frac{1}{2}"), ("x+1", "x+1")):
        got, how = answers_match(gold, ans)
        assert how in ("integer", "string")
        gp, ap = _parse(gold), _parse(ans)
        assert got == bool(verify(gp, ap)), (gold, ans)


def test_boxed_extraction_matches_a_forward_brace_scan():
    """`extract_boxed` pairs all braces in one pass; it agrees with the former scan forward
    from each `\\boxed{` (quadratic on many unclosed ones) on 20k random strings."""
    import random
    import re

    from rewards.math_reward import extract_boxed

    def forward_scan(text):
        for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
            depth = 0
            for i in range(m.end() - 1, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[m.end():i].strip()
        return None

    rng = random.Random(0)
    pieces = ["{", "}", "\\boxed{", "\\fbox {", "\\boxed", "1", " ", "x"]
    for _ in range(20_000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 16)))
        assert extract_boxed(s) == forward_scan(s), repr(s)
