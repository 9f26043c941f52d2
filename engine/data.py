"""Row files: write JSONL atomically; read JSONL/parquet with row-by-row validation.

A row is `{"id", "domain", "messages", "reference"}` (docs/CONTRACTS.md). `read_rows`
checks every row and records each bad one with its file and line (parquet: row number):
not UTF-8, not JSON, not an object, a missing or mistyped field, an unknown role, an
empty prompt, a prompt over `max_prompt_tokens`, a duplicate id, an adapter that
rejects the record, or a reference the domain's verifier rejects (`check_reference`). `on_bad_row="skip"` drops them (and logs a summary),
`on_bad_row="error"` raises `DataError` listing them all.

Departure from a plain `datasets.load_dataset("json")`: JSONL is parsed line by line
with the standard library, because Arrow would (a) fail the whole file on its first bad
line, with no line number, and (b) unify heterogeneous `reference` dicts into one
struct, filling missing keys with nulls, which changes tool-call arguments and IFEval
kwargs. Parquet (already a table) is read through `datasets.load_dataset("parquet")`;
`as_dataset` turns validated rows into a `datasets.Dataset` with `reference` stored as
a JSON string so it round-trips unchanged. A `datasets` source (`{path, name, split,
data_files}`: a hub id, a builder over local files, or a `save_to_disk` directory) is read
with `datasets.load_dataset` / `load_from_disk`, row by row through the same adapters and
checks; that is how a hub dataset (GSM8K, MBPP, IFEval, xLAM) is used as it is published.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.atomic import atomic_write_text

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")
POLICIES = ("skip", "error")


class DataError(ValueError):
    """Bad rows under `on_bad_row="error"`; the message lists each with file and line."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    file: str
    line: int  # 1-based line (JSONL) or row number (parquet)
    reason: str
    record: Any = dataclasses.field(default=None, compare=False, repr=False)  # as read (None: unreadable)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason, "record": self.record}


@dataclasses.dataclass
class LoadResult:
    rows: list[dict]
    bad: list[BadRow]

    def summary(self) -> str:
        return f"{len(self.rows)} rows kept, {len(self.bad)} bad"


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Validate `rows` and write them one per line, atomically (temporary name + rename)."""
    for i, row in enumerate(rows):
        reason = row_problem(row)
        if reason:
            raise DataError(f"write_jsonl {path}: row {i} (id {row.get('id') if isinstance(row, dict) else None!r}): {reason}")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(path, text)
    return Path(path)


def _prompt_length(messages: list[dict], tokenizer, tools: list | None = None) -> int:
    """Prompt length in tokens (with a native row's `tools` rendered by the template), or
    in characters of its contents without a tokenizer (for the character-level tiny
    tokenizer this is within a few role tokens)."""
    from engine.chat import prompt_messages, render_prompt

    if tokenizer is not None:
        return len(render_prompt(messages, tokenizer, **({"tools": tools} if tools is not None else {})))
    return sum(len(m["content"]) for m in prompt_messages(messages))


def _message_problem(m: Any) -> str | None:
    """What is wrong with one message (after `messages[j]`), naming its field and what the
    message holds (keys read as null, Arrow's padding in parquet and `datasets`, left out)."""
    if not isinstance(m, dict):
        return f" must be an object {{role, content}}, got {type(m).__name__} {m!r:.60}"
    have = ", ".join(sorted(str(k) for k, v in m.items() if v is not None)) or "no fields"
    if m.get("role") not in ROLES:
        return f".role must be one of {list(ROLES)}, got {m.get('role')!r:.40}; the message has: {have}"
    if not isinstance(m.get("content"), str):
        return f".content must be a string, got {m.get('content')!r:.40}; the message has: {have}"
    return None


def row_problem(row: Any, max_prompt_tokens: int | None = None, tokenizer=None) -> str | None:
    """Why `row` is not a valid row, or None."""
    if not isinstance(row, dict):
        return f"row must be a JSON object, got {type(row).__name__}"
    for field, kind in (("id", str), ("domain", str), ("messages", list), ("reference", dict)):
        if field not in row:
            return f"missing field {field!r}"
        if not isinstance(row[field], kind):
            return f"field {field!r} must be {kind.__name__}, got {type(row[field]).__name__}"
    if not row["id"]:
        return "empty id"
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return f"field 'tools' must be a list of tool schemas (objects), got {tools!r:.80}"
    for j, m in enumerate(row["messages"]):
        problem = _message_problem(m)
        if problem:
            return f"messages[{j}]{problem}"
    prompt = []
    for m in row["messages"]:
        if m["role"] == "assistant":
            break
        prompt.append(m)
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        return "empty prompt (no non-blank user message before the first assistant message)"
    if max_prompt_tokens is not None:
        n = _prompt_length(row["messages"], tokenizer, row.get("tools"))
        if n > max_prompt_tokens:
            return f"prompt too long: {n} > max_prompt_tokens={max_prompt_tokens}"
    return None


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record, problem) for each non-blank line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"bad JSON: {exc.msg} (column {exc.colno})"
            except RecursionError:  # has no .msg/.colno
                yield lineno, None, "bad JSON: nested too deeply"


def _parquet_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import tempfile

    from datasets import load_dataset

    # Held in memory, prepared in a throw-away cache: nothing written under ~/.cache.
    with tempfile.TemporaryDirectory(prefix="rows-parquet-") as cache:
        table = load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True)
    for i, record in enumerate(table, start=1):
        if isinstance(record.get("reference"), str):
            try:
                record = {**record, "reference": json.loads(record["reference"])}
            except json.JSONDecodeError as exc:
                yield i, None, f"reference is a string but not JSON: {exc.msg}"
                continue
        yield i, record, None


