"""`math_chain`: chained single-digit arithmetic where a written scratchpad helps, for the
reasoning modes (engine/modes.py, docs/modes.md).

Prompt `7*5-3+8` (three operations, left to right: the first one of `+ - *`, the others
`+ -`). Each row's demonstration carries the worked trace inside `<think>`:
`<think>7*5=35 35-3=32 32+8=40</think>\\boxed{40}`. With `modes`, `prepare` makes one row
per mode: non-think drops the `<think>` block (the direct answer, `\\boxed{40}`),
think-high keeps it, think-max gets the longer demonstration in `demonstrations` (the
trace, then a check that redoes the chain backwards: `... check 40-8=32 32+3=35 35/5=7 ok`),
so the modes differ in output tokens as V4's do. Reference: `{"answer": "40"}`.

Why thinking helps a small model here: the answer to a three-operation chain is a
composition of three lookups; written out, each step is one single-fact lookup on the
previous result (as in the `math` domain's scratchpad, which lifted greedy accuracy from
0.67 to 0.86 at two steps); answered directly the model must compose them in one
forward pass, and a third step makes that harder. Eval problems are held out as whole
expressions (the hash of `7*5-3+8`).
"""

from __future__ import annotations

import random

from engine.domains import Domain, demonstration, register_domain
from engine.domains.math import apply

FIRST_OPS = ("+", "-", "*")
LATER_OPS = ("+", "-")
MAX_OPERAND = 9
STEPS = 3
INVERSE = {"+": "-", "-": "+", "*": "/"}


def chain_steps(operands: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    """[(left, op, right, result)] evaluating left to right."""
    steps, acc = [], operands[0]
    for op, b in zip(ops, operands[1:]):
        r = apply(acc, op, b)
        steps.append((acc, op, b, r))
        acc = r
    return steps


def demonstrations(operands: list[int], ops: list[str]) -> tuple[str, str, int]:
    """(think demonstration, think-max demonstration, answer)."""
    steps = chain_steps(operands, ops)
    answer = steps[-1][3]
    trace = " ".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)
    # the check: undo each step from the answer back to the first operand
    check = " ".join(f"{r}{INVERSE[op]}{b}={a}" for a, op, b, r in reversed(steps)
                     if not (op == "*" and b == 0))
    boxed = f"\\boxed{{{answer}}}"
    return f"<think>{trace}</think>{boxed}", f"<think>{trace} check {check} ok</think>{boxed}", answer


def draw(rng: random.Random, split: str) -> tuple[str, dict]:
    operands = [rng.randint(0, MAX_OPERAND) for _ in range(STEPS + 1)]
    ops = [rng.choice(FIRST_OPS)] + [rng.choice(LATER_OPS) for _ in range(STEPS - 1)]
    question = str(operands[0]) + "".join(f"{op}{b}" for op, b in zip(ops, operands[1:]))
    think, think_max, answer = demonstrations(operands, ops)
    return question, demonstration(question, think, {"answer": str(answer)}, demonstrations={"think-max": think_max})


DOMAIN = register_domain(Domain(
    name="math_chain",
    verifier="math",
    draw=draw,
    description="three chained single-digit operations; the worked trace in <think> (reasoning modes)",
))
