"""Tool calls in each model family's native format: parse them back, per family.

A family writes its calls the way its chat template renders an assistant message's
`tool_calls` (tools go to the template through its `tools=` argument):
- `hermes` (Qwen3, Qwen2.5 / ChatML): `<tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>`;
- `llama3_json` (Llama 3.1 / 3.2): the turn is one JSON object `{"name": .., "parameters": {..}}`
  (optionally after `<|python_tag|>`; several joined by `;`);
- `deepseek` (DeepSeek-R1 / V3): `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>`
  inside `<｜tool▁calls▁begin｜>..<｜tool▁calls▁end｜>`;
- `mistral` (v0.3): `[TOOL_CALLS] [{"name": .., "arguments": {..}, "id": ..}, ..]`;
- `xml`: the project's `<tool_call><invoke name=..><parameter name=..>` (rewards.tool_calls),
  for templates that render calls that way (the tiny model's).

`detect_tool_format(tokenizer)` picks the parser by rendering a probe call through the
template and keeping the format that parses it back; `parse_calls(text, fmt)` reads the
calls of one assistant turn (text decoded with special tokens kept);
`canonical_episode(turns)` writes an episode with its calls in the `xml` form, the form
the `tool` verifier scores (rewards.tool_reward), so the verifier reads the parsed calls
whatever the family.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("hermes", "llama3_json", "deepseek", "mistral", "xml")


class ToolFormatError(ValueError):
    """A turn's tool-call markup does not parse in its family's format."""


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]
    id: str | None = field(default=None, compare=False)  # the call id the model wrote (Mistral), if any


# Formats whose call is the whole assistant turn, ended by the template's end-of-turn token
# (Llama 3's `<|eot_id|>`, DeepSeek's `<｜end▁of▁sentence｜>`, Mistral's `</s>`): a rollout
# tells a call from an answer by parsing the turn. Hermes and XML calls end at `</tool_call>`.
TURN_END_FORMATS = ("llama3_json", "deepseek", "mistral")
# where a call's markup starts in a turn (decoded with special tokens kept); llama3_json:
# `<|python_tag|>`, or the answer itself
CALL_OPEN = {"hermes": "<tool_call>", "xml": "<tool_call>", "deepseek": "<｜tool▁calls▁begin｜>",
             "mistral": "[TOOL_CALLS]", "llama3_json": "<|python_tag|>"}


def _call(obj: Any, args_key: str, where: str) -> Call:
    """A `Call` from a parsed JSON object (its `id` kept when it has a string one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolFormatError(f"{where}: a call must be a JSON object with a string 'name', got {str(obj)[:80]!r}")
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise ToolFormatError(f"{where}: arguments of {obj['name']!r} are not JSON: {args[:80]!r}") from None
    if not isinstance(args, dict):
        raise ToolFormatError(f"{where}: arguments of {obj['name']!r} must be an object, got {type(args).__name__}")
    call_id = obj.get("id")
    return Call(obj["name"], args, call_id if isinstance(call_id, str) else None)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ToolFormatError(f"{where}: not JSON ({exc}): {text[:80]!r}") from None


def _hermes(text: str) -> list[Call]:
    bodies = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
    if text.count("<tool_call>") != len(bodies):
        raise ToolFormatError("hermes: a <tool_call> is not closed")
    return [_call(_json(b.strip(), f"hermes call {i}"), "arguments", f"hermes call {i}") for i, b in enumerate(bodies)]


def _llama3_json(text: str) -> list[Call]:
    body = text.split("<|python_tag|>")[-1]
    body = re.sub(r"<\|(eot_id|eom_id)\|>\s*$", "", body.strip()).strip()
    if not body.startswith("{"):
        return []  # a plain answer
    calls, dec, pos = [], json.JSONDecoder(), 0
    while pos < len(body):
        try:
            obj, end = dec.raw_decode(body, pos)
        except ValueError as exc:
            raise ToolFormatError(f"llama3_json: not JSON at {pos} ({exc})") from None
        calls.append(_call(obj, "parameters", f"llama3_json call {len(calls)}"))
        pos = end
        while pos < len(body) and body[pos] in " ;\n":
            pos += 1
    return calls


_DS_CALL = re.compile(r"<｜tool▁call▁begin｜>(\w+)<｜tool▁sep｜>(.*?)\n```json\n(.*?)\n```<｜tool▁call▁end｜>", re.DOTALL)


def _deepseek(text: str) -> list[Call]:
    if "<｜tool▁calls▁begin｜>" not in text:
        return []
    block = text.split("<｜tool▁calls▁begin｜>", 1)[1].split("<｜tool▁calls▁end｜>", 1)[0]
    found = _DS_CALL.findall(block)
    if len(found) != block.count("<｜tool▁call▁begin｜>"):
        raise ToolFormatError("deepseek: a <｜tool▁call▁begin｜> does not parse as function<｜tool▁sep｜>NAME + ```json")
    return [_call({"name": name.strip(), "arguments": _json(args, f"deepseek call {i}")}, "arguments",
                  f"deepseek call {i}") for i, (_, name, args) in enumerate(found)]


def _mistral(text: str) -> list[Call]:
    if "[TOOL_CALLS]" not in text:
        return []
    body = text.split("[TOOL_CALLS]", 1)[1].strip()
    body = body[:-len("</s>")] if body.endswith("</s>") else body
    calls = _json(body.strip(), "mistral")
    if not isinstance(calls, list):
        raise ToolFormatError("mistral: [TOOL_CALLS] must be followed by a JSON list")
    return [_call(c, "arguments", f"mistral call {i}") for i, c in enumerate(calls)]


def _xml(text: str) -> list[Call]:
    from rewards.tool_calls import ToolCallParseError, parse_tool_calls

    try:
        return [Call(c.name, dict(c.arguments)) for c in parse_tool_calls(text)]
    except ToolCallParseError as exc:
        raise ToolFormatError(f"xml: {exc}") from None


_PARSERS = {"hermes": _hermes, "llama3_json": _llama3_json, "deepseek": _deepseek, "mistral": _mistral, "xml": _xml}


def parse_calls(text: str, fmt: str) -> list[Call]:
    """The calls one assistant turn makes, in `fmt` (`FORMATS`); [] for a plain answer."""
    if fmt not in _PARSERS:
        raise ValueError(f"unknown tool-call format {fmt!r}; known: {list(FORMATS)}")
    return _PARSERS[fmt](text)


_PROBE = Call("probe_tool", {"city": "Paris", "days": 3})


def detect_tool_format(tokenizer) -> str:
    """The format the tokenizer's chat template writes calls in: the one that parses a
    probe call rendered as an assistant message's `tool_calls` back to itself."""
    from engine.chat import ChatTemplateError, render

    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": _PROBE.name, "arguments": dict(_PROBE.arguments)}}]}]
    try:
        r = render(messages, tokenizer)
    except Exception as exc:  # a template without tool calls (Gemma)
        raise ChatTemplateError(f"the chat template does not render tool calls: {exc}") from exc
    text = tokenizer.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m], skip_special_tokens=False)
    for fmt in FORMATS:
        try:
            if parse_calls(text, fmt) == [_PROBE]:
                return fmt
        except ToolFormatError:
            continue
    if 'name="probe_tool"' in text:
        return "xml"
    raise ChatTemplateError(f"no known tool-call format parses the template's call: {text[-300:]!r}")