def _records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    if path.suffix == ".parquet":
        return _parquet_records(path)
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_records(path)
    raise ValueError(f"{path}: unsupported row file type {path.suffix!r}; use .jsonl or .parquet")


def _hf_records(source: dict) -> Iterator[tuple[int, Any, str | None]]:
    """Records of a `datasets` source `{path, name, split, data_files}`: a hub id (online, or
    from the local cache offline), a builder with local `data_files` (json, parquet, csv),
    or a directory written by `Dataset.save_to_disk`."""
    import datasets

    path = source["path"]
    if (Path(path) / "dataset_info.json").is_file() or (Path(path) / "state.json").is_file():
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            table = table[source.get("split") or "train"]
    else:
        table = datasets.load_dataset(path, source.get("name"), split=source.get("split") or "train",
                                      data_files=source.get("data_files"))
    for i, record in enumerate(table, start=1):
        yield i, record, None


def hf_label(source: dict) -> str:
    """How rows of a `datasets` source are named in errors: `hf:path[name][split]`."""
    name = f"[{source['name']}]" if source.get("name") else ""
    files = source.get("data_files")
    files = f"({', '.join([files] if isinstance(files, str) else files)})" if files else ""
    return f"hf:{source['path']}{files}{name}[{source.get('split') or 'train'}]"


