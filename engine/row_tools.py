"""Tool environments for real tool-calling rows (xLAM and any row whose reference lists
`tools`): multi-turn episodes on real data, in training and eval alike.

A row's environment is `engine.domains.tool.ToolEnvironment` over the row's own tool
schemas: a call is parsed and checked against them (unknown tool, missing or unknown
argument, wrong type -> an error message, as for the synthetic tools) and a valid call
is answered from the row: the recorded result when the reference holds one for that
exact call (`reference["results"][i]` for `reference["calls"][i]`), else a
deterministic JSON echo `{"name", "arguments", "status": "ok"}`. xLAM records no
results, so its calls get the echo; the model's reward still comes from the verifier.

`RowEnvironments(rows, tokenizer)` holds one environment per row, keyed by the row's
rendered prompt; `engine.rollout` binds each episode to its prompt's environment
(`bind(prompt_ids)`).
"""

from __future__ import annotations

import json
from typing import Any


def _answer_for(reference: dict, name: str):
    calls = reference.get("calls") or []
    results = reference.get("results") or []

    def answer(**arguments: Any) -> str:
        for i, call in enumerate(calls):
            if call.get("name") == name and call.get("arguments", {}) == arguments and i < len(results):
                r = results[i]
                return r if isinstance(r, str) else json.dumps(r, sort_keys=True)
        return json.dumps({"name": name, "arguments": arguments, "status": "ok"}, sort_keys=True)

    return answer


def row_environment(reference: dict):
    """The tool environment of one row (None when its reference lists no tools)."""
    from engine.domains.tool import ToolEnvironment

    tools = reference.get("tools") or []
    if not tools:
        return None
    specs = {}
    for schema in tools:
        fn = schema.get("function", schema)
        specs[fn["name"]] = (schema, _answer_for(reference, fn["name"]))
    return ToolEnvironment(specs)


class RowEnvironments:
    """One environment per row, found by the episode's prompt ids: `factory(reference)`
    (default `row_environment`, the row's own tools; a domain's `environment` may name the
    user's own, engine.plugins)."""

    def __init__(self, rows: list[dict], tokenizer, factory=None):
        from engine.chat import render_row_prompt

        self._by_prompt = {tuple(render_row_prompt(r, tokenizer)): r["reference"] for r in rows}
        self._factory = factory or row_environment

    def bind(self, prompt_ids: list[int]):
        reference = self._by_prompt.get(tuple(prompt_ids))
        if reference is None:
            raise KeyError("RowEnvironments: no row renders to this prompt")
        env = self._factory(reference)
        if env is None:
            raise ValueError("RowEnvironments: no tool environment for this row (its reference lists no tools)")
        return env

    def execute(self, call_text: str) -> str:
        raise TypeError("RowEnvironments answers per row: rollout binds it to each prompt (bind)")
