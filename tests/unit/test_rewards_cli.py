"""`python -m rewards score`: malformed lines reported by line number and kept as rows scored 0
with an `error` (rows in == rows out; the full battery is tests/reliability/test_scorer_rows.py)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cli_scores_good_lines_and_reports_bad_ones(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"completion": r"\boxed{0.50}", "reference": {"answer": "1/2"}}) + "\n"
        + "{not json\n"
        + json.dumps({"completion": 3, "reference": {}}) + "\n"
        + "\n"
        + json.dumps({"completion": "the answer is 4", "reference": {"answer": "5"}}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "rewards", "score", "math", str(src), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{src}:2: bad input: not JSON" in proc.stderr
    assert f"{src}:3: bad input: needs a string 'completion'" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, 0.0, 0.0, 0.0]  # the blank line 4 is no row
    assert [r.get("line") for r in rows] == [None, 2, 3, None] and "error" not in rows[0] and "error" not in rows[3]
    assert rows[1]["input"] == "{not json" and rows[1]["error"].startswith("bad input: not JSON")
    assert rows[0]["info"]["rule"] == "boxed" and rows[3]["reference"] == {"answer": "5"}
