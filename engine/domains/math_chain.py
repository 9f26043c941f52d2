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


SLIP_RATE = 0.3  # math_chain_redo: the share of think-max demonstrations with a slip
SLIPS = (-10, -1, 1, 10)  # a units or tens slip in one result


def redo_demonstration(operands: list[int], ops: list[str], slip_step: int, slip: int) -> str:
    """A think-max demonstration in which step `slip_step` (a + or - step) is written `slip`
    off, the chain goes on from the wrong value, and the backward check catches it: undoing
    that step does not give back its left operand, so the answer is redone from there.

    `7*5-3+8`, step 1 one too high: `<think>7*5=35 35-3=33 33+8=41 check 41-8=33 33+3=36
    not 35 redo 35-3=32 32+8=40</think>\\boxed{40}`. Only the final box is scored, so the
    extra tokens can change the answer, which the plain check (always `ok`) cannot.
    """
    steps = chain_steps(operands, ops)
    a_k, op_k, b_k, r_k = steps[slip_step]
    if op_k not in LATER_OPS or slip == 0:
        raise ValueError(f"redo_demonstration: step {slip_step} ({op_k}) cannot slip by {slip}")
    wrong = chain_steps([r_k + slip, *operands[slip_step + 2:]], ops[slip_step + 1:])
    written = steps[:slip_step] + [(a_k, op_k, b_k, r_k + slip)] + wrong
    trace = " ".join(f"{a}{op}{b}={r}" for a, op, b, r in written)
    undo = [(r, INVERSE[op], b, a) for a, op, b, r in reversed(written[slip_step:])]
    back = " ".join(f"{r}{inv}{b}={apply(r, inv, b)}" for r, inv, b, _ in undo)
    redo = " ".join(f"{a}{op}{b}={r}" for a, op, b, r in steps[slip_step:])
    return f"<think>{trace} check {back} not {a_k} redo {redo}</think>\\boxed{{{steps[-1][3]}}}"


def _problem(rng: random.Random) -> tuple[list[int], list[str], str]:
    operands = [rng.randint(0, MAX_OPERAND) for _ in range(STEPS + 1)]
    ops = [rng.choice(FIRST_OPS)] + [rng.choice(LATER_OPS) for _ in range(STEPS - 1)]
    return operands, ops, str(operands[0]) + "".join(f"{op}{b}" for op, b in zip(ops, operands[1:]))


def draw(rng: random.Random, split: str) -> tuple[str, dict]:
    operands, ops, question = _problem(rng)
    think, think_max, answer = demonstrations(operands, ops)
    return question, demonstration(question, think, {"answer": str(answer)}, demonstrations={"think-max": think_max})


def draw_redo(rng: random.Random, split: str) -> tuple[str, dict]:
    """`draw`, with SLIP_RATE of the think-max demonstrations slipping once and redone."""
    operands, ops, question = _problem(rng)
    think, think_max, answer = demonstrations(operands, ops)
    if rng.random() < SLIP_RATE:
        k = rng.choice([i for i, op in enumerate(ops) if op in LATER_OPS])
        think_max = redo_demonstration(operands, ops, k, rng.choice(SLIPS))
    return question, demonstration(question, think, {"answer": str(answer)}, demonstrations={"think-max": think_max})


DOMAIN = register_domain(Domain(
    name="math_chain",
    verifier="math",
    draw=draw,
    description="three chained single-digit operations; the worked trace in <think> (reasoning modes)",
))
DOMAIN_REDO = register_domain(Domain(
    name="math_chain_redo",
    verifier="math",
    draw=draw_redo,
    description="math_chain whose think-max demonstrations sometimes slip, and the check catches and redoes the step",
))
