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
