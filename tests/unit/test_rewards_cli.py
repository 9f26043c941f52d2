"""`python -m rewards score`: malformed lines reported by line number and skipped."""

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
    assert f"{src}:2: not JSON" in proc.stderr and f"{src}:3: needs a string 'completion'" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, 0.0]
    assert rows[0]["info"]["rule"] == "boxed" and rows[1]["reference"] == {"answer": "5"}
