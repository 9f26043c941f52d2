"""Synthetic domains: deterministic train/eval rows with verifiable references.

A `Domain` names its verifier (a `rewards` registry name), generates rows in the shared
row format (docs/CONTRACTS.md: id, domain, messages, reference) and, for multi-turn
domains, builds a tool environment. Splits are held out by construction: every problem
has a canonical key, and a hash of that key (not the seed) puts it in `train` or `eval`,
so no seed ever places an eval problem in the training rows.

Importing this package is cheap (no torch, no rewards); the built-in domain modules are
imported on the first registry look-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Callable

from engine.registry import Registry

SPLITS = ("train", "eval")
_BUILTIN_MODULES = ("engine.domains.math", "engine.domains.code", "engine.domains.ifeval", "engine.domains.tool",
                    "engine.domains.math_chain")

# draw(rng, split) -> (key, {"messages": [...], "reference": {...}}); the key is the
# canonical problem text that decides the split. `split` lets a domain make its train
# demonstrations imperfect on purpose (each domain's docstring says how and why).
Draw = Callable[[random.Random, str], tuple[str, dict[str, Any]]]


def demonstration(prompt: str, answer: str, reference: dict, **extra: Any) -> dict[str, Any]:
    """A drawn single-turn row: the prompt and its demonstrated answer as chat messages, the
    verifier's reference, then any `extra` fields (in that key order)."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "reference": reference, **extra}


@dataclasses.dataclass(frozen=True)
class Domain:
    """A synthetic task: `generate(split, n, seed)` rows, scored by `verifier`."""

    name: str
    verifier: str
    draw: Draw
    eval_fraction: float = 0.2
    make_environment: Callable[[], Any] | None = None
    description: str = ""
    # Bumped whenever the rows a seed draws change; `prepare`'s input hash carries it (from 2
    # on, so runs made before the field existed keep their hashes) and reruns the data.
    data_version: int = 1

    def generate(self, split: str, n: int, seed: int) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"domain {self.name!r}: split must be one of {SPLITS}, got {split!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"domain {self.name!r}: n must be a non-negative int, got {n!r}")
        return sample_rows(self.name, split, n, seed, self.draw, self.eval_fraction)

    def environment(self):
        """A fresh tool environment for multi-turn domains; None for single-turn ones."""
        return self.make_environment() if self.make_environment is not None else None


def split_of(key: str, eval_fraction: float) -> str:
    """'eval' for a fixed `eval_fraction` of the problem space (hash of the key), else 'train'."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def sample_rows(domain: str, split: str, n: int, seed: int, draw: Draw, eval_fraction: float,
                max_tries_per_row: int = 200) -> list[dict]:
    """`n` rows of `split`, drawn by rejection on the key's split; eval keys are distinct.

    Train rows may repeat a problem (the train space is finite and SFT sets are large);
    eval rows never do, so every eval figure is over distinct held-out problems.
    """
    rng = random.Random(f"{domain}:{split}:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > max_tries_per_row * max(n, 1):
            raise ValueError(f"domain {domain!r}: found only {len(rows)} distinct {split} problems "
                             f"of the {n} asked for; the {split} problem space is too small")
        key, content = draw(rng, split)
        if split_of(key, eval_fraction) != split or (split == "eval" and key in seen):
            continue
        seen.add(key)
        rows.append({"id": f"{domain}-{split}-{seed}-{len(rows):05d}", "domain": domain, **content})
    return rows


DOMAINS: Registry[Domain] = Registry("domain", builtins=_BUILTIN_MODULES)
get_domain = DOMAINS.get
known_domains = DOMAINS.names


def register_domain(domain: Domain) -> Domain:
    """Add `domain` to the registry under its name; a second registration of a name is an error."""
    return DOMAINS.add(domain.name, domain)
