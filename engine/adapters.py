"""Adapters: one record of a public dataset -> one row of ours (docs/CONTRACTS.md).

An adapter is `(record: dict, *, domain: str, default_id: str) -> row`; it raises
ValueError/KeyError/TypeError on a record it cannot convert, and `engine.data` reports
that record with its file and line. Registered adapters:
- `gsm8k`: `{question, answer: "...\\n#### 42"}`; the rationale (calculator annotations
  `<<6*7=42>>` removed) + `\\boxed{42}` becomes the demonstration.
- `math`: `{problem, solution}` (Hendrycks MATH); the answer is the last `\\boxed{}`
  of the solution, which is the demonstration.
- `mbpp`: `{text, code, test_list, test_setup_code, task_id}`; the prompt shows the
  task and its first test (MBPP's convention: it names the function), all tests are
  the hidden reference.
- `ifeval`: `{key, prompt, instruction_id_list, kwargs}`; no demonstration (IFEval is
  an evaluation set); `None`-valued kwargs (HF's Arrow padding) are dropped.
- `xlam`: `{id, query, tools, answers}` (Salesforce xlam-function-calling-60k; `tools`
  and `answers` may be JSON strings); tools are converted to JSON-schema functions and
  listed in a system message, the answers become the XML tool-call demonstration
  (`data.tool_calls: native` turns such rows into native ones: engine.tool_formats.native_tool_row).
Records already in our row format pass through `row` unchanged.

Each built-in adapter lists the record fields it reads (`adapter_fields`): `required`,
`optional`, and whether its rows carry a demonstration. `data.fields` renames a
dataset's own columns to those names before the adapter sees the record
(`map_fields`): `{question: problem, answer: solution}` reads a GSM8K-format file whose
columns are `problem`/`solution`. An adapter may also be `package.module:function`, the
user's own, with the same signature (engine.plugins).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from engine.registry import Registry

Adapter = Callable[..., dict]
ADAPTERS: Registry[Adapter] = Registry("adapter", imports=True)
register_adapter = ADAPTERS.register
get_adapter = ADAPTERS.get
known_adapters = ADAPTERS.names


def declare_fields(required: tuple[str, ...], optional: tuple[str, ...] = (), demonstrations: bool | None = None):
    """Record what an adapter reads: its `required` and `optional` record fields, and
    whether its rows carry a demonstration (None: it depends on the record)."""
    def mark(fn: Adapter) -> Adapter:
        fn.required_fields, fn.optional_fields, fn.demonstrations = tuple(required), tuple(optional), demonstrations
        return fn

    return mark


def adapter_fields(adapter: str | None) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(required, optional) record fields of a built-in adapter (None: `row`); None for a
    user adapter that does not declare them (`required_fields` / `optional_fields`)."""
    fn = get_adapter(adapter or "row")
    if not hasattr(fn, "required_fields"):
        return None
    return fn.required_fields, getattr(fn, "optional_fields", ())


def adapter_demonstrations(adapter: str | None) -> bool | None:
    """Whether `adapter`'s rows carry a demonstration: True, False, or None (unknown)."""
    return getattr(get_adapter(adapter or "row"), "demonstrations", None)


class MissingField(KeyError):
    """A record without a field the adapter (or `data.fields`) needs."""

    def __init__(self, field: str, record: dict, mapped_from: str | None = None):
        super().__init__(field)
        self.field, self.mapped_from = field, mapped_from
        self.have = sorted(map(str, record)) if isinstance(record, dict) else []

    def __str__(self) -> str:
        have = ", ".join(self.have[:20]) + (", ..." if len(self.have) > 20 else "")
        if self.mapped_from is not None:
            return (f"missing field {self.field!r} (data.fields maps it to {self.mapped_from!r}); "
                    f"the record has: {have}")
        return (f"missing field {self.field!r}; the record has: {have} "
                f"(map one of them with data.fields: {{{self.field}: <your field>}})")


