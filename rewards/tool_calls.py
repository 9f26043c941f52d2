"""Parse the XML tool-call format shared by the chat template, the environment and `tool`.

    <tool_call><invoke name="NAME"><parameter name="ARG">VALUE</parameter>...</invoke>...</tool_call>

Several `invoke`s may share one block; only whitespace may sit between elements. VALUE
is plain text for string parameters and JSON otherwise: with a schema the declared type
decides; without one a VALUE that parses as JSON is decoded, anything else stays text.
`<tool_response>` blocks are ignored (tool output is not the model's call). No side
effects on import; the environment reuses `parse_tool_calls` to execute calls.

Blocks are cut out with `str.find` (`_blocks`), not a `<tag>(.*?)</tag>` regex: the
regex rescans to the end of the text from every unclosed open tag, which is quadratic
(20k unclosed `<tool_call>`, ~1 MB, took 221 s inside a rollout); the scanner is linear.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

_NON_SPACE_RE = re.compile(r"\S")
_INVOKE_RE = re.compile(r'\s*<invoke name="([^"<>]+)">(.*?)</invoke>\s*', re.DOTALL)
_JSON_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)  # a string runs on to the end if unclosed
MAX_VALUE_DEPTH = 64
_PARAM_RE = re.compile(r'\s*<parameter name="([^"<>]+)">(.*?)</parameter>\s*', re.DOTALL)


class ToolCallParseError(ValueError):
    """Malformed tool-call markup; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def tool_param_types(tools: list[dict] | None) -> dict[str, dict[str, str]]:
    """{tool name: {param: JSON-schema type}} from OpenAI-style or bare function schemas."""
    out: dict[str, dict[str, str]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool)
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn["name"]] = {k: v.get("type", "") for k, v in props.items() if isinstance(v, dict)}
    return out


def json_too_deep(text: str, limit: int = MAX_VALUE_DEPTH) -> bool:
    """Whether JSON `text` nests `[`/`{` deeper than `limit` (brackets in strings do not
    count); one linear pass, stopping at the first level past `limit`."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _JSON_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > limit:
                return True
        elif tok in "]}":
            depth -= 1
    return False


def decode_value(raw: str, json_type: str | None) -> Any:
    """`raw` decoded as JSON (text for string parameters and for what is not JSON);
    JSON nested deeper than MAX_VALUE_DEPTH is a ToolCallParseError, not a value that
    every later `==`, `repr` and `json.dumps` of it must survive."""
    if json_type == "string":
        return raw
    if json_too_deep(raw):
        raise ToolCallParseError(f"value nested deeper than {MAX_VALUE_DEPTH} levels")
    try:
        return json.loads(raw.strip())
    except (ValueError, RecursionError):
        return raw


def _parse_params(body: str, where: str, types: dict[str, str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    pos = 0
    while _NON_SPACE_RE.search(body, pos):
        m = _PARAM_RE.match(body, pos)
        if m is None:
            raise ToolCallParseError(f"{where}: expected <parameter name=\"...\">, got {body[pos:pos + 40]!r}")
        name = m.group(1)
        if name in args:
            raise ToolCallParseError(f"{where}: parameter {name!r} given twice")
        try:
            args[name] = decode_value(m.group(2), types.get(name))
        except ToolCallParseError as exc:
            raise ToolCallParseError(f"{where}, parameter {name!r}: {exc}") from None
        pos = m.end()
    return args


def _parse_block(block: str, b: int, types: dict[str, dict[str, str]]) -> list[ToolCall]:
    calls, pos = [], 0
    while _NON_SPACE_RE.search(block, pos):
        m = _INVOKE_RE.match(block, pos)
        if m is None:
            raise ToolCallParseError(f"tool_call block {b}: expected <invoke name=\"...\">, got {block[pos:pos + 40]!r}")
        where = f"tool_call block {b}, invoke {m.group(1)!r}"
        calls.append(ToolCall(m.group(1), _parse_params(m.group(2), where, types.get(m.group(1), {}))))
        pos = m.end()
    if not calls:
        raise ToolCallParseError(f"tool_call block {b} has no <invoke>")
    return calls


def _blocks(text: str, open_tag: str, close_tag: str) -> tuple[list[str], list[str]]:
    """(bodies of `open_tag...close_tag` blocks, the text outside them), in one linear pass:
    each block ends at the first `close_tag` after its open tag (as `(.*?)` would); an open
    tag with no close after it stays in the outside text, and so does the rest."""
    bodies, outside, pos = [], [], 0
    while (start := text.find(open_tag, pos)) != -1:
        end = text.find(close_tag, start + len(open_tag))
        if end == -1:
            break
        outside.append(text[pos:start])
        bodies.append(text[start + len(open_tag):end])
        pos = end + len(close_tag)
    outside.append(text[pos:])
    return bodies, outside


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> list[ToolCall]:
    """Every call in `text`, in order; raises ToolCallParseError on malformed markup."""
    text = "".join(_blocks(text, "<tool_response>", "</tool_response>")[1])
    opens, closes = text.count("<tool_call>"), text.count("</tool_call>")
    if opens != closes:
        raise ToolCallParseError(f"unbalanced tool_call tags: {opens} <tool_call>, {closes} </tool_call>")
    blocks = _blocks(text, "<tool_call>", "</tool_call>")[0]
    if opens != len(blocks):  # nested or out of order: `<tool_call><tool_call>..</tool_call></tool_call>`
        raise ToolCallParseError(f"unbalanced tool_call tags: {opens} <tool_call>, {closes} </tool_call>")
    types = tool_param_types(tools)
    return [c for b, block in enumerate(blocks) for c in _parse_block(block, b, types)]


def try_parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[list[ToolCall], str | None]:
    """(calls, None) or ([], reason): never raises on any input text."""
    try:
        return parse_tool_calls(text, tools), None
    except ToolCallParseError as exc:
        return [], str(exc)


def final_answer(text: str) -> str:
    """The text after the last `</tool_call>` or `</tool_response>`, stripped."""
    cut = max(text.rfind("</tool_call>") + len("</tool_call>") if "</tool_call>" in text else 0,
              text.rfind("</tool_response>") + len("</tool_response>") if "</tool_response>" in text else 0)
    return text[cut:].strip()
