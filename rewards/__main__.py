"""`python -m rewards score VERIFIER INPUT.jsonl [-o OUTPUT.jsonl]`.

Each input line: `{"completion": str, "reference": {...}}`; each output line is the input
plus `score` and `info`. Rows in == rows out, in order: every non-blank input line gives
one output line, whatever it holds. A line that is not UTF-8, not JSON, nested too deeply
or not of that shape, a reference the verifier cannot use, a verifier that raises, a
worker that crashes or times out: that row scores 0 and carries an `error` field (a bad
line is written as `{"line": N, "input": its first 200 characters, "score": 0, "info",
"error"}`), and is counted on stderr. Only a verifier name that does not exist is a
usage error (exit 2, nothing written). The output is written atomically.

`--answer-only` scores what training and eval score: the completion's answer, its
`<think>` reasoning removed (engine.reasoning; `--reasoning-markers OPEN CLOSE` for a model
with other markers); `--reasoning-opened` when the prompt already opened the block; a
reasoning that never closes scores 0 ("unfinished reasoning").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from engine.atomic import current_umask


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """(row, None) or (None, why the line is not a row)."""
    from rewards.batch import MAX_TASK_DEPTH, nested_deeper_than

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc})"
    try:
        row = json.loads(text)
    except RecursionError:
        return None, "not JSON (nested too deeply to parse)"
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(row, dict) or not isinstance(row.get("completion"), str) or not isinstance(row.get("reference"), dict):
        return None, "needs a string 'completion' and an object 'reference'"
    if nested_deeper_than(row, MAX_TASK_DEPTH):  # refused, not echoed: not every reader could load it
        return None, f"nested deeper than {MAX_TASK_DEPTH} levels"
    return row, None


def read_input_lines(path: str) -> list[tuple[int, bytes, dict | None, str | None]]:
    """(line number, the line if it is no row else b"", row or None, problem or None) for
    every non-blank line."""
    out = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if raw.strip():
                row, problem = _parse_line(raw.rstrip(b"\r\n"))
                out.append((n, raw if problem else b"", row, problem))
    return out


def _reference_problem(verifier: str, reference: dict) -> str | None:
    from rewards.registry import check_reference

    try:
        return check_reference(verifier, reference)
    except Exception as exc:  # a check that trips on a strange reference: still this row's problem
        return f"{type(exc).__name__}: {exc}"


def score_rows(verifier: str, lines: list, workers: int | None, timeout: float | None, answer_only: bool = False,
               reasoning_opened: bool = False, markers: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """One output row per entry of `read_input_lines`, in order; with `answer_only` the
    verifier reads each completion's answer (engine.reasoning.split_reasoning)."""
    from rewards.batch import score_batch
    from rewards.failures import BAD_INPUT, scoring_failure

    out: list[dict[str, Any] | None] = [None] * len(lines)
    todo = []
    for k, (n, raw, row, problem) in enumerate(lines):
        if row is not None and problem is None:
            ref_problem = _reference_problem(verifier, row["reference"])
            if ref_problem is None:
                todo.append(k)
                continue
            out[k] = {**row, "score": 0.0}
            problem = f"reference: {ref_problem}"
        else:
            out[k] = {"line": n, "input": raw.decode("utf-8", "replace").strip()[:200], "score": 0.0}
        reason = f"{BAD_INPUT}: {problem}"
        out[k].update(info={"reason": reason}, error=reason)
    if answer_only:
        from engine.reasoning import DEFAULT_MARKERS, UNFINISHED, ReasoningMarkers, split_reasoning

        m = ReasoningMarkers(*markers) if markers else DEFAULT_MARKERS
        splits = {k: split_reasoning(lines[k][2]["completion"], opened=reasoning_opened, markers=m) for k in todo}
        for k in [k for k in todo if splits[k].unfinished]:
            out[k] = {**lines[k][2], "score": 0.0, "info": {"reason": UNFINISHED}}
        todo = [k for k in todo if not splits[k].unfinished]
        answers = [splits[k].answer for k in todo]
    else:
        answers = [lines[k][2]["completion"] for k in todo]
    results = score_batch(verifier, answers, [lines[k][2]["reference"] for k in todo],
                          num_workers=workers, timeout_s=timeout) if todo else []
    for k, res in zip(todo, results):
        out[k] = {**lines[k][2], "score": res.score, "info": res.info}
        failure = scoring_failure(res.info)
        if failure:
            out[k]["error"] = failure
    return out  # type: ignore[return-value]


def write_atomic(path: str, lines: list[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            fh.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards")
    sub = parser.add_subparsers(dest="cmd", required=True)
    score = sub.add_parser("score", help="score a JSONL file of completions")
    score.add_argument("verifier")
    score.add_argument("input")
    score.add_argument("-o", "--output", help="output JSONL (default: stdout)")
    score.add_argument("--workers", type=int, default=None)
    score.add_argument("--timeout", type=float, default=None,
                       help="per-item seconds (default: the verifier's own, rewards.batch.ITEM_TIMEOUT_S)")
    score.add_argument("--answer-only", action="store_true",
                       help="score the answer only (<think> reasoning removed), as training and eval do")
    score.add_argument("--reasoning-opened", action="store_true",
                       help="with --answer-only: the prompt opened the reasoning block (e.g. DeepSeek-R1)")
    score.add_argument("--reasoning-markers", nargs=2, metavar=("OPEN", "CLOSE"), default=None,
                       help="with --answer-only: the model's reasoning markers (default <think> </think>)")
    args = parser.parse_args(argv)
    if args.reasoning_markers:
        from engine.reasoning import ReasoningMarkers

        try:
            ReasoningMarkers(*args.reasoning_markers)
        except ValueError as exc:
            parser.error(f"--reasoning-markers: {exc}")

    from rewards.registry import get_verifier

    try:
        get_verifier(args.verifier)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    lines = read_input_lines(args.input)
    rows = score_rows(args.verifier, lines, args.workers, args.timeout, args.answer_only, args.reasoning_opened,
                      args.reasoning_markers)
    out = [json.dumps(row, default=str) for row in rows]
    for (n, *_), row in zip(lines, rows):
        if "error" in row:
            print(f"{args.input}:{n}: {row['error'][:300]}", file=sys.stderr)
    if args.output:
        write_atomic(args.output, out)
    else:
        sys.stdout.write("".join(line + "\n" for line in out))
    errors = sum(1 for row in rows if "error" in row)
    mean = sum(row["score"] for row in rows) / len(rows) if rows else 0.0
    print(f"scored {len(rows)} rows ({errors} with an error, scored 0), mean score {mean:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