def map_fields(record: Any, fields: dict[str, str] | None) -> Any:
    """`record` with `fields` ({adapter's field: the dataset's field}) renamed; a source
    field the record lacks is a MissingField. Renamed source fields are dropped."""
    if not fields or not isinstance(record, dict):
        return record
    out = {k: v for k, v in record.items() if k not in fields.values() or k in fields}
    for target, source in fields.items():
        if source not in record:
            raise MissingField(source, record, mapped_from=target)
        out[target] = record[source]
    return out


def convert(adapter: Adapter, record: Any, fields: dict[str, str] | None, **kw) -> dict:
    """`adapter(map_fields(record, fields), **kw)`, a missing field as MissingField."""
    record = map_fields(record, fields)
    try:
        return adapter(record, **kw)
    except MissingField:
        raise
    except KeyError as exc:
        field = exc.args[0] if exc.args else None
        if isinstance(field, str) and isinstance(record, dict) and field not in record:
            raise MissingField(field, record) from None
        raise


def _text(record: dict, field: str) -> str:
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {field!r} must be a non-empty string, got {value!r:.60}")
    return value


def _row(record: dict, domain: str, default_id: str, messages: list[dict], reference: dict, id_field: str | None) -> dict:
    rid = record.get(id_field) if id_field else None
    return {"id": str(rid) if rid not in (None, "") else default_id, "domain": domain,
            "messages": messages, "reference": reference}


@register_adapter("row")
@declare_fields(("id", "domain", "messages", "reference"), demonstrations=None)
def row(record: dict, *, domain: str = "", default_id: str = "") -> dict:
    return record


@register_adapter("gsm8k")
@declare_fields(("question", "answer"), ("id",), demonstrations=True)
def gsm8k(record: dict, *, domain: str = "math", default_id: str = "") -> dict:
    question, answer = _text(record, "question"), _text(record, "answer")
    if "####" not in answer:
        raise ValueError("GSM8K answer has no '#### <final answer>' line")
    rationale, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not final:
        raise ValueError("GSM8K answer is empty after '####'")
    rationale = re.sub(r"<<[^<>]*>>", "", rationale).strip()
    demo = f"{rationale}\n\\boxed{{{final}}}" if rationale else f"\\boxed{{{final}}}"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": demo}]
    return _row(record, domain or "math", default_id, messages, {"answer": final}, "id")


@register_adapter("math")
@declare_fields(("problem", "solution"), ("unique_id",), demonstrations=True)
def hendrycks_math(record: dict, *, domain: str = "math", default_id: str = "") -> dict:
    from rewards.math_reward import extract_boxed

    problem, solution = _text(record, "problem"), _text(record, "solution")
    answer = extract_boxed(solution)
    if not answer:
        raise ValueError("MATH solution has no balanced \\boxed{...} answer")
    messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
    return _row(record, domain or "math", default_id, messages, {"answer": answer}, "unique_id")


def _str_list(record: dict, field: str) -> list[str]:
    value = record[field]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"field {field!r} must be a non-empty list of strings, got {value!r:.60}")
    return value


@register_adapter("mbpp")
@declare_fields(("text", "code", "test_list"), ("test_setup_code", "task_id"), demonstrations=True)
def mbpp(record: dict, *, domain: str = "code", default_id: str = "") -> dict:
    text, code, tests = _text(record, "text"), _text(record, "code"), _str_list(record, "test_list")
    prompt = f"{text}\nYour code should pass this test:\n{tests[0]}"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"```python\n{code}\n```"}]
    reference: dict[str, Any] = {"tests": list(tests)}
    setup = record.get("test_setup_code") or ""
    if setup.strip():
        reference["setup"] = setup
    rid = record.get("task_id")
    return _row({"id": f"mbpp-{rid}" if rid is not None else None}, domain or "code", default_id, messages, reference, "id")


