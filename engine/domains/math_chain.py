"""`math_chain`: chained single-digit arithmetic where a written scratchpad helps, for the
reasoning modes (engine/modes.py, docs/modes.md).

Prompt `7*5-3+8` (three operations, left to right: the first one of `+ - *`, the others
`+ -`). Each row's demonstration carries the worked trace inside `<think>`:
`<think>7*5=35 35-3=32 32+8=40</think>\\boxed{40}`. With `modes`, `prepare` makes one row
per mode: non-think drops the `<think>` block (the direct answer, `\\boxed{40}`),
think-high keeps it, think-max gets the longer demonstration in `demonstrations`: every
step on a two-digit number is worked by place value, tens and units apart, with the carry
or the borrow written out (`35-3=30+5-3=30+2=32 32+8=30+2+8=30+10=40`; a borrow:
`32-8=30+2-8=20+12-8=20+4=24`), so the modes differ in output tokens as V4's do and each
written step is a single-digit fact or a copy.

Why thinking helps a small model here: the answer to a three-operation chain is a
composition of three lookups; written out, each step is one single-fact lookup on the
previous result (as in the `math` domain's scratchpad, which lifted greedy accuracy from
0.67 to 0.86 at two steps); answered directly the model must compose them in one
forward pass, and a third step makes that harder. Think-max goes one level further: a
two-digit step (`32-8`) is itself a composition (units, borrow, tens), and the place-value
trace writes each part. (The earlier think-max, the think-high trace plus a backward
check, added tokens but nothing the answer used, and scored below think-high:
docs/modes.md.) Eval problems are held out as whole
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


def chain_steps(operands: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    """[(left, op, right, result)] evaluating left to right."""
    steps, acc = [], operands[0]
    for op, b in zip(ops, operands[1:]):
        r = apply(acc, op, b)
        steps.append((acc, op, b, r))
        acc = r
    return steps


def place_value_step(a: int, op: str, b: int) -> str:
    """One step written for think-max: `a op b = ... = result`, with a two-digit `a` split into
    tens and units (`35-3=30+5-3=30+2=32`), the carry (`35+8=30+5+8=30+13=43`) or the borrow
    (`32-8=30+2-8=20+12-8=20+4=24`) written out; a step on a single-digit or negative `a`, and
    a product, stay as in think-high (`7*5=35`)."""
    r = apply(a, op, b)
    if op == "*" or not 10 <= a <= 99:
        return f"{a}{op}{b}={r}"
    tens, units = a - a % 10, a % 10
    if op == "+":
        return f"{a}+{b}={tens}+{units}+{b}={tens}+{units + b}={r}"
    if units >= b:
        return f"{a}-{b}={tens}+{units}-{b}={tens}+{units - b}={r}"
    return f"{a}-{b}={tens}+{units}-{b}={tens - 10}+{units + 10}-{b}={tens - 10}+{units + 10 - b}={r}"


def demonstrations(operands: list[int], ops: list[str]) -> tuple[str, str, int]:
    """(think demonstration, think-max demonstration, answer)."""
    steps = chain_steps(operands, ops)
    answer = steps[-1][3]
    trace = " ".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)
    worked = " ".join(place_value_step(a, op, b) for a, op, b, _ in steps)
    boxed = f"\\boxed{{{answer}}}"
    return f"<think>{trace}</think>{boxed}", f"<think>{worked}</think>{boxed}", answer


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
    data_version=2,
))