def _xml_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def canonical_call_text(calls: list[Call]) -> str:
    """`calls` in the project's XML form (what rewards.tool_calls parses)."""
    return "".join("<tool_call>" + f'<invoke name="{c.name}">' + "".join(
        f'<parameter name="{k}">{_xml_value(v)}</parameter>' for k, v in c.arguments.items())
        + "</invoke></tool_call>" for c in calls)


def canonical_episode(turns: list[tuple[str, str | None]], fmt: str, final_answer: str | None = None) -> str:
    """An episode for the `tool` verifier: each `(assistant turn text, tool result or None)`
    with the calls of the turn's answer (its reasoning left out: engine.reasoning) parsed in
    `fmt` and written in the XML form, its result in `<tool_response>`, then the final
    answer (`final_answer`, default the last turn's answer text)."""
    from engine.reasoning import split_reasoning

    out = []
    for turn, result in turns:
        calls = parse_calls(split_reasoning(turn).answer, fmt)
        out.append(canonical_call_text(calls))
        if result is not None:
            out.append(f"<tool_response>{result}</tool_response>")
    out.append(final_answer if final_answer is not None else split_reasoning(turns[-1][0]).answer)
    return "".join(out)


def canonical_calls_in_text(text: str, fmt: str | None) -> str:
    """`text` (a decoded turn or episode) with each `hermes` `<tool_call>` block rewritten in
    the XML form the tool environment and verifier parse; a block that does not parse is
    left as written (the environment / verifier then report it). Formats whose markers are
    special tokens (llama3_json, deepseek, mistral) do not survive decoding without special
    tokens and are not rewritten here; `xml` and None return `text` unchanged."""
    if fmt != "hermes":
        return text

    def rewrite(m: re.Match) -> str:
        try:
            return canonical_call_text(_hermes(m.group(0)))
        except ToolFormatError:
            return m.group(0)

    return re.sub(r"<tool_call>(.*?)</tool_call>", rewrite, text, flags=re.DOTALL)


@dataclass(frozen=True)
class NativeTurn:
    """An assistant turn of a `TURN_END_FORMATS` family, read as a tool call."""
    calls: list[Call]  # [] when the markup does not parse (`error` says why)
    error: str | None
    reasoning: str  # the turn's text before its answer (closed reasoning block and markers), special tokens kept


