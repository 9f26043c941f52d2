"""Bad data rows: counted, reported with file and line, skipped or fatal per the config's
`on_bad_row` policy, and never a crash deep in training.

The policy is exercised through the `prepare` stage (what reads a domain's JSONL in a
real run), with a tiny model; row-level edge cases go through `engine.data.read_rows`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import yaml

from engine.data import DataError, load_rows, read_rows
from pipeline.config import load_config
from pipeline.rundir import RunDir
from pipeline.stages import StageUsageError, run_stage


def row(i: int, prompt: str = "What is 2 plus 2?", **over) -> dict:
    r = {"id": f"r{i}", "domain": "math", "messages": [{"role": "user", "content": prompt},
                                                        {"role": "assistant", "content": "4"}],
         "reference": {"answer": "4"}}
    r.update(over)
    return r


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


# line number -> (bytes of the line, what must appear in its reason); None = a good row
BAD_FILE = {
    1: (_line(row(0)), None),
    2: (b'{"id": "r1", "domain": "math", "messages": [', "bad JSON"),
    3: (b'{"id": "r2", "prompt": "caf\xe9"}', "not UTF-8"),
    4: (_line(row(3))[:-1] + b', "x": "\x00\x01"}', "bad JSON"),  # raw control characters in a string
    5: (_line({k: v for k, v in row(4).items() if k != "messages"}), "missing field 'messages'"),
    6: (_line(row(5, prompt=" \t ")), "empty prompt"),
    7: (_line(row(6, reference="4")), "field 'reference' must be dict"),
    8: (_line(row(7, messages=[{"role": "user", "content": 7}])), "messages[0].content must be a string, got 7"),
    9: (_line(row(0)), "duplicate id 'r0'"),
    10: (_line("just a string"), "row must be a JSON object"),
    11: (_line(row(10, prompt="ok \u2028 \ud7ff fine")), None),
    12: (_line(row(11))[:40], "bad JSON"),  # a truncated last line with no newline
}
GOOD_IDS = ["r0", "r10"]


def write_bad_file(path: Path) -> Path:
    lines = [BAD_FILE[i][0] for i in sorted(BAD_FILE)]
    path.write_bytes(b"\n".join(lines))  # no newline after the last (truncated) line
    return path


def _config(tmp: Path, policy: str) -> tuple[Path, object]:
    train = write_bad_file(tmp / "train.jsonl")
    eval_ = tmp / "eval.jsonl"
    eval_.write_text(json.dumps(row(100)) + "\n")
    raw = {"experiment": "baddata", "run_dir": str(tmp / "run"),
           "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                              "intermediate_size": 64}},
           "domains": [{"name": "math", "verifier": "math",
                        # every row kind at once (10 of 12 bad): over any real max_bad_fraction
                        "data": {"train": str(train), "eval": str(eval_), "on_bad_row": policy,
                                 "max_bad_fraction": 1.0}}]}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, load_config(path)


def test_skip_policy_counts_reports_and_keeps_only_good_rows(tmp_path, caplog, fault_log):
    path, cfg = _config(tmp_path, "skip")
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        manifest = run_stage(cfg, str(path), "prepare")
    assert manifest["status"] == "done"
    bad = [i for i, (_, why) in BAD_FILE.items() if why]
    assert f"{len(bad)} bad row(s) of {len(BAD_FILE)}" in caplog.text
    for i in bad:
        assert f"{tmp_path / 'train.jsonl'}:{i}: {BAD_FILE[i][1]}" in caplog.text, i
    assert manifest["metrics"]["rows"]["math"] == {"train": len(GOOD_IDS), "eval": 1}
    written = load_rows(RunDir(cfg.run_path).output("prepare", "data:math:train"), on_bad_row="error")
    assert [r["id"] for r in written] == GOOD_IDS
    assert written[1]["messages"][0]["content"] == "ok \u2028 \ud7ff fine"  # odd but valid text survives
    for i in bad:
        fault_log(f"bad row: {BAD_FILE[i][1]} (skip policy)", "detected")


def test_error_policy_is_fatal_listing_every_bad_line_before_any_training(tmp_path, fault_log):
    path, cfg = _config(tmp_path, "error")
    with pytest.raises(DataError) as info:
        run_stage(cfg, str(path), "prepare")
    bad = [i for i, (_, why) in BAD_FILE.items() if why]
    for i in bad:
        assert f"{tmp_path / 'train.jsonl'}:{i}: {BAD_FILE[i][1]}" in str(info.value), i
    run = RunDir(cfg.run_path)
    m = run.read_manifest("prepare")
    assert m["status"] == "failed" and "DataError" in m["error"]
    assert not (run.stage_dir("prepare") / "data" / "math" / "train.jsonl").exists()
    with pytest.raises(StageUsageError, match="needs prepare done"):  # nothing downstream can start
        run_stage(cfg, str(path), "sft:math")
    fault_log(f"{len(bad)} bad rows (error policy)", "detected")


def test_huge_row_is_counted_in_bounded_time(tmp_path, fault_log):
    path = tmp_path / "huge.jsonl"
    lines = [_line(row(0)), _line(row(1, prompt="x" * 5_000_000)), _line(row(2, prompt="\x07\x1b[2J" * 1000))]
    path.write_bytes(b"\n".join(lines) + b"\n")
    t0 = time.perf_counter()
    result = read_rows(path, max_prompt_tokens=512)
    assert time.perf_counter() - t0 < 20
    assert [b.line for b in result.bad] == [2, 3]
    assert result.bad[0].reason == "prompt too long: 5000000 > max_prompt_tokens=512"
    fault_log("5 MB prompt row", "detected")
    fault_log("terminal escape sequences in a prompt", "detected")


def test_deeply_nested_json_line_is_a_bad_row_not_a_crash(tmp_path, fault_log):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(_line(row(0)) + b"\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    result = read_rows(path)
    assert [b.line for b in result.bad] == [2]
    assert result.bad[0].reason == "bad JSON: nested too deeply"
    fault_log("JSON nested 100k deep in a data row", "detected")


def test_prepare_enforces_max_prompt_tokens(tmp_path, caplog, fault_log):
    path, cfg = _config(tmp_path, "skip")
    (tmp_path / "train.jsonl").write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1, prompt="y" * 2000)) + "\n")
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        manifest = run_stage(cfg, str(path), "prepare")
    assert manifest["metrics"]["rows"]["math"]["train"] == 1
    assert f"{tmp_path / 'train.jsonl'}:2: prompt too long" in caplog.text
    fault_log("2000-character prompt over max_prompt_tokens=512 (prepare)", "detected")


def test_reference_missing_verifier_fields_is_a_bad_row(tmp_path, fault_log):
    path, cfg = _config(tmp_path, "error")
    (tmp_path / "train.jsonl").write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1, reference={})) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: math reference must be a dict with an 'answer' field"):
        run_stage(cfg, str(path), "prepare")
    fault_log("math reference without 'answer'", "detected")


@pytest.mark.parametrize("verifier,good,bad,reason", [
    ("math", {"answer": "4"}, {"solution": "4"}, "math reference must be a dict with an 'answer' field"),
    ("code", {"tests": ["assert f(1) == 1"]}, {"tests": []}, "non-empty list of strings 'tests'"),
    ("ifeval", {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
     {"instruction_id_list": ["nope:x"], "kwargs": [{}]}, "unknown ifeval instruction 'nope:x'"),
    ("tool", {"calls": [{"name": "f", "arguments": {"x": 1}}]}, {"calls": [{"arguments": {}}]},
     "tool reference calls[0] must be"),
])
def test_reference_check_is_the_verifiers_own(verifier, good, bad, reason, tmp_path, fault_log):
    import re

    from rewards import check_reference, get_verifier

    assert check_reference(verifier, good) is None
    assert reason in check_reference(verifier, bad)
    with pytest.raises(ValueError, match=re.escape(reason)):  # scoring refuses it for the same reason
        get_verifier(verifier)("x", bad)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row(0, reference=good)) + "\n" + json.dumps(row(1, reference=bad)) + "\n")
    result = read_rows(path, check_reference=lambda ref: check_reference(verifier, ref))
    assert [r["id"] for r in result.rows] == ["r0"] and [b.line for b in result.bad] == [2]
    assert reason in result.bad[0].reason
    fault_log(f"{verifier} reference the verifier rejects", "detected")


def test_reference_check_of_unknown_verifier_lists_the_known_ones():
    from rewards import check_reference

    assert check_reference("format", {}) is None  # no fields needed: nothing to check
    with pytest.raises(KeyError, match="unknown verifier 'mathh'; known: code, format"):
        check_reference("mathh", {"answer": "4"})
