"""Eval and report per (domain, mode): mean output tokens recorded next to the greedy score,
the paired mode comparisons and token ratio worked out by hand, the student against each
mode's expert, and the score-vs-tokens plot written."""

import math

import pytest

from pipeline.evaluate import EvalSet, EvalSettings, evaluate_models
from pipeline.report_modes import mode_comparisons, mode_sets, modes_section

# per mode: (which of 4 prompts are right, output tokens per answer)
EXPERT = {"non-think": ([1, 0, 0, 0], 4), "think-high": ([1, 1, 1, 0], 10), "think-max": ([1, 1, 1, 1], 25)}
STUDENT = {"non-think": ([0, 0, 0, 0], 3), "think-high": ([1, 1, 0, 0], 12), "think-max": ([1, 1, 1, 0], 20)}


def _rows(mode):
    return [{"id": f"p{i}@{mode}", "domain": "math", "mode": mode, "reference": {"answer": str(i)},
             "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(4)]


def _policy(table):
    def policy(es, rows, temperature, n):
        right, tokens = table[es.domain.split("@")[1]]
        texts = [r["reference"]["answer"] if right[i] else "x" for i, r in enumerate(rows) for _ in range(n)]
        return texts, [tokens] * len(texts)
    return policy


def _score(verifier, texts, refs, row_ids=None):
    return [float(t == r["answer"]) for t, r in zip(texts, refs)]


@pytest.fixture()
def results():
    sets = [EvalSet(f"math@{m}", "exact", _rows(m), max_new_tokens=8) for m in EXPERT]
    tables = {"grpo:math@think-high": EXPERT, "student": STUDENT}
    return evaluate_models({n: n for n in tables}, sets, lambda d: _policy(tables[d]), _score,
                           EvalSettings(samples=0), log=lambda s: None)


def test_output_tokens_beside_scores(results):
    assert results["models"]["student"] == {"math@non-think": 0.0, "math@think-high": 0.5, "math@think-max": 0.75}
    assert results["output_tokens"]["student"] == {"math@non-think": 3.0, "math@think-high": 12.0,
                                                   "math@think-max": 20.0}
    assert mode_sets(results) == {"math": ["math@non-think", "math@think-high", "math@think-max"]}


def test_mode_comparisons_hand_worked(results):
    comps = {c["model"]: c for c in mode_comparisons(results, "math")}
    # expert: think-high - non-think per prompt = [0, 1, 1, 0]: mean 0.5, sample sd sqrt(1/3), SE sqrt(1/3)/2
    mean, se = comps["grpo:math@think-high"]["think-high - non-think"]
    assert mean == pytest.approx(0.5) and se == pytest.approx(math.sqrt(1 / 3) / 2)
    # think-max - think-high = [0, 0, 0, 1]: mean 0.25, sd 0.5, SE 0.25
    assert comps["grpo:math@think-high"]["think-max - think-high"] == pytest.approx((0.25, 0.25))
    assert comps["grpo:math@think-high"]["token_ratio"] == pytest.approx(2.5)
    assert comps["student"]["token_ratio"] == pytest.approx(20 / 12)


def test_modes_section_and_plot(results, tmp_path):
    lines = modes_section(results, tmp_path)
    text = "\n".join(lines)
    assert "## Reasoning modes" in text
    assert "| student | 0.000 / 3.0 | 0.500 / 12.0 | 0.750 / 20.0 |" in text
    assert "| grpo:math@think-high | +0.500 (0.289) | +0.250 (0.250) | 2.50 |" in text
    # student - grpo:math@think-high on think-high prompts: [0, 0, -1, 0] -> -0.25, SE 0.25
    assert "| think-high | -0.250 | 0.250 |" in text
    assert (tmp_path / "modes_math.png").stat().st_size > 1000
    assert modes_section({"models": {"m": {"math": 1.0}}}, tmp_path) == []  # no modes, no section
