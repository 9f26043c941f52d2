"""`code`: write a one-line Python function from a description of its steps.

Prompt `f(x): add 3, multiply by 2`; demonstration `def f(x): return (x+3)*2`; reference
`{"tests": ["assert f(0) == 6", ...]}` with hidden inputs (the `code` verifier runs them
sandboxed and scores the fraction passed). A description has two steps among
add K, subtract K, multiply by K, mod K (K in 2..9).

Sizing (docs/DESIGN.md section 7): the literal translation is local (word -> operator,
digit -> digit) except for the parentheses a multiplicative step after an additive one
needs; measured, a tiny model learns it completely in a minute (1.00 on held-out
descriptions), far too easy. Eval descriptions are held out whole (hash of the prompt).

Imperfect on purpose: where the two steps can be folded into one constant
(`add 3, multiply by 2` -> `x*2+6`; `add 3, subtract 5` -> `x-2`; `multiply by 3,
multiply by 4` -> `x*12`), `FOLD_RATE` of the training demonstrations fold them: also
correct, but the model must now do the arithmetic, which it gets wrong on unseen
pairs. The literal form is always right; the test reward shows GRPO that it is the
safer one (the same lever as the math scratchpad). Partial credit (some tests pass)
keeps the signal dense. Eval rows carry the literal form.

Measured figures for this setting and the ones it replaced: docs/tiny_experiment.md.
"""

from __future__ import annotations

import random

from engine.domains import Domain, demonstration, register_domain

STEPS = {  # word -> (operator, multiplicative?)
    "add": ("+", False),
    "subtract": ("-", False),
    "multiply by": ("*", True),
    "mod": ("%", True),
}
CONSTANTS = range(2, 10)
TEST_INPUTS = (0, 1, 4, 7, -3)
FOLD_RATE = 0.7


def expression(steps: list[tuple[str, int]]) -> str:
    """Python expression of x for the steps, parenthesised only where precedence needs it."""
    expr, additive = "x", False
    for word, k in steps:
        op, mult = STEPS[word]
        if mult and additive:
            expr = f"({expr})"
        expr = f"{expr}{op}{k}"
        additive = not mult
    return expr


def _signed(expr: str, c: int) -> str:
    return expr if c == 0 else f"{expr}+{c}" if c > 0 else f"{expr}-{-c}"


def folded(steps: list[tuple[str, int]]) -> str | None:
    """The two steps with their constants folded into one, or None when they do not fold."""
    if len(steps) != 2:
        return None
    (w1, a), (w2, b) = steps
    sign = {"add": 1, "subtract": -1}
    if w1 in sign and w2 in sign:
        return _signed("x", sign[w1] * a + sign[w2] * b)
    if w1 == w2 == "multiply by":
        return f"x*{a * b}"
    if w1 in sign and w2 == "multiply by":
        return _signed(f"x*{b}", sign[w1] * a * b)
    return None


def compute_expected(steps: list[tuple[str, int]], x: int) -> int:
    """The intended value, computed step by step (the tests' ground truth)."""
    for word, k in steps:
        x = {"add": x + k, "subtract": x - k, "multiply by": x * k, "mod": x % k}[word]
    return x


def describe(steps: list[tuple[str, int]]) -> str:
    return "f(x): " + ", ".join(f"{word} {k}" for word, k in steps)


def draw(rng: random.Random, split: str) -> tuple[str, dict]:
    steps = [(rng.choice(list(STEPS)), rng.choice(CONSTANTS)) for _ in range(2)]
    prompt = describe(steps)
    fold = folded(steps) if split == "train" and rng.random() < FOLD_RATE else None
    program = f"def f(x): return {fold or expression(steps)}"
    tests = [f"assert f({x}) == {compute_expected(steps, x)}" for x in TEST_INPUTS]
    return prompt, demonstration(prompt, program, {"tests": tests})


DOMAIN = register_domain(Domain(
    name="code",
    verifier="code",
    draw=draw,
    description="one-line Python functions from a two-step description, hidden asserts",
))
