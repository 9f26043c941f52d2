"""`ifeval`: a one-sentence answer about a topic under two IFEval constraints.

Prompt `owl: all lowercase; end with "bye"`; demonstration `the owl is calm, wise. bye`;
reference `{"instruction_id_list": [...], "kwargs": [...]}` with IFEval's own ids and
kwarg names, scored by the `ifeval` verifier (strict, instruction-level fraction).
Constraints: change_case:english_lowercase / english_capital, punctuation:no_comma,
startend:end_checker, startend:quotation, keywords:existence,
length_constraints:number_words (at least / less than). The unconstrained answer
`The owl is calm, wise.` has mixed case, a comma and 5 words, so every constraint
changes the text.

Sizing (docs/DESIGN.md section 7): the edits are surface rewrites a tiny character model
picks up in a minute; the word-count constraints need counting, and the two
constraints must be composed. Eval prompts are held out whole (hash of the prompt).

Imperfect on purpose: in `WRONG_RATE` of the training demonstrations one of the two
constraints is not applied (well-formed text that the verifier scores 0.5), so after
SFT the model skips one constraint on many prompts, and the reward tells GRPO which.

Measured figures for this setting and the ones it replaced: docs/tiny_experiment.md.
"""

from __future__ import annotations

import random

from engine.domains import Domain, demonstration, register_domain

TOPICS = {
    "cat": ("soft", "calm", "small"), "dog": ("loyal", "happy", "fast"), "sun": ("hot", "bright", "big"),
    "moon": ("pale", "round", "cold"), "tea": ("warm", "green", "sweet"), "sea": ("blue", "deep", "wide"),
    "owl": ("wise", "calm", "quiet"), "tree": ("tall", "green", "old"), "rain": ("wet", "grey", "cool"),
    "bread": ("fresh", "warm", "soft"), "snow": ("white", "cold", "quiet"), "fox": ("red", "quick", "sly"),
}
END_PHRASES = ("bye", "the end", "ok")
KEYWORDS = ("blue", "home", "star", "time", "gold", "road", "song", "lamp", "milk", "rope", "fish", "king", "door",
            "wind", "salt", "ring")
FILLER = ("I", "like", "it", "a", "lot", "and", "so", "do", "you")
WRONG_RATE = 0.5

# constraint name -> IFEval instruction id
KINDS = {
    "lower": "change_case:english_lowercase",
    "upper": "change_case:english_capital",
    "no_comma": "punctuation:no_comma",
    "end": "startend:end_checker",
    "quote": "startend:quotation",
    "keyword": "keywords:existence",
    "words": "length_constraints:number_words",
}
# Pairs never asked together: contradictory, or a short word limit that the added
# keyword / end phrase could not fit under.
CONFLICTS = ({"lower", "upper"}, {"words", "end"}, {"words", "keyword"})


def make_constraint(kind: str, rng: random.Random) -> tuple[str, dict]:
    """(prompt phrase, IFEval kwargs) for one constraint."""
    if kind == "lower":
        return "all lowercase", {}
    if kind == "upper":
        return "all capitals", {}
    if kind == "no_comma":
        return "no commas", {}
    if kind == "quote":
        return "in quotes", {}
    if kind == "end":
        phrase = rng.choice(END_PHRASES)
        return f'end with "{phrase}"', {"end_phrase": phrase}
    if kind == "keyword":
        word = rng.choice(KEYWORDS)
        return f'use "{word}"', {"keywords": [word]}
    if rng.random() < 0.5:
        n = rng.randint(7, 14)
        return f"at least {n} words", {"num_words": n, "relation": "at least"}
    n = rng.randint(3, 5)
    return f"under {n} words", {"num_words": n, "relation": "less than"}


def respond(topic: str, constraints: list[tuple[str, dict]]) -> str:
    """A response that follows every constraint, edits applied in a fixed order."""
    adj = TOPICS[topic]
    words = ["The", topic, "is", f"{adj[0]},", adj[1]]
    given = dict(constraints)
    if "keyword" in given:
        words += ["and", given["keyword"]["keywords"][0]]
    if "words" in given:
        n, rel = given["words"]["num_words"], given["words"]["relation"]
        words = words[: n - 1] if rel == "less than" else words + list(FILLER[: max(0, n - len(words))])
    if "end" in given:
        words += given["end"]["end_phrase"].split()
    text = " ".join(words).rstrip(",") + "."
    if "no_comma" in given:
        text = text.replace(",", "")
    if "lower" in given:
        text = text.lower()
    if "upper" in given:
        text = text.upper()
    if "end" in given:
        text = text[:-1]  # the end phrase must be the last thing
    if "quote" in given:
        text = f'"{text}"'
    return text


def draw(rng: random.Random, split: str) -> tuple[str, dict]:
    topic = rng.choice(sorted(TOPICS))
    kinds = rng.sample(sorted(KINDS), 2)
    while any(set(kinds) >= c for c in CONFLICTS):
        kinds = rng.sample(sorted(KINDS), 2)
    built = [(k, make_constraint(k, rng)) for k in kinds]
    prompt = f"{topic}: " + "; ".join(phrase for _, (phrase, _) in built)
    constraints = [(k, kw) for k, (_, kw) in built]
    if split == "train" and rng.random() < WRONG_RATE:
        constraints.pop(rng.randrange(len(constraints)))
    return prompt, demonstration(prompt, respond(topic, constraints), {
        "instruction_id_list": [KINDS[k] for k, _ in built], "kwargs": [kw for _, (_, kw) in built]})


DOMAIN = register_domain(Domain(
    name="ifeval",
    verifier="ifeval",
    draw=draw,
    description="one-sentence answers under one or two IFEval format/keyword constraints",
))