def native_call_turn(text: str, fmt: str, opened: bool = False, markers=None) -> NativeTurn | None:
    """The tool call an assistant turn makes in a `TURN_END_FORMATS` format (`text`: the
    turn decoded with special tokens kept, its end-of-turn token included), or None when
    it makes none: a plain answer, or a call written inside reasoning that never closes
    (`opened`: the turn starts inside a block the prompt opened; engine.reasoning), which
    is not executed. Calls are read from the answer only. A call whose markup does not
    parse is a call with `error` set (the environment's place to say so)."""
    from engine.reasoning import DEFAULT_MARKERS, split_reasoning

    if fmt not in TURN_END_FORMATS:
        raise ValueError(f"native_call_turn: {fmt!r} is not one of {list(TURN_END_FORMATS)}")
    markers = markers or DEFAULT_MARKERS
    split = split_reasoning(text, opened=opened, markers=markers)
    if split.unfinished:
        return None
    close = text.rfind(markers.close)
    reasoning = text[:close + len(markers.close)] if close >= 0 else ""
    try:
        calls = parse_calls(split.answer, fmt)
    except ToolFormatError as exc:
        return NativeTurn([], str(exc), reasoning)
    return NativeTurn(calls, None, reasoning) if calls else None


def message_calls(calls: list[Call]) -> list[dict]:
    """`calls` as an assistant message's `tool_calls` (what chat templates render)."""
    return [{"type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)},
             **({"id": c.id} if c.id else {})} for c in calls]


def native_tool_rows(rows: list[dict], tokenizer, where: str) -> list[dict]:
    """`native_tool_row` of each row (`data.tool_calls: native`), for a tokenizer whose
    template writes tool calls (`tool_format_of`); else a ValueError naming `where`."""
    if any((r.get("reference") or {}).get("tools") for r in rows) and tool_format_of(tokenizer) is None:
        raise ValueError(f"{where}: data.tool_calls: native needs a chat template that renders assistant "
                         "tool_calls in a known format (hermes, llama3_json, deepseek, mistral, xml); this one "
                         "does not (use data.tool_calls: xml, or set model.chat_template)")
    return [native_tool_row(r, tokenizer) for r in rows]


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template writes the `tools=` it is given (DeepSeek-R1's does not)."""
    from engine.chat import render_text

    messages = [{"role": "user", "content": "hi"}]
    schema = {"type": "function", "function": {"name": _PROBE.name, "description": "",
                                               "parameters": {"type": "object", "properties": {}}}}
    return render_text(messages, tokenizer, True, tools=[schema]) != render_text(messages, tokenizer, True)


def native_tool_row(row: dict, tokenizer=None) -> dict:
    """A tool row in the native form (`data.tool_calls: native`): its tools (the
    reference's `tools` schemas) in `row["tools"]`, which the chat template renders through
    its `tools=` argument (engine.chat.row_template_kwargs), the system message that listed
    them in the XML form (engine.adapters.tools_system_text) removed, and each assistant
    message written as XML calls only (rewards.tool_calls) turned into a message with
    `tool_calls` and empty content, which the template writes in the family's own call
    syntax. With `tokenizer`, whose template ignores `tools=` (DeepSeek-R1), the system
    message listing the tools is kept, so the model still sees them. Other messages are
    kept as they are; a row whose reference lists no tools is returned unchanged. Raises ValueError naming the row and message when an assistant
    message mixes calls with other text or its calls do not parse."""
    from engine.adapters import tools_system_text
    from rewards.tool_calls import ToolCallParseError, parse_tool_calls

    reference = row.get("reference") or {}
    tools = reference.get("tools") if isinstance(reference, dict) else None
    if not tools:
        return row
    listing = tools_system_text(tools)
    keep_listing = tokenizer is not None and not template_renders_tools(tokenizer)
    messages = []
    for j, m in enumerate(row["messages"]):
        if m.get("role") == "system" and m.get("content") == listing and not keep_listing:
            continue
        content = m.get("content")
        if m.get("role") == "assistant" and isinstance(content, str) and "<tool_call>" in content:
            where = f"row {row.get('id')!r} messages[{j}]"
            try:
                calls = [Call(c.name, dict(c.arguments)) for c in parse_tool_calls(content, tools)]
            except ToolCallParseError as exc:
                raise ValueError(f"{where}: its tool calls do not parse: {exc}") from None
            if re.sub(r"<tool_call>.*?</tool_call>", "", content, flags=re.DOTALL).strip():
                raise ValueError(f"{where}: an assistant message with tool calls must hold only the calls, "
                                 f"got {content[:120]!r}")
            m = {**{k: v for k, v in m.items() if k != "content"}, "content": "", "tool_calls": message_calls(calls)}
        messages.append(m)
    return {**row, "messages": messages, "tools": list(tools)}


_FORMAT_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tool_format_of(tokenizer) -> str | None:
    """`detect_tool_format`, cached per tokenizer object; None where the template renders
    no tool calls."""
    from engine.chat import ChatTemplateError

    if tokenizer not in _FORMAT_CACHE:
        try:
            _FORMAT_CACHE[tokenizer] = detect_tool_format(tokenizer)
        except (ChatTemplateError, ValueError):
            _FORMAT_CACHE[tokenizer] = None
    return _FORMAT_CACHE[tokenizer]
