"""How a round's prompts are shared among the OPD teachers (routes).

Each round the student samples `prompts_per_domain x teachers` prompts in all. By default
every route gets `prompts_per_domain`. A teacher's `share` tilts that split, and with
`allocation: kl` the split also follows each teacher's current gap: its share times the
training KL (token mean, `kl_per_teacher`) of the last round whose KL is known when the
round's rollouts are drawn (round r - 1; r - 2 when rounds are pipelined, since round r is
prepared while round r - 1 trains). V4 routes each prompt to the expert that knows it; this
spends the round's samples where the student is furthest from its teacher.
Every route keeps at least one prompt, and with `allocation: kl` at least
`allocation_floor x prompts_per_domain`, so every round still mixes every teacher.
Fixed shares are split in exact proportion (`allocate_in_proportion`: shares 1:3 of 16
prompts give 4 and 12), a route whose exact share is below one prompt gets one and the
others split the rest in proportion; under `kl` every route gets the floor and the rest
is split in proportion to share x KL (`allocate_prompts`).
"""

from __future__ import annotations

from distill.opd_settings import OPDSettings
from distill.teacher_ref import TeacherRef


def _check_allocation(total: int, weights: dict[str, float], minimum: int, who: str) -> None:
    if not weights:
        raise ValueError(f"{who}: no routes")
    bad = {k: w for k, w in weights.items() if not w >= 0.0 or w == float("inf")}
    if bad:
        raise ValueError(f"{who}: weights must be finite and >= 0, got {bad}")
    if minimum < 0 or minimum * len(weights) > total:
        raise ValueError(f"{who}: a minimum of {minimum} for {len(weights)} routes exceeds {total} prompts")


def _round_quotas(rest: int, quota: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to `rest`: largest remainders, ties to the route sorting first."""
    counts = {k: int(quota[k]) for k in sorted(quota)}
    left = rest - sum(counts.values())
    for k in sorted(quota, key=lambda k: (-(quota[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return counts


def allocate_prompts(total: int, weights: dict[str, float], minimum: int) -> dict[str, int]:
    """Integer prompt counts per route that sum to `total`: each route gets `minimum`, and
    the rest is split in proportion to `weights` (largest remainders; ties go to the route
    that sorts first). Every count is within one of its exact quota."""
    _check_allocation(total, weights, minimum, "allocate_prompts")
    rest = total - minimum * len(weights)
    names = sorted(weights)
    mass = sum(weights.values())
    counts = _round_quotas(rest, {k: rest * (weights[k] / mass if mass > 0 else 1.0 / len(names)) for k in names})
    return {k: minimum + counts[k] for k in names}


def allocate_in_proportion(total: int, weights: dict[str, float], minimum: int) -> dict[str, int]:
    """Integer prompt counts per route that sum to `total`, each within one of its exact
    share of `total` in proportion to `weights` (largest remainders), except that a route
    whose share is below `minimum` gets `minimum` and the other routes split what is left
    in proportion (repeated until no share is below it)."""
    _check_allocation(total, weights, minimum, "allocate_in_proportion")
    floored: set[str] = set()
    while True:  # some route stays free: all shares below the minimum would mean total < minimum x routes
        free = [k for k in sorted(weights) if k not in floored]
        rest = total - minimum * len(floored)
        mass = sum(weights[k] for k in free)
        quota = {k: rest * (weights[k] / mass if mass > 0 else 1.0 / len(free)) for k in free}
        low = {k for k in free if quota[k] < minimum}
        if not low:
            break
        floored |= low
    counts = _round_quotas(rest, quota)  # a quota >= the (integer) minimum rounds to >= it
    return {k: minimum if k in floored else counts[k] for k in sorted(weights)}


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
    if settings.allocation == "kl":
        return allocate_prompts(n * len(teachers), weights, max(1, int(settings.allocation_floor * n)))
    return allocate_in_proportion(n * len(teachers), weights, 1)
