"""Adapters: hand-written rows of GSM8K, MATH, MBPP, IFEval and xlam -> our rows, scored by
the real verifiers where a demonstration exists."""

import json
from pathlib import Path

import pytest

from engine.adapters import get_adapter, json_type, known_adapters, xlam_schema
from engine.data import load_rows, read_rows
from rewards import get_verifier, score_batch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load(name, adapter, domain=None):
    return load_rows(FIXTURES / name, adapter=adapter, domain=domain, on_bad_row="error")


def test_registry():
    assert {"gsm8k", "math", "mbpp", "ifeval", "xlam", "row"} <= set(known_adapters())
    with pytest.raises(KeyError, match="unknown adapter .*; known: .*gsm8k"):
        get_adapter("humaneval")


def test_gsm8k():
    rows = load("gsm8k.jsonl", "gsm8k")
    assert [r["reference"]["answer"] for r in rows] == ["7", "3600", "4"]  # "3,600" -> "3600"
    assert [r["id"] for r in rows] == ["gsm8k-1", "gsm8k-2", "gsm8k-3"]  # file stem + line
    demo = rows[0]["messages"][1]["content"]
    assert "<<" not in demo and demo.endswith("\\boxed{7}") and "3 * 4 = 12 pens" in demo
    verifier = get_verifier("math")
    assert [verifier(r["messages"][1]["content"], r["reference"]).score for r in rows] == [1.0] * 3


def test_hendrycks_math():
    rows = load("math_competition.jsonl", "math")
    assert [r["reference"]["answer"] for r in rows] == ["\\frac{5}{6}", "4", "\\{-3, 3\\}"]
    assert rows[1]["id"] == "test/algebra/2.json"
    verifier = get_verifier("math")
    assert [verifier(r["messages"][1]["content"], r["reference"]).score for r in rows] == [1.0] * 3
    assert verifier("\\boxed{0.8333}", rows[0]["reference"]).score == 0.0


def test_mbpp():
    rows = load("mbpp.jsonl", "mbpp")
    assert [r["id"] for r in rows] == ["mbpp-901", "mbpp-902", "mbpp-903"]
    assert rows[0]["messages"][0]["content"].endswith("assert max_of_three(1, 2, 3) == 3")
    assert "setup" not in rows[0]["reference"] and rows[2]["reference"]["setup"].startswith("def square")
    texts = [r["messages"][1]["content"] for r in rows] + ["```python\ndef count_vowels(s):\n    return 2\n```"]
    refs = [r["reference"] for r in rows] + [rows[1]["reference"]]
    scores = [r.score for r in score_batch("code", texts, refs, num_workers=2, timeout_s=20)]
    assert scores[:3] == [1.0, 1.0, 1.0]
    assert scores[3] == pytest.approx(1 / 3)  # passes 'hello' only


def test_ifeval():
    rows = load("ifeval.jsonl", "ifeval")
    assert [r["id"] for r in rows] == ["ifeval-1001", "ifeval-1002", "ifeval-1003"]
    assert all(len(r["messages"]) == 1 for r in rows)  # an evaluation set: no demonstrations
    assert rows[0]["reference"]["kwargs"] == [{}]  # None padding dropped
    assert rows[1]["reference"]["kwargs"] == [{"num_words": 40, "relation": "less than"}, {}]
    verifier = get_verifier("ifeval")
    good = "the moon has a crater and pulls the tide. Is there anything else I can help with?"
    assert verifier(good, rows[2]["reference"]).score == 1.0
    assert verifier("I like pasta, a lot.", rows[1]["reference"]).score == 0.5


def test_xlam():
    rows = load("xlam.jsonl", "xlam")
    assert [r["id"] for r in rows] == ["7001", "7002", "7003"]
    tools = rows[1]["reference"]["tools"]
    params = tools[1]["function"]["parameters"]
    assert params["properties"]["upper"]["type"] == "integer" and params["required"] == ["count"]
    assert tools[0]["function"]["parameters"]["required"] == ["amount", "source", "target"]
    assert rows[0]["reference"]["tools"][0]["function"]["parameters"]["required"] == []  # has a default
    assert json.loads(rows[1]["messages"][0]["content"].split("\n", 1)[1])[0]["name"] == "convert_currency"
    verifier = get_verifier("tool")
    for r in rows:
        assert verifier(r["messages"][-1]["content"], r["reference"]).score == 1.0, r["messages"][-1]
    wrong = rows[2]["messages"][-1]["content"].replace("true", "false")
    assert verifier(wrong, rows[2]["reference"]).score == 0.5  # one of two arguments differs


