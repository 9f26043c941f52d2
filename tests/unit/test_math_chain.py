"""The `math_chain` domain (reasoning modes): correct traces and answers, held-out eval
problems, one demonstration per mode (direct for non-think, the trace in <think> for
think-high, the place-value trace for think-max), each scored 1 by the verifier; every
think-max step's equalities hold."""

from engine.domains import get_domain, split_of
import random
import re

from engine.domains.math_chain import demonstrations, place_value_step
from engine.modes import ModeSettings, expand_modes
from rewards import score_batch

MODES = {"non-think": ModeSettings(max_new_tokens=16), "think-high": ModeSettings(max_new_tokens=48),
         "think-max": ModeSettings(max_new_tokens=96)}


def test_hand_worked_chain():
    think, think_max, answer = demonstrations([7, 5, 3, 8], ["*", "-", "+"])
    assert answer == 40
    assert think == "<think>7*5=35 35-3=32 32+8=40</think>\\boxed{40}"
    assert think_max == "<think>7*5=35 35-3=30+5-3=30+2=32 32+8=30+2+8=30+10=40</think>\\boxed{40}"
    assert place_value_step(32, "-", 8) == "32-8=30+2-8=20+12-8=20+4=24"
    assert place_value_step(35, "+", 8) == "35+8=30+5+8=30+13=43"
    assert place_value_step(-4, "+", 8) == "-4+8=4" and place_value_step(6, "-", 9) == "6-9=-3"


def test_every_place_value_step_is_a_chain_of_true_equalities():
    rng = random.Random(0)
    for a in list(range(-18, 100)):
        for op in "+-":
            b = rng.randint(0, 9)
            parts = place_value_step(a, op, b).split("=")
            assert len(parts) == (2 if not 10 <= a <= 99 else 4 if op == "+" or a % 10 >= b else 5), (a, op, b)
            assert all(eval(p) == eval(parts[0]) for p in parts), (a, op, b, parts)
            assert re.fullmatch(r"-?\d+", parts[-1])


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
    def steps(r):
        return r["messages"][-1]["content"].split("<think>")[1].split("</think>")[0].split(" ")

    assert all(s.count("=") == 1 for r in by_mode["think-high"] for s in steps(r))
    assert all(len(steps(r)) == 3 for r in by_mode["think-max"])
    assert any(s.count("=") > 1 for r in by_mode["think-max"] for s in steps(r))
    assert all("demonstrations" not in r for r in rows)
    for m, rs in by_mode.items():
        scores = score_batch("math", [r["messages"][-1]["content"] for r in rs], [r["reference"] for r in rs])
        assert [s.score for s in scores] == [1.0] * len(rs), m
    mean_len = {m: sum(len(r["messages"][-1]["content"]) for r in rs) / len(rs) for m, rs in by_mode.items()}
    assert mean_len["non-think"] < mean_len["think-high"] < mean_len["think-max"]
