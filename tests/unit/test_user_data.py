"""Your own data and rewards (issue 35): field mapping, plug-ins by import path, and data
problems that stop the run where they start (`validate`, then `prepare`).

Cheap: no Ray, no training; `prepare` builds a 1-layer tiny model (a few seconds in all).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from engine.adapters import MissingField, convert, get_adapter, map_fields
from engine.data import DataError, read_rows, split_problem
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.rundir import RunDir
from pipeline.stages import run_stage

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "fixtures" / "user_plugins"
GSM8K = [json.loads(line) for line in (ROOT / "tests" / "fixtures" / "gsm8k.jsonl").read_text().splitlines()]
TINY = {"base": "tiny", "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                 "intermediate_size": 64}}


def _renamed(records, **names):  # a GSM8K-format dataset whose fields have other names
    return [{names.get(k, k): v for k, v in r.items()} for r in records]


def _parquet(path: Path, records: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_list(records).to_parquet(str(path))
    return path


def _config(tmp: Path, data: dict, verifier: str = "math", **top) -> Path:
    raw = {"experiment": "userdata", "run_dir": str(tmp / "run"), "model": TINY,
           "domains": [{"name": "math", "verifier": verifier, "data": data}],
           "logging": {"progress": False, "wandb": "disabled"}, **top}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------ field mapping


def test_field_mapping_renames_before_the_adapter():
    record = _renamed(GSM8K[:1], question="problem", answer="solution")[0]
    with pytest.raises(MissingField, match=r"missing field 'question'; the record has: problem, solution"):
        convert(get_adapter("gsm8k"), record, None, domain="math", default_id="x-1")
    row = convert(get_adapter("gsm8k"), record, {"question": "problem", "answer": "solution"},
                  domain="math", default_id="x-1")
    assert row == get_adapter("gsm8k")(GSM8K[0], domain="math", default_id="x-1")
    assert map_fields({"q": 1, "keep": 2}, {"question": "q"}) == {"question": 1, "keep": 2}
    with pytest.raises(MissingField, match=r"missing field 'problem' \(data.fields maps it to 'question'\)"):
        map_fields({"text": "hi"}, {"question": "problem"})


def test_unknown_target_field_is_named(tmp_path):
    files = [_parquet(tmp_path / f"{s}.parquet", _renamed(GSM8K, question="problem")) for s in ("train", "eval")]
    path = _config(tmp_path, {"train": str(files[0]), "eval": str(files[1]), "adapter": "gsm8k",
                              "fields": {"questoin": "problem"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert ("domains[0].data.fields.questoin", "adapter 'gsm8k' has no field 'questoin'; its fields: "
            "['question', 'answer', 'id'] (write {adapter field: your field})") in info.value.errors


# ------------------------------------------------------------------ validate reads the data


def test_validate_names_missing_field_file_and_row_then_fields_make_it_run(tmp_path, capsys):
    """The issue's scenario: a GSM8K-format parquet with `problem`/`solution` fields."""
    records = _renamed(GSM8K, question="problem", answer="solution")
    train, evals = _parquet(tmp_path / "train.parquet", records), _parquet(tmp_path / "eval.parquet", records[:1])
    data = {"train": str(train), "eval": str(evals), "adapter": "gsm8k"}
    assert main(["validate", str(_config(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert (f"data error: domains[0].data.train: the first 3 rows read with adapter 'gsm8k': 3 bad of 3; "
            f"first: {train}:1: missing field 'question'; the record has: problem, solution") in err
    assert f"domains[0].data.eval: the first 1 rows read with adapter 'gsm8k': 1 bad of 1; first: {evals}:1:" in err
    assert not (tmp_path / "run").exists()  # no stage ran
    data["fields"] = {"question": "problem", "answer": "solution"}
    assert main(["validate", str(_config(tmp_path, data))]) == 0, capsys.readouterr().err
    # `run` refuses the same way before any stage starts
    del data["fields"]
    assert main(["run", str(_config(tmp_path, data))]) == 2
    assert not (tmp_path / "run").exists()


def test_validate_warns_of_a_few_bad_rows_and_names_a_reference_problem(tmp_path, capsys):
    rows = [{"id": f"r{i}", "domain": "math", "messages": [{"role": "user", "content": "2+2?"}],
             "reference": {"answer": "4"}} for i in range(4)]
    rows[2]["reference"] = {}
    train = tmp_path / "rows.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["validate", str(_config(tmp_path, {"train": str(train), "eval": str(train)}))]) == 0
    err = capsys.readouterr().err
    assert f"data warning: domains[0].data.train: the first 4 rows: 1 bad of 4; first: {train}:3: math reference" in err


# ------------------------------------------------------------------ prepare stops the run


def _rows_file(path: Path, n_good: int, n_bad: int) -> Path:
    lines = []
    for i in range(n_good + n_bad):
        rec = {"prompt_text": f"What is {i} plus 1?", "gold": str(i + 1), "uid": f"q{i}"}
        if i % max(1, (n_good + n_bad) // max(1, n_bad)) == 0 and sum("gold" not in json.loads(x) for x in lines) < n_bad:
            del rec["gold"]
        lines.append(json.dumps(rec))
    path.write_text("".join(x + "\n" for x in lines))
    return path


def _prepare(tmp_path: Path, n_good: int, n_bad: int):
    train = _rows_file(tmp_path / "train.jsonl", n_good, n_bad)
    evals = _rows_file(tmp_path / "eval.jsonl", 4, 0)
    path = _config(tmp_path, {"train": str(train), "eval": str(evals), "adapter": "my_rewards:qa_adapter",
                              "fields": {"prompt_text": "prompt_text"}},
                   verifier="my_rewards:last_number", python_path=[str(PLUGINS)])
    cfg = load_config(path)
    return path, cfg, RunDir(cfg.run_path)


def test_prepare_with_zero_rows_fails(tmp_path):
    path, cfg, run = _prepare(tmp_path, 0, 0)
    with pytest.raises(DataError, match=r"domain 'math' train: no rows \(the source is empty\)"):
        run_stage(cfg, str(path), "prepare")
    assert run.read_manifest("prepare")["status"] == "failed"


def test_prepare_with_half_bad_rows_fails_listing_them(tmp_path):
    path, cfg, run = _prepare(tmp_path, 10, 10)
    with pytest.raises(DataError) as info:
        run_stage(cfg, str(path), "prepare")
    text = str(info.value)
    assert "domain 'math' train: 10 bad rows of 20 (50.0%), more than data.max_bad_fraction=0.05" in text
    assert f"{tmp_path / 'train.jsonl'}:1: missing field 'gold'; the record has: prompt_text, uid" in text
    bad = [json.loads(x) for x in (run.stage_dir("prepare") / "bad_rows.jsonl").read_text().splitlines()]
    assert len(bad) == 10 and bad[0]["line"] == 1 and bad[0]["record"]["uid"] == "q0"
    assert bad[0]["domain"] == "math" and bad[0]["split"] == "train"
    m = run.read_manifest("prepare")
    assert m["status"] == "failed" and "10 bad rows of 20" in m["error"]  # the runner's summary shows it


def test_prepare_with_one_bad_row_in_a_thousand_passes_and_reports_it(tmp_path):
    from pipeline.graph import build_graph, input_hashes
    from pipeline.launch import Outcome
    from pipeline.runner import Scheduler, summarize

    path, cfg, run = _prepare(tmp_path, 999, 1)
    stages = build_graph(cfg)
    sched = Scheduler(stages, stages[:1], input_hashes(stages), run, retries=0, concurrency=1)
    assert sched.next_actions() == [("launch", "prepare")]
    m = run_stage(cfg, str(path), "prepare")
    assert m["status"] == "done" and m["metrics"]["rows"]["math"] == {"train": 999, "eval": 4}
    assert m["metrics"]["bad_rows"] == 1
    assert m["note"].startswith(f"domain 'math' train: 1 bad of 1000; first: {tmp_path / 'train.jsonl'}:1: ")
    assert len((run.stage_dir("prepare") / "bad_rows.jsonl").read_text().splitlines()) == 1
    # the runner's console line (`[prepare] done (..s): <note>`) and its closing summary say it
    assert sched.complete(Outcome("prepare", 0)) == "done" and sched.states["prepare"].note == m["note"]
    text, code = summarize(sched, run)
    assert code == 0 and f"prepare        done" in text and "1 bad of 1000" in text


def test_split_problem():
    assert split_problem(0, 0, 0.05) == "no rows (the source is empty)"
    assert split_problem(0, 3, 0.5) == "no rows kept (3 bad of 3)"
    assert split_problem(999, 1, 0.05) is None
    assert split_problem(95, 5, 0.05) is None and split_problem(94, 6, 0.05) is not None


def test_sft_configured_without_demonstrations_is_an_error(tmp_path):
    """Prompt-only rows (no assistant message) under an SFT the config asks for: an error,
    not the base model exported as the stage's model."""
    rows = [{"id": f"r{i}", "domain": "math", "messages": [{"role": "user", "content": f"{i}+1?"}],
             "reference": {"answer": str(i + 1)}} for i in range(4)]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = yaml.safe_load(_config(tmp_path, {"train": str(f), "eval": str(f)}).read_text())
    raw["domains"][0]["sft"] = {"steps": 2, "batch_size": 2, "micro_batch_size": 2}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "cfg.yaml")
    run_stage(cfg, str(tmp_path / "cfg.yaml"), "prepare")
    with pytest.raises(RuntimeError, match=r"sft:math is configured but the training rows of \['math'\] hold no "
                                           "demonstrations"):
        run_stage(cfg, str(tmp_path / "cfg.yaml"), "sft:math")


# ------------------------------------------------------------------ plug-ins by import path


def test_validate_imports_plugins_and_checks_their_signatures(tmp_path, capsys):
    f = _rows_file(tmp_path / "rows.jsonl", 4, 0)
    data = {"train": str(f), "eval": str(f), "adapter": "my_rewards:qa_adapter"}
    raw = yaml.safe_load(_config(tmp_path, data, verifier="my_rewards:wrong_signature",
                                 python_path=[str(PLUGINS)]).read_text())
    raw["domains"][0]["environment"] = "my_rewards:nope"
    raw["domains"].append({**raw["domains"][0], "name": "other", "verifier": "no_such_module:score",
                           "environment": "row_tool", "data": {**data, "adapter": "my_rewards:qa-adapter"}})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert ("config error: domains[0].verifier: verifier 'my_rewards:wrong_signature' must be callable as "
            "f(completion, reference); wrong_signature(completion)") in err
    assert ("config error: domains[0].environment: tool environment 'my_rewards:nope': module 'my_rewards' "
            f"({PLUGINS / 'my_rewards.py'}) has no attribute 'nope'") in err
    assert "config error: domains[1].verifier: verifier 'no_such_module:score': cannot import module " \
           "'no_such_module': ModuleNotFoundError" in err
    assert "config error: domains[1].environment: unknown tool environment 'row_tool'" in err
    assert ("config error: domains[1].data.adapter: adapter 'my_rewards:qa-adapter': an import path must look "
            "like 'package.module:function'") in err


def test_python_path_is_checked(tmp_path, capsys):
    f = _rows_file(tmp_path / "rows.jsonl", 4, 0)
    path = _config(tmp_path, {"train": str(f), "eval": str(f)}, python_path=["no/such/dir"])
    assert main(["validate", str(path)]) == 2
    assert "config error: python_path[0]: directory not found: no/such/dir" in capsys.readouterr().err


def test_user_verifier_that_raises_or_hangs_scores_its_item_zero(tmp_path):
    """In the scoring workers, as built-in verifiers run: the worker imports the user's
    module (PYTHONPATH), the per-item time limit holds, the batch keeps its other items."""
    from engine.plugins import activate
    from rewards import ScorerPool

    activate([PLUGINS])
    name = "my_rewards:last_number"
    refs = [{"answer": "3"}] * 4
    with ScorerPool(num_workers=2, timeout_s=3.0) as pool:
        res = pool.score(name, ["so 3", "RAISE", "HANG", "it is 4"], refs)
    assert [r.score for r in res] == [1.0, 0.0, 0.0, 0.0]
    assert res[0].info == {"extracted": "3"}
    assert res[1].info["reason"].startswith("verifier error: RuntimeError: user verifier bug on this completion")
    assert res[2].info["reason"] == "timeout: item took longer than 3s"
    assert res[3].info == {"extracted": "4"}


def test_job_runtime_env_carries_modules_outside_the_checkout(tmp_path):
    from pipeline.launch import job_overrides, job_request

    mod_dir = tmp_path / "mods"
    (mod_dir / "pkg").mkdir(parents=True)
    (mod_dir / "pkg" / "__init__.py").write_text("")
    (mod_dir / "scorer.py").write_text("def score(c, r):\n    return 1.0\n")
    (mod_dir / "notes.txt").write_text("")
    f = _rows_file(tmp_path / "rows.jsonl", 4, 0)
    cfg = load_config(_config(tmp_path, {"train": str(f), "eval": str(f)}, verifier="scorer:score",
                              python_path=[str(mod_dir), str(PLUGINS.relative_to(ROOT))]))
    req = job_request(cfg, RunDir(cfg.run_path), "prepare", ["python", "-m", "pipeline"], tmp_path)
    # inside the checkout (tests/fixtures/user_plugins) travels with the working dir
    assert req["runtime_env"]["py_modules"] == [str(mod_dir / "pkg")]
    assert req["runtime_env"]["env_vars"]["PYTHONPATH"] == str(mod_dir)
    # the job's stage process keeps the directory inside the checkout, not the one outside
    over = job_overrides([], RunDir(cfg.run_path), cfg, tmp_path)
    assert over[-1] == 'python_path=["tests/fixtures/user_plugins"]'
    assert load_config(tmp_path / "cfg.yaml", over).python_path == ["tests/fixtures/user_plugins"]
    assert "scorer" in sys.modules or __import__("scorer")  # activated here by load_config


def test_user_verifier_declares_its_own_time_limit(tmp_path, capsys):
    """`fn.timeout_s` is that verifier's per-item limit, as declared (no first-item grace):
    tests/fixtures/fragile_grader's grader hangs on the gold answer 9**9**9 for 3 s, not 60."""
    import time

    from engine.plugins import activate
    from rewards import ScorerPool
    from rewards.batch import DEFAULT_ITEM_TIMEOUT_S, item_timeout_s

    activate([ROOT / "tests" / "fixtures" / "fragile_grader", PLUGINS])
    assert item_timeout_s("grader:expression_answer") == 3.0
    assert item_timeout_s("my_rewards:last_number") == DEFAULT_ITEM_TIMEOUT_S  # none declared
    t0 = time.monotonic()
    with ScorerPool(num_workers=1) as pool:
        res = pool.score("grader:expression_answer", ["so 12", "so 7"], [{"answer": "9**9**9"}, {"answer": "3+4"}])
    assert res[0].score == 0.0 and res[0].info["reason"] == "timeout: item took longer than 3s"
    assert res[1].score == 1.0 and res[1].info == {"extracted": "7", "gold": 7}
    assert time.monotonic() - t0 < 25  # FIRST_ITEM_GRACE_S (30 s) was not added
    f = _rows_file(tmp_path / "rows.jsonl", 4, 0)
    path = _config(tmp_path, {"train": str(f), "eval": str(f), "adapter": "my_rewards:qa_adapter"},
                   verifier="my_rewards:with_bad_time_limit", python_path=[str(PLUGINS)])
    assert main(["validate", str(path)]) == 2
    assert ("config error: domains[0].verifier: verifier 'my_rewards:with_bad_time_limit': timeout_s must be a "
            "positive number of seconds, got 'a few seconds'") in capsys.readouterr().err


def test_scoring_failures_are_reported_with_row_and_verifier():
    from engine.episode import MAX_FAILURE_LINES, report_scoring_failures
    from rewards import RewardResult

    results = [RewardResult(1.0), RewardResult(0.0, {"reason": "verifier error: ValueError: bad gold"}),
               RewardResult(0.0, {"reason": "timeout: item took longer than 3s"}),
               RewardResult(0.0, {"reason": "no number in the answer"})]  # a verdict, not a failure
    lines = []
    assert report_scoring_failures(results, "pkg.mod:score", "GRPO step 0", ["r0", "r1", "r2", "r3"], lines.append) == 2
    assert lines == ["GRPO step 0: row 'r1' scored 0 without a verdict from verifier 'pkg.mod:score': verifier error: "
                     "ValueError: bad gold",
                     "GRPO step 0: row 'r2' scored 0 without a verdict from verifier 'pkg.mod:score': timeout: item "
                     "took longer than 3s"]
    lines.clear()
    many = [RewardResult(0.0, {"reason": "verifier error: E"})] * (MAX_FAILURE_LINES + 5)
    assert report_scoring_failures(many, "math", "eval", log=lines.append) == MAX_FAILURE_LINES + 5
    assert len(lines) == MAX_FAILURE_LINES + 1 and lines[0].startswith("eval: item 0 scored 0")
    assert lines[-1] == f"eval: ... and 5 more of {MAX_FAILURE_LINES + 5} items scored 0 without a verdict from verifier 'math'"


# ------------------------------------------------------------------ bad rows in real data shapes


def _chat_rows() -> list[dict]:
    """8 rows in our format (nested `messages`), 3 of them bad in the ways real exports are."""
    rows = [{"id": f"c{i}", "domain": "math", "reference": {"answer": str(i + 1)},
             "messages": [{"role": "system", "content": "Answer with a number."},
                          {"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i} + 1 = {i + 1}"}]} for i in range(8)]
    rows[2]["messages"][2] = {"role": "assistant"}  # an export that dropped an empty turn's content
    rows[4]["messages"][1] = {"from": "human", "value": "What is 4 plus 1?"}  # a ShareGPT-style turn
    rows[6]["reference"] = {"note": "answer lost"}  # no answer
    return rows


def _source(kind: str, tmp: Path, rows: list[dict]):
    """(data.train as the config writes it, how errors name it) for one data shape."""
    import datasets

    if kind == "jsonl":
        path = tmp / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path), str(path)
    table = datasets.Dataset.from_list(rows)  # Arrow: one struct type, missing keys read back as null
    if kind == "parquet":
        table.to_parquet(str(tmp / "chat.parquet"))
        return str(tmp / "chat.parquet"), str(tmp / "chat.parquet")
    if kind == "saved-dataset":
        table.save_to_disk(str(tmp / "chat_ds"))
        return {"hf": {"path": str(tmp / "chat_ds")}}, f"hf:{tmp / 'chat_ds'}[train]"
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(str(tmp / "chat_dd"))
    return {"hf": {"path": str(tmp / "chat_dd"), "split": "train"}}, f"hf:{tmp / 'chat_dd'}[train]"


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved-dataset", "saved-datasetdict"])
def test_bad_rows_name_file_line_and_field_in_each_data_shape(kind, tmp_path, capsys):
    """validate's first rows and prepare's max_bad_fraction, on rows with nested messages
    read from JSONL, parquet and a `datasets` directory from `save_to_disk` (Arrow pads the
    missing keys with nulls: the reasons must still name the field)."""
    train, label = _source(kind, tmp_path, _chat_rows())
    good = tmp_path / "eval.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows()[:2]))
    want = {3: "messages[2].content must be a string, got None; the message has: role",
            5: "messages[1].role must be one of ['system', 'user', 'assistant', 'tool'], got None; "
               "the message has: from, value",
            7: ("math reference must be a dict with an 'answer' field, got {'note': 'answer lost'}" if kind == "jsonl"
                else "math reference field 'answer' is null")}
    path = _config(tmp_path, {"train": train, "eval": str(good)})
    # validate: 3 bad of the first 8 is a warning naming the first, with its line and field
    assert main(["validate", str(path)]) == 0
    assert f"data warning: domains[0].data.train: the first 8 rows: 3 bad of 8; first: {label}:3: {want[3]}; " \
           f"{label}:5: {want[5]}; {label}:7: {want[7]}" in capsys.readouterr().err
    # prepare: 3 of 8 is more than max_bad_fraction (0.05): it fails listing each
    cfg = load_config(path)
    with pytest.raises(DataError) as info:
        run_stage(cfg, str(path), "prepare")
    assert "domain 'math' train: 3 bad rows of 8 (37.5%), more than data.max_bad_fraction=0.05" in str(info.value)
    for line, reason in want.items():
        assert f"{label}:{line}: {reason}" in str(info.value)
    bad = [json.loads(x) for x in (RunDir(cfg.run_path).stage_dir("prepare") / "bad_rows.jsonl").read_text().splitlines()]
    assert [(b["file"], b["line"], b["reason"]) for b in bad] == [(label, n, r) for n, r in want.items()]
    # a majority of bad rows among the first ones stops validate (exit 2) with the same names
    train, label = _source(kind, tmp_path, [r for i, r in enumerate(_chat_rows()) if i in (0, 2, 4, 6)])
    assert main(["validate", str(_config(tmp_path, {"train": train, "eval": str(good)}))]) == 2
    assert (f"data error: domains[0].data.train: the first 4 rows read with no adapter (rows in our format): "
            f"3 bad of 4; first: {label}:2: {want[3]}") in capsys.readouterr().err


def test_saved_datasetdict_without_the_split_is_named(tmp_path, capsys):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(_chat_rows())}).save_to_disk(str(tmp_path / "dd"))
    path = _config(tmp_path, {"train": {"hf": {"path": str(tmp_path / "dd")}}, "eval": {"hf": {"path": str(tmp_path / "dd"), "split": "test"}}})
    assert main(["validate", str(path)]) == 2
    assert ("data error: domains[0].data.train: cannot read: ValueError: Unknown split \"train\". Should be one "
            "of ['test']") in capsys.readouterr().err


def test_eval_names_the_row_a_user_verifier_failed_on(capsys):
    """eval scores through the stage's scorer pool (checked_scores): the row whose gold
    answer the fragile grader cannot evaluate is named in the stage log, the others score."""
    from engine.plugins import activate
    from pipeline.evaluate import EvalSet, EvalSettings, evaluate_model
    from pipeline.stage_workers import checked_scores
    from rewards import ScorerPool

    activate([ROOT / "tests" / "fixtures" / "fragile_grader"])
    rows = [{"id": i, "domain": "d", "messages": [{"role": "user", "content": "?"}], "reference": {"answer": a}}
            for i, a in (("e-ok", "3*4"), ("e-raises", "twelve"), ("e-wrong", "2+2"))]
    with ScorerPool(num_workers=1) as pool:
        entry = evaluate_model(lambda es, rows_, t, n: ["so 12"] * (len(rows_) * n),
                               [EvalSet("d", "grader:expression_answer", rows)], checked_scores(pool, "eval of m"),
                               EvalSettings(samples=2), log=lambda _: None)
    assert entry["greedy_per_prompt"]["d"] == [1.0, 0.0, 0.0]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "without a verdict" in ln]
    line = ("eval of m: row 'e-raises' scored 0 without a verdict from verifier 'grader:expression_answer': "
            "verifier error: NameError: name 'twelve' is not defined")
    assert lines == [line] * 3  # the greedy completion and the 2 samples
