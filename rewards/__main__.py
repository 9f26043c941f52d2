"""`python -m rewards score VERIFIER INPUT.jsonl [-o OUTPUT.jsonl]`.

Each input line: `{"completion": str, "reference": {...}}`; each output line is the input
plus `score` and `info`. Malformed lines are reported on stderr with their line number
and skipped; the rest are scored (in worker processes) and written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def read_rows(path: str) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                problems.append(f"{path}:{n}: not JSON ({exc})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("completion"), str) or not isinstance(row.get("reference"), dict):
                problems.append(f"{path}:{n}: needs a string 'completion' and an object 'reference'")
                continue
            rows.append(row)
    return rows, problems


def write_atomic(path: str, lines: list[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
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
    score.add_argument("--timeout", type=float, default=30.0, help="per-item seconds")
    args = parser.parse_args(argv)

    from rewards.batch import score_batch

    rows, problems = read_rows(args.input)
    for p in problems:
        print(p, file=sys.stderr)
    results = score_batch(args.verifier, [r["completion"] for r in rows], [r["reference"] for r in rows],
                          num_workers=args.workers, timeout_s=args.timeout) if rows else []
    lines = [json.dumps({**row, "score": res.score, "info": res.info}, default=str) for row, res in zip(rows, results)]
    if args.output:
        write_atomic(args.output, lines)
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))
    mean = sum(r.score for r in results) / len(results) if results else 0.0
    print(f"scored {len(rows)} rows ({len(problems)} malformed skipped), mean score {mean:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
