"""`math`: two-step integer arithmetic with a one-line scratchpad, answer in `\\boxed{}`.

Prompt `7*5-3`; demonstration `7*5=35 35-3=32 \\boxed{32}`. Operands are single digits;
the first operation is one of `+ - *`, the second one of `+ -`. Reference: `{"answer": "32"}`
(the `math` verifier compares the last `\\boxed{}` with math-verify).

Sizing (docs/DESIGN.md section 7): a ~1M-parameter character model learns a handful of
single-digit facts within a minute, but not multi-digit arithmetic written most
significant digit first. The scratchpad turns each problem into two facts the model can
look up (a op b, then r op c), and the boxed answer is a copy of the last one. Eval
problems are held out as whole expressions (the hash of `7*5-3`), so the model cannot
have memorised an eval answer, only the facts it is made of.

Imperfect on purpose: only `1 - DIRECT_RATE` of the training demonstrations write the
scratchpad; the rest answer directly (`\\boxed{32}`). Greedy decoding then answers
directly, and direct answers to unseen expressions are wrong more often; sampling still
writes scratchpads some of the time and those score higher, which is the signal GRPO
can use to make the model show its work.

Measured figures for this setting and the ones it replaced: docs/tiny_experiment.md.
"""

from __future__ import annotations

import random

from engine.domains import Domain, demonstration, register_domain

FIRST_OPS = ("+", "-", "*")
SECOND_OPS = ("+", "-")
MAX_OPERAND = 9
DIRECT_RATE = 0.7


def apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def solution(a: int, op1: str, b: int, op2: str, c: int, scratchpad: bool = True) -> tuple[str, int]:
    """(demonstration text, answer): scratchpad + boxed answer, or the boxed answer alone."""
    r1 = apply(a, op1, b)
    r2 = apply(r1, op2, c)
    boxed = f"\\boxed{{{r2}}}"
    return (f"{a}{op1}{b}={r1} {r1}{op2}{c}={r2} {boxed}" if scratchpad else boxed), r2


def draw(rng: random.Random, split: str) -> tuple[str, dict]:
    a, b, c = (rng.randint(0, MAX_OPERAND) for _ in range(3))
    op1, op2 = rng.choice(FIRST_OPS), rng.choice(SECOND_OPS)
    question = f"{a}{op1}{b}{op2}{c}"
    direct = split == "train" and rng.random() < DIRECT_RATE
    text, answer = solution(a, op1, b, op2, c, scratchpad=not direct)
    return question, demonstration(question, text, {"answer": str(answer)})


DOMAIN = register_domain(Domain(
    name="math",
    verifier="math",
    draw=draw,
    description="two-step single-digit arithmetic with a scratchpad, answer in \\boxed{}",
))
