"""Reasoning modes (DeepSeek-V4): non-think, think-high, think-max.

A mode is part of the prompt and of the config. A domain's `modes` (YAML mapping, mode
name -> `ModeSettings`) turns each of its rows into one row per mode in `prepare`
(`expand_modes`): the row gets `mode: <name>` and an id suffix `@<name>`; think-max rows
get a system message with the mode's instruction (text in config,
`DEFAULT_THINK_MAX_INSTRUCTION` by default); a non-think demonstration loses its `<think>...</think>` block (the direct
answer), think demonstrations keep it; a row's `demonstrations: {mode: text}` replaces its
last assistant message in that mode (math_chain's longer think-max trace). Rendering
passes `mode_template_kwargs(mode)` to the chat template: `enable_thinking=False` for
non-think (the template closes an empty `<think></think>` after the generation prompt, as
Qwen3's does), `True` for think modes; a row without a mode passes nothing, so a config
without modes renders exactly as before.

Routing: OPD sends a sample to the teacher of its route, `route_key(domain, mode)`:
`math@think-high`, or plain `math` for a domain without modes.

Everything here is plain Python (no torch): `validate` imports it.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import Field, PositiveInt

from engine.settings import Settings

MODES = ("non-think", "think-high", "think-max")
THINKING = {"non-think": False, "think-high": True, "think-max": True}
DEFAULT_THINK_MAX_INSTRUCTION = (
    "Reasoning effort: maximum. Think through every step in full inside <think></think> before the "
    "final answer; use as much of your budget as the problem needs.")
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class ModeSettings(Settings):
    """One reasoning mode of a domain: its output budget, its GRPO reward shaping and any GRPO
    settings of its own."""

    HASH_NEUTRAL_DEFAULTS: ClassVar[dict] = {"grpo": {}}

    max_new_tokens: PositiveInt = Field(description="the mode's output budget: generation cap in GRPO, OPD and eval")
    length_budget: PositiveInt | None = Field(
        None, description="think-high: response tokens past this lose `length_penalty` reward each")
    length_penalty: float = Field(0.0, ge=0.0, description="think-high: reward lost per token past length_budget")
    think_penalty: float = Field(1.0, ge=0.0, le=1.0, description="non-think: fraction of the reward lost when the "
                                                                  "response writes reasoning (<think> tokens)")
    instruction: str | None = Field(None, description="think-max: the system instruction (default: a built-in one)")
    grpo: dict[str, Any] = Field(default_factory=dict, description="this mode's expert's GRPO settings where they "
                                 "differ from the domain's `grpo` (e.g. lr, steps); checked by pipeline.config")


def check_modes(modes: dict[str, ModeSettings]) -> list[tuple[str, str]]:
    """(path relative to `modes`, reason) for each problem: unknown names, settings that
    a mode does not use."""
    errors = []
    for name, m in modes.items():
        if name not in MODES:
            errors.append((name, f"unknown mode {name!r}; known: {list(MODES)}"))
            continue
        if name != "think-high" and ("length_budget" in m.model_fields_set or "length_penalty" in m.model_fields_set):
            errors.append((name, "length_budget/length_penalty apply to think-high only"))
        if name != "non-think" and "think_penalty" in m.model_fields_set:
            errors.append((f"{name}.think_penalty", "applies to non-think only"))
        if name != "think-max" and m.instruction is not None:
            errors.append((f"{name}.instruction", "applies to think-max only"))
        if m.length_budget is not None and m.length_budget > m.max_new_tokens:
            errors.append((f"{name}.length_budget", f"{m.length_budget} > max_new_tokens={m.max_new_tokens}"))
    return errors


def mode_template_kwargs(mode: str | None) -> dict:
    """Chat-template kwargs of a mode; {} for a row without one (renders as before)."""
    if mode is None:
        return {}
    if mode not in THINKING:
        raise ValueError(f"unknown mode {mode!r}; known: {list(MODES)}")
    return {"enable_thinking": THINKING[mode]}


def route_key(domain: str, mode: str | None) -> str:
    """The OPD route of a sample: `domain@mode`, or `domain` for a domain without modes."""
    return domain if mode is None else f"{domain}@{mode}"


def split_route(route: str) -> tuple[str, str | None]:
    """Inverse of `route_key`."""
    domain, _, mode = route.partition("@")
    return domain, (mode or None)


def strip_thinking(text: str) -> str:
    """`text` without its `<think>...</think>` blocks (and the whitespace after them)."""
    return _THINK_BLOCK.sub("", text)


def has_think_tokens(text: str) -> bool:
    """Whether a response writes a `<think>` or `</think>` tag: a non-think prompt already
    ends in the closed empty block, so any further tag is reasoning the mode forbids."""
    return "<think>" in text or "</think>" in text


def apply_mode(row: dict, mode: str, settings: ModeSettings) -> dict:
    """One row of `mode`: id suffix, `mode` field, think-max instruction, demonstration form."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {list(MODES)}")
    special = (row.get("demonstrations") or {}).get(mode)  # a mode's own demonstration, if the row has one
    last = max((j for j, m in enumerate(row["messages"]) if m["role"] == "assistant"), default=None)
    messages = []
    for j, m in enumerate(row["messages"]):
        if j == last and special is not None:
            m = {**m, "content": special}
        if m["role"] == "assistant" and not THINKING[mode]:
            m = {**m, "content": strip_thinking(m["content"])}
        messages.append(m)
    if mode == "think-max":
        instruction = settings.instruction or DEFAULT_THINK_MAX_INSTRUCTION
        messages = [{"role": "system", "content": instruction}] + messages
    out = {**row, "id": f"{row['id']}@{mode}", "mode": mode, "messages": messages}
    out.pop("demonstrations", None)
    return out


def expand_modes(rows: list[dict], modes: dict[str, ModeSettings] | None) -> list[dict]:
    """Each row once per mode (mode-major within each row), or the rows unchanged without modes."""
    if not modes:
        return rows
    return [apply_mode(r, name, m) for r in rows for name, m in modes.items()]