@register_adapter("ifeval")
@declare_fields(("prompt", "instruction_id_list"), ("kwargs", "key"), demonstrations=False)
def ifeval(record: dict, *, domain: str = "ifeval", default_id: str = "") -> dict:
    prompt, ids = _text(record, "prompt"), _str_list(record, "instruction_id_list")
    kwargs = record.get("kwargs") or [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"kwargs must be a list of {len(ids)} objects (one per instruction id)")
    kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in kwargs]
    key = record.get("key")
    return _row({"id": f"ifeval-{key}" if key is not None else None}, domain or "ifeval", default_id,
                [{"role": "user", "content": prompt}], {"instruction_id_list": list(ids), "kwargs": kwargs}, "id")


_PY_TO_JSON = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
               "list": "array", "dict": "object", "tuple": "array", "set": "array", "any": ""}


def json_type(py_type: str) -> str:
    """xlam's Python-ish type (`"List[int]"`, `"str, optional"`) -> a JSON-schema type ('' if unknown)."""
    base = py_type.split(",")[0].strip().lower()
    base = re.sub(r"^(optional|typing\.)\[?", "", base).split("[")[0].strip("] ")
    return _PY_TO_JSON.get(base, "")


def xlam_schema(tool: dict) -> dict:
    """One xlam tool `{name, description, parameters: {arg: {type, description, default}}}`
    as an OpenAI-style function schema."""
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise ValueError(f"tool must be an object with a 'name', got {tool!r:.60}")
    props, required = {}, []
    for arg, spec in (tool.get("parameters") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        py_type = str(spec.get("type", ""))
        prop = {"description": spec.get("description", "")}
        if json_type(py_type):
            prop["type"] = json_type(py_type)
        props[arg] = prop
        if "optional" not in py_type.lower() and "default" not in spec:
            required.append(arg)
    return {"type": "function", "function": {"name": tool["name"], "description": tool.get("description", ""),
                                             "parameters": {"type": "object", "properties": props, "required": required}}}


def _json_field(record: dict, field: str) -> list:
    value = record[field]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"field {field!r} is a string but not JSON: {exc.msg}") from None
    if not isinstance(value, list):
        raise ValueError(f"field {field!r} must be a list, got {type(value).__name__}")
    return value


def xml_calls(calls: list[dict]) -> str:
    """Answers `[{name, arguments}]` as one `<tool_call>` block; strings raw, the rest JSON."""
    invokes = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(call.get("arguments", {}), dict):
            raise ValueError(f"answer must be {{name: str, arguments: object}}, got {call!r:.60}")
        params = "".join(f'<parameter name="{k}">{v if isinstance(v, str) else json.dumps(v)}</parameter>'
                         for k, v in call.get("arguments", {}).items())
        invokes.append(f'<invoke name="{call["name"]}">{params}</invoke>')
    return "<tool_call>" + "".join(invokes) + "</tool_call>"


def tools_system_text(tools: list[dict]) -> str:
    """The system message that lists `tools` (schemas) in the project's XML tool format
    (`data.tool_calls: xml`); a native row gives them to the template instead
    (engine.tool_formats.native_tool_row)."""
    return "You can call these tools:\n" + json.dumps([t["function"] for t in tools], ensure_ascii=False)


@register_adapter("xlam")
@declare_fields(("query", "tools", "answers"), ("id",), demonstrations=True)
def xlam(record: dict, *, domain: str = "tool", default_id: str = "") -> dict:
    query = _text(record, "query")
    tools = [xlam_schema(t) for t in _json_field(record, "tools")]
    answers = _json_field(record, "answers")
    if not answers:
        raise ValueError("field 'answers' is empty")
    calls = [{"name": a["name"], "arguments": a.get("arguments", {})} for a in answers if isinstance(a, dict) and "name" in a]
    messages = [{"role": "system", "content": tools_system_text(tools)}, {"role": "user", "content": query},
                {"role": "assistant", "content": xml_calls(answers)}]
    return _row(record, domain or "tool", default_id, messages, {"calls": calls, "tools": tools}, "id")
