"""`code`: write a one-line Python function from a description of its steps.

Prompt `f(x): add 3, multiply by 2`; demonstration `def f(x): return (x+3)*2`; reference
`{"tests": ["assert f(0) == 6", ...]}` with hidden inputs (the `code` verifier runs them
sandboxed and scores the fraction passed). A description has one or two steps among
add K, subtract K, multiply by K, mod K (K in 2..9).

Sizing (DESIGN.md section 7): the translation is local (word -> operator, digit ->
digit) except for one decision that needs the whole prompt: a multiplicative second
step after an additive first one needs parentheses, opened before the first step is
written. A tiny model gets the format and most translations in a minute of SFT and
the parentheses only partly. Eval descriptions are held out whole (hash of the prompt).

Imperfect on purpose: `WRONG_RATE` of the training demonstrations that need
parentheses omit them (`x+3*2`): valid Python, wrong on most tests, a mistake the test
reward exposes and GRPO can fix. Partial credit (some tests pass) keeps the signal dense.
"""

from __future__ import annotations

import random

from engine.domains import Domain, register_domain

STEPS = {  # word -> (operator, multiplicative?)
    "add": ("+", False),
    "subtract": ("-", False),
    "multiply by": ("*", True),
    "mod": ("%", True),
}
CONSTANTS = range(2, 10)
TEST_INPUTS = (0, 1, 4, 7, -3)
WRONG_RATE = 0.2


def expression(steps: list[tuple[str, int]], drop_parens: bool = False) -> str:
    """Python expression of x for the steps, parenthesised only where precedence needs it."""
    expr, additive = "x", False
    for word, k in steps:
        op, mult = STEPS[word]
        if mult and additive and not drop_parens:
            expr = f"({expr})"
        expr = f"{expr}{op}{k}"
        additive = additive if mult and drop_parens else not mult
    return expr


def evaluate(steps: list[tuple[str, int]], x: int) -> int:
    """The intended value, computed step by step (the tests' ground truth)."""
    for word, k in steps:
        x = {"add": x + k, "subtract": x - k, "multiply by": x * k, "mod": x % k}[word]
    return x


def describe(steps: list[tuple[str, int]]) -> str:
    return "f(x): " + ", ".join(f"{word} {k}" for word, k in steps)


def draw(rng: random.Random, split: str) -> tuple[str, dict]:
    steps = [(rng.choice(list(STEPS)), rng.choice(CONSTANTS)) for _ in range(rng.choice((1, 2, 2)))]
    prompt = describe(steps)
    drop = split == "train" and rng.random() < WRONG_RATE
    program = f"def f(x): return {expression(steps, drop_parens=drop)}"
    tests = [f"assert f({x}) == {evaluate(steps, x)}" for x in TEST_INPUTS]
    return prompt, {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": program}],
        "reference": {"tests": tests},
    }


DOMAIN = register_domain(Domain(
    name="code",
    verifier="code",
    draw=draw,
    description="one-line Python functions from a two-step description, hidden asserts",
))
