"""The `math_chain` domain (reasoning modes): correct traces and answers, held-out eval
problems, one demonstration per mode (direct for non-think, the trace in <think> for
think-high, the chain worked in columns for think-max), each scored 1 by the verifier."""

import re

import pytest

from engine.domains import get_domain, split_of
from engine.domains.math import apply
from engine.domains.math_chain import column_step, demonstrations
from engine.modes import ModeSettings, expand_modes
from rewards import score_batch

MODES = {"non-think": ModeSettings(max_new_tokens=16), "think-high": ModeSettings(max_new_tokens=48),
         "think-max": ModeSettings(max_new_tokens=96)}


def test_hand_worked_chain():
    think, think_max, answer = demonstrations([7, 5, 3, 8], ["*", "-", "+"])
    assert answer == 40
    assert think == "<think>7*5=35 35-3=32 32+8=40</think>\\boxed{40}"
    assert think_max == "<think>7*5=35 35-3=5-3=2 32 32+8=2+8=10 3+1=4 40</think>\\boxed{40}"


@pytest.mark.parametrize("a, op, b, written", [
    (7, "*", 5, "7*5=35"),
    (6, "+", 9, "6+9=15"),
    (35, "-", 3, "35-3=5-3=2 32"),
    (32, "+", 8, "32+8=2+8=10 3+1=4 40"),
    (35, "-", 8, "35-8=15-8=7 3-1=2 27"),
    (99, "+", 9, "99+9=9+9=18 9+1=10 108"),
    (10, "-", 9, "10-9=10-9=1 1-1=0 1"),
    (-13, "+", 9, "-13+9=-(13-9) 13-9=13-9=4 1-1=0 4 -4"),
    (-6, "-", 9, "-6-9=-(6+9) 6+9=15 -15"),
    (-3, "+", 9, "-3+9=9-3 9-3=6 6"),
    (5, "-", 9, "5-9=-(9-5) 9-5=4 -4"),
    (-4, "+", 4, "-4+4=-(4-4) 4-4=0 0"),
])
def test_column_steps_by_hand(a, op, b, written):
    assert column_step(a, op, b, apply(a, op, b)) == written


def test_every_value_a_column_step_writes_is_a_small_fact_a_carry_or_a_copy():
    """Over every step the generator can meet (an accumulator from -17 to 90, a digit): the
    step ends in its result, and each `x op y=z` it computes is true with x at most 19 and y
    one digit (a single-digit fact, a borrow's teen minus a digit, or a carry's +-1) except
    the step's own head, which it then works."""
    for a in range(-17, 91):
        for op in "+-":
            for b in range(10):
                r = apply(a, op, b)
                text = column_step(a, op, b, r)
                assert re.search(rf"(^|[= ]){r}$", text), text
                facts = re.findall(r"(?<![\d(])(-?\d+)([-+])(\d+)=(-?\d+)(?=\s|$)", text)
                for x, o, y, z in facts:
                    assert apply(int(x), o, int(y)) == int(z), (text, x, o, y, z)
                    assert int(y) <= 9 and -9 <= int(x) <= 19 or (x, o, y) == (str(a), op, str(b)), (text, x, o, y)


def test_rows_are_correct_held_out_and_per_mode():
    dom = get_domain("math_chain")
    train, evals = dom.generate("train", 200, seed=0), dom.generate("eval", 50, seed=0)
    for r in train + evals:
        q = r["messages"][0]["content"]
        assert eval(q) == int(r["reference"]["answer"])  # left to right = Python precedence only with * first
        assert split_of(q, dom.eval_fraction) == ("train" if r in train else "eval")
    assert len({r["messages"][0]["content"] for r in evals}) == 50
    rows = expand_modes(evals, MODES)
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    assert all(r["messages"][-1]["content"].startswith("\\boxed{") for r in by_mode["non-think"])
    assert all("<think>" in r["messages"][-1]["content"] and " check " not in r["messages"][-1]["content"]
               for r in by_mode["think-high"])
    assert all(r["messages"][-1]["content"] == demonstrations(*_chain(r["messages"][-1 - 1]["content"]))[1]
               for r in by_mode["think-max"])
    assert all("demonstrations" not in r for r in rows)
    for m, rs in by_mode.items():
        scores = score_batch("math", [r["messages"][-1]["content"] for r in rs], [r["reference"] for r in rs])
        assert [s.score for s in scores] == [1.0] * len(rs), m
    mean_len = {m: sum(len(r["messages"][-1]["content"]) for r in rs) / len(rs) for m, rs in by_mode.items()}
    assert mean_len["non-think"] < mean_len["think-high"] < mean_len["think-max"]


def _chain(question: str) -> tuple[list[int], list[str]]:
    return [int(x) for x in re.findall(r"\d", question)], re.findall(r"[-+*]", question)