def read_rows(path: str | os.PathLike | dict, *, adapter: str | Callable[..., dict] | None = None,
              domain: str | None = None, max_prompt_tokens: int | None = None, tokenizer=None,
              check_reference: Callable[[dict], str | None] | None = None,
              fields: dict[str, str] | None = None, limit: int | None = None) -> LoadResult:
    """Every valid row of `path` (after `fields` renames and `adapter`) and every bad one
    with its line. `path` is a JSONL/parquet file or a `datasets` source `{path, name,
    split, data_files}` (rows are then numbered from 1 within the split). `limit`: read
    only the first `limit` records (what `validate` looks at).
    `check_reference(reference) -> reason | None` (the domain verifier's own check,
    `rewards.check_reference`) makes a reference the verifier cannot use a bad row."""
    if isinstance(path, dict):
        files = path.get("data_files")
        first = files if isinstance(files, str) else (files or [path["path"]])[0]
        records, label, stem = _hf_records(path), hf_label(path), Path(str(first)).stem
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"row file not found: {path}")
        records, label, stem = _records(path), str(path), path.stem
    from engine.adapters import MissingField, convert, get_adapter, map_fields

    fn = None
    if adapter is not None:
        fn = get_adapter(adapter) if isinstance(adapter, str) else adapter
    rows, bad, ids = [], [], set()
    for n, (lineno, record, problem) in enumerate(records):
        if limit is not None and n >= limit:
            break
        raw = record
        if problem is None:
            try:
                if fn is not None:
                    record = convert(fn, record, fields, domain=domain or "", default_id=f"{stem}-{lineno}")
                else:
                    record = map_fields(record, fields)
            except MissingField as exc:
                problem = str(exc)
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"adapter rejected the record: {type(exc).__name__}: {exc}"
        if problem is None:
            problem = row_problem(record, max_prompt_tokens, tokenizer)
        if problem is None and check_reference is not None:
            problem = check_reference(record["reference"])
        if problem is None and record["id"] in ids:
            problem = f"duplicate id {record['id']!r}"
        if problem is not None:
            bad.append(BadRow(label, lineno, problem, raw))
            continue
        ids.add(record["id"])
        rows.append(record)
    return LoadResult(rows, bad)


def load_rows(path: str | os.PathLike | dict, *, on_bad_row: str = "skip", adapter=None, domain: str | None = None,
              max_prompt_tokens: int | None = None, tokenizer=None, check_reference=None,
              max_listed: int = 20) -> list[dict]:
    """The valid rows of `path`; bad rows are skipped (logged) or fatal, per `on_bad_row`."""
    if on_bad_row not in POLICIES:
        raise ValueError(f"on_bad_row must be one of {POLICIES}, got {on_bad_row!r}")
    result = read_rows(path, adapter=adapter, domain=domain, max_prompt_tokens=max_prompt_tokens, tokenizer=tokenizer,
                       check_reference=check_reference)
    if result.bad:
        message = bad_rows_message(path, result, max_listed)
        if on_bad_row == "error":
            raise DataError(message)
        log.warning("skipping %s", message)
    return result.rows


def bad_rows_message(path: str | os.PathLike | dict, result: LoadResult, max_listed: int = 20) -> str:
    """`<source>: <n> bad row(s) of <total>:` and the first `max_listed`, one per line."""
    listed = "\n  ".join(str(b) for b in result.bad[:max_listed])
    more = f"\n  ... and {len(result.bad) - max_listed} more" if len(result.bad) > max_listed else ""
    where = hf_label(path) if isinstance(path, dict) else path
    return f"{where}: {len(result.bad)} bad row(s) of {len(result.bad) + len(result.rows)}:\n  {listed}{more}"


def as_dataset(rows: list[dict]):
    """A `datasets.Dataset` of validated rows; `reference` is kept as a JSON string."""
    from datasets import Dataset

    return Dataset.from_list([{**r, "reference": json.dumps(r["reference"], sort_keys=True)} for r in rows])


def split_problem(kept: int, bad: int, max_bad_fraction: float) -> str | None:
    """Why a split of `kept` good and `bad` bad rows must stop the run, or None: it keeps
    no rows, or more than `max_bad_fraction` of its rows are bad."""
    total = kept + bad
    if kept == 0:
        return f"no rows kept ({bad} bad of {total})" if total else "no rows (the source is empty)"
    if bad > max_bad_fraction * total:
        return (f"{bad} bad rows of {total} ({100 * bad / total:.1f}%), more than "
                f"data.max_bad_fraction={max_bad_fraction:g}")
    return None


def bad_rows_summary(bad: list[BadRow], total: int, first: int = 3) -> str:
    """`"<n> bad of <total>; first: <file:line: reason>; ..."` for messages and notes."""
    listed = "; ".join(str(b) for b in bad[:first])
    return f"{len(bad)} bad of {total}" + (f"; first: {listed}" if listed else "")