def test_json_types_and_schema():
    assert [json_type(t) for t in ("str", "int, optional", "List[int]", "float", "bool", "Dict[str, Any]", "Foo")] == \
        ["string", "integer", "array", "number", "boolean", "object", ""]
    schema = xlam_schema({"name": "f", "parameters": {"x": {"type": "Foo"}}})
    assert schema["function"]["parameters"] == {"type": "object", "properties": {"x": {"description": ""}}, "required": ["x"]}
    with pytest.raises(ValueError, match="must be an object with a 'name'"):
        xlam_schema({"parameters": {}})


def test_rejected_records_are_reported_with_line(tmp_path):
    path = tmp_path / "gsm.jsonl"
    good = {"question": "1+1?", "answer": "#### 2"}
    path.write_text("\n".join(json.dumps(r) for r in [
        good, {"question": "2+2?", "answer": "four"}, {"answer": "#### 3"}, {"question": "", "answer": "#### 1"}]) + "\n")
    result = read_rows(path, adapter="gsm8k", domain="math")
    assert len(result.rows) == 1 and result.rows[0]["messages"][1]["content"] == "\\boxed{2}"
    reasons = {b.line: b.reason for b in result.bad}
    assert sorted(reasons) == [2, 3, 4]
    assert "no '#### <final answer>' line" in reasons[2]
    assert reasons[3] == ("missing field 'question'; the record has: answer "
                          "(map one of them with data.fields: {question: <your field>})")
    assert "must be a non-empty string" in reasons[4]
    bad_tools = tmp_path / "x.jsonl"
    bad_tools.write_text(json.dumps({"query": "q", "tools": "[not json", "answers": "[]"}) + "\n")
    assert "is a string but not JSON" in read_rows(bad_tools, adapter="xlam").bad[0].reason


@pytest.mark.parametrize("name,adapter", [("gsm8k.jsonl", "gsm8k"), ("mbpp.jsonl", "mbpp"),
                                          ("ifeval.jsonl", "ifeval"), ("xlam.jsonl", "xlam")])
def test_datasets_source_gives_the_same_rows_as_the_file(name, adapter, tmp_path):
    """`{path, data_files, split}` through `datasets.load_dataset`, and a `save_to_disk`
    directory, give the rows the stdlib JSONL reader gives (ids aside: row numbers)."""
    import datasets

    want = load(name, adapter)
    src = {"path": "json", "data_files": str(FIXTURES / name), "split": "train"}
    got = load_rows(src, adapter=adapter, on_bad_row="error")
    assert [(r["messages"], r["reference"]) for r in got] == [(r["messages"], r["reference"]) for r in want]
    datasets.load_dataset("json", data_files=str(FIXTURES / name), split="train").save_to_disk(str(tmp_path / "d"))
    on_disk = load_rows({"path": str(tmp_path / "d"), "split": "train"}, adapter=adapter, on_bad_row="error")
    assert [r["reference"] for r in on_disk] == [r["reference"] for r in want]
    part = load_rows({**src, "split": "train[1:]"}, adapter=adapter, on_bad_row="error")
    assert [r["reference"] for r in part] == [r["reference"] for r in want[1:]]


def test_datasets_source_bad_rows_are_named_by_split_and_row(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "q?", "answer": "x\n#### 4"}) + "\n"
                 + json.dumps({"question": "", "answer": "x\n#### 4"}) + "\n")
    result = read_rows({"path": "json", "data_files": str(f), "split": "train"}, adapter="gsm8k")
    assert len(result.rows) == 1
    assert [str(b) for b in result.bad] == [
        f"hf:json({f})[train]:2: adapter rejected the record: ValueError: field 'question' must be a non-empty "
        "string, got ''"]
