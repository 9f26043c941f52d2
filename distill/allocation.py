"""How a round's prompts are shared among the OPD teachers (routes).

Each round the student samples `prompts_per_domain x teachers` prompts in all. By default
every route gets `prompts_per_domain`. A teacher's `share` tilts that split, and with
`allocation: kl` the split also follows each teacher's current gap: its share times the
training KL (token mean, `kl_per_teacher`) of the last round whose KL is known when the
round's rollouts are drawn (round r - 1; r - 2 when rounds are pipelined, since round r is
prepared while round r - 1 trains). V4 routes each prompt to the expert that knows it; this
spends the round's samples where the student is furthest from its teacher.
Every route keeps at least one prompt, and with `allocation: kl` at least
`allocation_floor x prompts_per_domain`, so every round still mixes every teacher (fixed
shares are split in exact proportion).
"""

from __future__ import annotations

from distill.opd_settings import OPDSettings
from distill.teacher_ref import TeacherRef


def allocate_prompts(total: int, weights: dict[str, float], minimum: int) -> dict[str, int]:
    """Integer prompt counts per route that sum to `total`: each route gets `minimum`, and
    the rest is split in proportion to `weights` (largest remainders; ties go to the route
    that sorts first). Every count is within one of its exact quota."""
    if not weights:
        raise ValueError("allocate_prompts: no routes")
    bad = {k: w for k, w in weights.items() if not w >= 0.0 or w == float("inf")}
    if bad:
        raise ValueError(f"allocate_prompts: weights must be finite and >= 0, got {bad}")
    if minimum < 0 or minimum * len(weights) > total:
        raise ValueError(f"allocate_prompts: a minimum of {minimum} for {len(weights)} routes exceeds {total} prompts")
    rest = total - minimum * len(weights)
    names = sorted(weights)
    mass = sum(weights.values())
    quota = {k: rest * (weights[k] / mass if mass > 0 else 1.0 / len(names)) for k in names}
    counts = {k: int(quota[k]) for k in names}
    left = rest - sum(counts.values())
    for k in sorted(names, key=lambda k: (-(quota[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return {k: minimum + counts[k] for k in names}


def round_allocation(settings: OPDSettings, teachers: list[TeacherRef], history: dict,
                     round_idx: int) -> dict[str, int]:
    """Route -> prompts for round `round_idx` (see the module doc). `history` is the stage's
    (`kl_per_teacher`: one {teacher name: KL} per finished round); the result depends only on
    the rounds finished before the allocation's rule allows, so a resumed stage recomputes it."""
    n = settings.prompts_per_domain
    weights = {t.route: t.share for t in teachers}
    if settings.allocation == "kl":
        known = round_idx - 1 - (1 if settings.pipelined else 0)
        kls = history.get("kl_per_teacher") or []
        if known >= 0:
            if known >= len(kls):
                raise RuntimeError(f"OPD allocation: round {round_idx} needs round {known}'s KL; "
                                   f"the history holds {len(kls)} rounds")
            kl = kls[known]
            weights = {t.route: t.share * max(float(kl.get(t.name, 0.0)), 0.0) for t in teachers}
    minimum = max(1, int(settings.allocation_floor * n)) if settings.allocation == "kl" else 1
    return allocate_prompts(n * len(teachers), weights, minimum)
