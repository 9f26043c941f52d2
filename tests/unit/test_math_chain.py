"""The `math_chain` domain (reasoning modes): correct traces and answers, held-out eval
problems, one demonstration per mode (direct for non-think, the trace in <think> for
think-high, the longer traced-and-checked one for think-max), each scored 1 by the verifier."""

from engine.domains import get_domain, split_of
from engine.domains.math_chain import demonstrations
from engine.modes import ModeSettings, expand_modes
from rewards import score_batch

MODES = {"non-think": ModeSettings(max_new_tokens=16), "think-high": ModeSettings(max_new_tokens=48),
         "think-max": ModeSettings(max_new_tokens=96)}


def test_hand_worked_chain():
    think, think_max, answer = demonstrations([7, 5, 3, 8], ["*", "-", "+"])
    assert answer == 40
    assert think == "<think>7*5=35 35-3=32 32+8=40</think>\\boxed{40}"
    assert think_max == "<think>7*5=35 35-3=32 32+8=40 check 40-8=32 32+3=35 35/5=7 ok</think>\\boxed{40}"


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
    assert all(" check " in r["messages"][-1]["content"] for r in by_mode["think-max"])
    assert all("demonstrations" not in r for r in rows)
    for m, rs in by_mode.items():
        scores = score_batch("math", [r["messages"][-1]["content"] for r in rs], [r["reference"] for r in rs])
        assert [s.score for s in scores] == [1.0] * len(rs), m
    mean_len = {m: sum(len(r["messages"][-1]["content"]) for r in rs) / len(rs) for m, rs in by_mode.items()}
    assert mean_len["non-think"] < mean_len["think-high"] < mean_len["think-max"]


def test_a_slipped_think_max_demonstration_is_caught_by_its_check_and_redone():
    from engine.domains.math_chain import redo_demonstration

    # 7*5-3+8: step 1 written one too high, the chain goes on from 33, and undoing step 1
    # gives 36, not the 35 it started from, so the chain is redone from there
    assert redo_demonstration([7, 5, 3, 8], ["*", "-", "+"], 1, 1) == (
        "<think>7*5=35 35-3=33 33+8=41 check 41-8=33 33+3=36 not 35 redo 35-3=32 32+8=40</think>\\boxed{40}")
    # the last step ten too low: caught at once by the first undo
    assert redo_demonstration([7, 5, 3, 8], ["*", "-", "+"], 2, -10) == (
        "<think>7*5=35 35-3=32 32+8=30 check 30-8=22 not 32 redo 32+8=40</think>\\boxed{40}")
    import pytest

    with pytest.raises(ValueError, match="cannot slip"):
        redo_demonstration([7, 5, 3, 8], ["*", "-", "+"], 0, 1)  # a product's check divides: not slipped


def test_redo_rows_slip_some_think_max_demonstrations_and_every_one_scores_1():
    """Every written step but the slipped one is right, the undo before `not` differs from
    the slipped step's left operand, and the boxed answer is the chain's."""
    import re

    from engine.domains.math import apply
    from engine.domains.math_chain import SLIP_RATE

    dom = get_domain("math_chain_redo")
    rows = expand_modes(dom.generate("train", 400, seed=1), MODES)
    think_max = [r for r in rows if r["mode"] == "think-max"]
    slipped = [r["messages"][-1]["content"] for r in think_max if " redo " in r["messages"][-1]["content"]]
    assert abs(len(slipped) / len(think_max) - SLIP_RATE) < 0.08
    for text in slipped:
        forward, rest = text.removeprefix("<think>").split(" check ")
        back, rest = rest.split(" not ")
        _, redo = rest.split(" redo ")
        redo = redo.split("</think>")[0]
        written = [tuple(re.fullmatch(r"(-?\d+)([-+*/])(-?\d+)=(-?\d+)", s).groups()) for s in forward.split()]
        bad = [i for i, (a, op, b, r) in enumerate(written) if apply(int(a), op, int(b)) != int(r)]
        assert len(bad) == 1 and written[bad[0]][1] in "+-"
        last = back.split()[-1]
        assert int(last.split("=")[1]) != int(written[bad[0]][0]) == int(rest.split()[0])
        assert redo.split()[0].startswith(written[bad[0]][0] + written[bad[0]][1])
    for r in [r for r in rows if r["mode"] != "think-max"]:
        assert " redo " not in r["messages"][-1]["content"] and " check " not in r["messages"][-1]["content"]
    scores = score_batch("math", [r["messages"][-1]["content"] for r in think_max], [r["reference"] for r in think_max])
    assert [s.score for s in scores] == [1.0] * len(think_max)
