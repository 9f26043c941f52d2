"""The stage graph of an experiment, in dependency order, with input hashes.

A stage's input hash covers the config sections it reads and the hashes of the stages it
depends on, so a change invalidates exactly the stages downstream of it: editing
`domains.math.grpo` reruns `grpo:math`, `opd`, `eval` and `report`, nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config_schema import ExperimentConfig
from engine.modes import route_key


STAGE_KINDS = ("prepare", "sft", "grpo", "mixed_rl", "opd", "eval", "report")


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    inputs: dict  # the config slices the stage reads

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]


def _dump(model) -> object:
    """A settings object as it enters a stage's input hash. Fields a settings class lists in
    `HASH_NEUTRAL_DEFAULTS` (added after runs existed) are left out while they hold that
    default, so adding them does not invalidate finished stages; any other value is hashed."""
    if not hasattr(model, "model_dump"):
        return model
    out = model.model_dump(mode="json")
    for key, default in getattr(model, "HASH_NEUTRAL_DEFAULTS", {}).items():
        if out.get(key, object()) == default:
            del out[key]
    for key in out:  # nested settings (opd.teachers[i]) drop theirs too
        value = getattr(model, key, None)
        if hasattr(value, "model_dump"):
            out[key] = _dump(value)
        elif isinstance(value, (list, tuple)) and any(hasattr(v, "model_dump") for v in value):
            out[key] = [_dump(v) for v in value]
    return out


def grpo_stage(domain: str, mode: str | None = None) -> str:
    """`grpo:<domain>`, or `grpo:<domain>@<mode>` for one mode's expert."""
    return f"grpo:{route_key(domain, mode)}"


def _dump_modes(d) -> dict:
    """The modes as `prepare` reads them (their GRPO settings are the experts' business)."""
    return {name: {k: v for k, v in _dump(m).items() if k != "grpo"} for name, m in d.modes.items()}


def _data_versions(cfg: ExperimentConfig) -> dict:
    """`{"data_versions": {domain: version}}` for the synthetic generators whose rows changed
    since version 1 (engine.domains.Domain.data_version); empty when none did."""
    from engine.domains import get_domain

    changed = {}
    for d in cfg.domains:
        if d.data.synthetic is None:
            continue
        try:
            version = get_domain(d.data.synthetic.generator).data_version
        except KeyError:  # an unknown generator: `validate` names it with its YAML path
            continue
        if version != 1:
            changed[d.name] = version
    return {"data_versions": changed} if changed else {}


def build_graph(cfg: ExperimentConfig) -> list[Stage]:
    """Stages in a valid execution order."""
    stages: list[Stage] = [
        Stage("prepare", (), {"seed": cfg.seed, "model": _dump(cfg.model),
                              "data": {d.name: _dump(d.data) for d in cfg.domains},
                              **_data_versions(cfg),
                              # only where a domain has modes, so configs without keep their hash
                              **({"modes": {d.name: _dump_modes(d) for d in cfg.domains if d.modes}}
                                 if any(d.modes for d in cfg.domains) else {})}),
    ]
    common = {"trainer": _dump(cfg.trainer), "seed": cfg.seed}
    # tool environments named in the config (only when some domain names one: old hashes hold)
    envs = {"environments": {d.name: d.environment for d in cfg.domains if d.environment}}
    envs = envs if envs["environments"] else {}
    rl_common = {**common, "generator": _dump(cfg.generator)}
    # sft:all first: the runner launches ready stages in this order, and it is the longest one
    if cfg.opd.student_init == "sft:all" or cfg.mixed_rl.enabled or cfg.expert_init == "sft:all":
        stages.append(Stage("sft:all", ("prepare",), {**common, "sft": _dump(cfg.student_sft)}))
    for d in cfg.domains:
        if cfg.expert_init == "sft:domain":
            stages.append(Stage(f"sft:{d.name}", ("prepare",), {**common, "sft": _dump(d.sft)}))
        for mode in d.mode_names:  # one expert per (domain, mode): docs/modes.md
            inputs = {**rl_common, "grpo": _dump(d.grpo), "verifier": d.verifier,
                      **({"environment": d.environment} if d.environment else {})}
            if mode is not None:
                inputs["mode"] = {mode: _dump(d.modes[mode])}
            stages.append(Stage(grpo_stage(d.name, mode), (cfg.expert_start(d.name),), inputs))
    if cfg.mixed_rl.enabled:
        stages.append(Stage("mixed_rl", ("sft:all",),
                            {**rl_common, "grpo": _dump(cfg.mixed_rl.grpo),
                             "verifiers": {d.name: d.verifier for d in cfg.domains}, **envs}))
    init = cfg.opd.student_init
    init_dep = (init,) if init.startswith("sft:") else ("prepare",)
    teacher_deps = tuple(grpo_stage(t.domain, t.mode) for t in cfg.teachers() if t.path is None)
    stages.append(Stage("opd", tuple(dict.fromkeys(init_dep + teacher_deps)),
                        {**rl_common, "opd": _dump(cfg.opd),
                         "verifiers": {d.name: d.verifier for d in cfg.domains}, **envs}))
    model_stages = tuple(s.name for s in stages if s.kind in ("sft", "grpo", "mixed_rl", "opd"))
    stages.append(Stage("eval", ("prepare",) + model_stages,
                        {"eval": _dump(cfg.eval), "generator": _dump(cfg.generator),
                         "verifiers": {d.name: d.verifier for d in cfg.domains}, **envs}))
    stages.append(Stage("report", ("eval",), {}))
    return stages


def input_hashes(stages: list[Stage]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for s in stages:
        payload = json.dumps({"stage": s.name, "inputs": s.inputs,
                              "deps": {d: hashes[d] for d in s.deps}}, sort_keys=True)
        hashes[s.name] = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return hashes


def select(stages: list[Stage], only: list[str] | None = None, start: str | None = None) -> list[Stage]:
    names = [s.name for s in stages]
    for n in list(only or []) + ([start] if start else []):
        if n not in names:
            raise ValueError(f"unknown stage {n!r}; stages: {names}")
    if only:
        return [s for s in stages if s.name in only]
    if start:
        return stages[names.index(start):]
    return stages
