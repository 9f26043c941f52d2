"""`math_chain`: chained single-digit arithmetic where a written scratchpad helps, for the
reasoning modes (engine/modes.py, docs/modes.md).

Prompt `7*5-3+8` (three operations, left to right: the first one of `+ - *`, the others
`+ -`). Each row's demonstration carries the worked trace inside `<think>`:
`<think>7*5=35 35-3=32 32+8=40</think>\\boxed{40}`. With `modes`, `prepare` makes one row
per mode: non-think drops the `<think>` block (the direct answer, `\\boxed{40}`),
think-high keeps it, think-max gets the longer demonstration in `demonstrations`: the same
chain worked in columns, so that every value it writes is one single-digit fact, a carry or
borrow, or a copy (`7*5=35 35-3=5-3=2 32 32+8=2+8=10 3+1=4 40`; `column_step`). The modes
then differ in output tokens as V4's do, and think-max's extra tokens are the ones that
make each step easier: think-max scores above think-high while the model is short of the
task and at or above it at the ceiling (docs/modes.md has the measurements).
Reference: `{"answer": "40"}`.

Why thinking helps a small model here: the answer to a three-operation chain is a
composition of three lookups; written out, each step is one lookup on the previous result
(as in the `math` domain's scratchpad, which lifted greedy accuracy from 0.67 to 0.86 at two
steps); answered directly the model must compose them in one forward pass, and a third step
makes that harder. A think-high step such as `32+8=40` is still one of about 900
two-digit facts, which the tiny model after 600 SFT steps gets off by one in about one step
in six (docs/modes.md);
worked in columns it is one of the 100 single-digit facts, each seen far more often in
training, plus a carry. Eval problems are held out as whole expressions (the hash of
`7*5-3+8`).
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


def column_step(a: int, op: str, b: int, r: int) -> str:
    """One step of the think-max trace, worked so that each value it writes is a single-digit
    fact, a carry or borrow, or a copy.

    `*` and a step on one-digit numbers are written as in the think-high trace (`7*5=35`,
    `6+9=15`). A `+`/`-` on a two-digit number works the units digit, then the tens digit's
    carry or borrow, then writes the result: `32+8=2+8=10 3+1=4 40`, `35-8=15-8=7 3-1=2 27`,
    `35-3=5-3=2 32`. A step with a negative operand or result first names the step on the
    magnitudes and works that: `-13+9=-(13-9) 13-9=13-9=4 1-1=0 4 -4`,
    `-6-9=-(6+9) 6+9=15 -15`, `-3+9=9-3 9-3=6 6`, `5-9=-(9-5) 9-5=4 -4`."""
    if op == "*":
        return f"{a}{op}{b}={r}"
    if a >= 0 and r >= 0:
        return _column_unsigned(a, op, b, r)
    m = abs(a)
    if a >= 0:  # a - b with b > a
        head, inner = f"-({b}-{a})", (b, "-", a, b - a)
    elif op == "-":  # -(m + b)
        head, inner = f"-({m}+{b})", (m, "+", b, m + b)
    elif m >= b:  # -(m - b)
        head, inner = f"-({m}-{b})", (m, "-", b, m - b)
    else:  # b - m
        head, inner = f"{b}-{m}", (b, "-", m, b - m)
    return f"{a}{op}{b}={head} {_column_unsigned(*inner)} {r}"


def _column_unsigned(a: int, op: str, b: int, r: int) -> str:
    """`a op b = r` with a, b, r >= 0 and b one digit, in columns when `a` has two digits."""
    if a < 10:
        return f"{a}{op}{b}={r}"
    tens, units = divmod(a, 10)
    if op == "+":
        s = units + b
        carry = f" {tens}+1={tens + 1}" if s >= 10 else ""
        return f"{a}+{b}={units}+{b}={s}{carry} {r}"
    if units >= b:
        return f"{a}-{b}={units}-{b}={units - b} {r}"
    return f"{a}-{b}=1{units}-{b}={units + 10 - b} {tens}-1={tens - 1} {r}"


def demonstrations(operands: list[int], ops: list[str]) -> tuple[str, str, int]:
    """(think demonstration, think-max demonstration, answer)."""
    steps = chain_steps(operands, ops)
    answer = steps[-1][3]
    boxed = f"\\boxed{{{answer}}}"
    trace = " ".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)
    columns = " ".join(column_step(*s) for s in steps)
    return f"<think>{trace}</think>{boxed}", f"<think>{columns}</think>{boxed}", answer


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
    data_version=2,  # 2: think-max works the chain in columns (1: the trace, then a backward check)
))
