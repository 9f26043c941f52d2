"""Row files: atomic JSONL writes, validation with file:line, skip/error policy, parquet."""

import json

import pytest

from engine.data import DataError, as_dataset, load_rows, read_rows, write_jsonl
from engine.tokenizer import build_tiny_tokenizer


def make_row(i, prompt="What is 2+2?", **extra):
    return {"id": f"r{i}", "domain": "math", "reference": {"answer": "4"},
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "\\boxed{4}"}], **extra}


def test_write_then_load_round_trip(tmp_path):
    rows = [make_row(0), make_row(1, "Café? ü"),
            {"id": "t", "domain": "tool", "messages": [{"role": "user", "content": "q"}],
             "reference": {"calls": [{"name": "add", "arguments": {"a": 1}}, {"name": "x", "arguments": {"city": "Rome"}}]}}]
    path = write_jsonl(tmp_path / "sub" / "rows.jsonl", rows)
    assert load_rows(path, on_bad_row="error") == rows
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["rows.jsonl"]  # no temporary left behind


def test_write_rejects_invalid_row_and_keeps_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [make_row(0)])
    with pytest.raises(DataError, match=r"row 1 \(id 'r1'\): missing field 'reference'"):
        write_jsonl(path, [make_row(0), {k: v for k, v in make_row(1).items() if k != "reference"}])
    assert load_rows(path) == [make_row(0)]


def write_bad_file(path):
    lines = [
        json.dumps(make_row(0)).encode(),                       # 1 ok
        b'{"id": "r1", "domain": "math",',                     # 2 bad JSON
        json.dumps(make_row(2)).encode().replace(b"2+2", b"\xff\xfe"),  # 3 not UTF-8
        json.dumps({k: v for k, v in make_row(3).items() if k != "messages"}).encode(),  # 4 missing field
        b"",                                                    # 5 blank: ignored
        json.dumps(make_row(5, prompt="   ")).encode(),         # 6 empty prompt
        json.dumps(make_row(6, prompt="x" * 600)).encode(),     # 7 over-long prompt
        json.dumps(make_row(0)).encode(),                       # 8 duplicate id
        json.dumps([1, 2]).encode(),                            # 9 not an object
        json.dumps(make_row(9, messages=[{"role": "robot", "content": "hi"}])).encode(),  # 10 bad role
        json.dumps(make_row(10)).encode(),                      # 11 ok
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_rows_reported_with_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_bad_file(path)
    result = read_rows(path, max_prompt_tokens=512)
    assert [r["id"] for r in result.rows] == ["r0", "r10"]
    got = {b.line: b.reason for b in result.bad}
    assert sorted(got) == [2, 3, 4, 6, 7, 8, 9, 10]
    assert got[2].startswith("bad JSON") and got[3].startswith("not UTF-8")
    assert got[4] == "missing field 'messages'" and got[6].startswith("empty prompt")
    assert got[7] == "prompt too long: 600 > max_prompt_tokens=512"
    assert got[8] == "duplicate id 'r0'" and got[9].startswith("row must be a JSON object")
    assert got[10] == ("messages[0].role must be one of ['system', 'user', 'assistant', 'tool'], got 'robot'; "
                       "the message has: content, role")
    assert all(b.file == str(path) for b in result.bad)


def test_policy_skip_and_error(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    write_bad_file(path)
    with caplog.at_level("WARNING"):
        assert [r["id"] for r in load_rows(path, max_prompt_tokens=512)] == ["r0", "r10"]
    assert "8 bad row(s) of 10" in caplog.text
    with pytest.raises(DataError) as err:
        load_rows(path, on_bad_row="error", max_prompt_tokens=512)
    for line in (2, 3, 4, 6, 7, 8, 9, 10):
        assert f"{path}:{line}: " in str(err.value)
    with pytest.raises(DataError, match="and 6 more"):
        load_rows(path, on_bad_row="error", max_prompt_tokens=512, max_listed=2)
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        load_rows(path, on_bad_row="ignore")


def test_prompt_length_in_tokens(tmp_path):
    tok = build_tiny_tokenizer()
    path = write_jsonl(tmp_path / "rows.jsonl", [make_row(0, "\\boxed{" * 10)])
    # 10 tokens of content + <|user|> + <|end|> + <|assistant|> = 13 tokens; 70 characters
    assert load_rows(path, on_bad_row="error", max_prompt_tokens=13, tokenizer=tok)
    longer = write_jsonl(tmp_path / "longer.jsonl", [make_row(0, "\\boxed{" * 11)])
    with pytest.raises(DataError, match="prompt too long: 14 > max_prompt_tokens=13"):
        load_rows(longer, on_bad_row="error", max_prompt_tokens=13, tokenizer=tok)
    with pytest.raises(DataError, match="prompt too long: 70 > max_prompt_tokens=13"):
        load_rows(path, on_bad_row="error", max_prompt_tokens=13)


def test_parquet_through_datasets(tmp_path):
    rows = [make_row(0), {"id": "k", "domain": "ifeval", "messages": [{"role": "user", "content": "hi"}],
                          "reference": {"instruction_id_list": ["a", "b"], "kwargs": [{"num_words": 3}, {}]}}]
    path = tmp_path / "rows.parquet"
    as_dataset(rows).to_parquet(str(path))
    # heterogeneous references survive unchanged (no null-filled keys)
    assert load_rows(path, on_bad_row="error") == rows


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="row file not found"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported row file type '.csv'"):
        load_rows(tmp_path / "rows.csv")
