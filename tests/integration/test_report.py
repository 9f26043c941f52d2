"""The report from a synthetic run directory: table contents, plots written, timings."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from pipeline.report import curve_keys, format_results_table, read_metrics, write_report

RESULTS = {
    "models": {
        "student": {"math": 0.5, "code": 0.25},
        "base": {"math": 0.0, "code": 0.125},
        "sft:math": {"math": 0.375, "code": 0.0},
        "grpo:math": {"math": 0.625, "code": 0.0},
    },
    "sampled": {"base": {"math": 0.0625, "code": 0.0}, "student": {"math": 0.4375, "code": 0.25}},
    "n_eval": {"math": 16, "code": 8},
    "settings": {"samples": 4, "temperature": 1.0},
}


def _manifest(run, stage, seconds, started, **extra):
    d = run / stage.replace(":", "-")
    d.mkdir(parents=True, exist_ok=True)
    m = {"stage": stage, "status": "done", "seconds": seconds, "started": started, "attempt": 1, **extra}
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.yaml").write_text("experiment: synth\n")
    _manifest(run, "prepare", 1.5, 1.0)
    sft = _manifest(run, "sft:math", 12.25, 2.0, outputs={"final": str(run / "sft-math" / "final")})
    (sft / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 3.0 / (i + 1), "lr": 1e-3,
                                                           "note": "x"}) + "\n" for i in range(20))
                                       + '{"step": 20, "loss": 0.1')  # torn last line: ignored
    grpo = _manifest(run, "grpo:math", 30.0, 3.0)
    (grpo / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward_mean": i / 10, "kl": 0.01 * i,
                                                            "loss": -0.1}) + "\n" for i in range(10)))
    _manifest(run, "opd", 40.0, 4.0, metrics={"kl_per_teacher": [{"math": 0.9, "code": 1.2},
                                                                  {"math": 0.5, "code": 0.7}],
                                              "kl_heldout_per_teacher": [{"after_round": 0, "math": 1.0, "code": 1.3},
                                                                         {"after_round": 2, "math": 0.4, "code": 0.6}]})
    (run / "opd" / "heldout_kl.jsonl").write_text(json.dumps({"after_round": 0, "math": [1.0, 0.8, 0.6]}) + "\n"
                                                 + json.dumps({"after_round": 2, "math": [0.5, 0.5, 0.2]}) + "\n")
    _manifest(run, "eval", 5.0, 5.0)
    (run / "eval" / "results.json").write_text(json.dumps(RESULTS))
    return run


def test_results_table_order_mean_and_best():
    table = format_results_table(RESULTS).splitlines()
    assert table[0] == "| model | math | code | mean |"
    # rows in pipeline order: base, sft:*, grpo:*, student
    assert [r.split("|")[1].strip() for r in table[2:]] == ["base", "sft:math", "grpo:math", "student"]
    # student mean = (0.5 + 0.25) / 2 = 0.375; best math is grpo:math 0.625, best code student 0.25
    assert table[5] == "| student | 0.500 | **0.250** | **0.375** |"
    assert table[4] == "| grpo:math | **0.625** | 0.000 | 0.312 |"


def test_curve_keys_pick_known_numeric_keys():
    rows = [{"step": 0, "loss": 1.0, "lr": 0.1, "note": "a", "reward_mean": 0.5, "kl": 0.1, "flag": True}]
    assert curve_keys(rows) == ["loss", "reward_mean", "kl"]  # preference order; lr/step/str/bool skipped


def test_report_from_synthetic_run(run_dir):
    out = write_report(run_dir)
    text = out.read_text()
    assert out == run_dir / "report" / "report.md"
    assert "# Polymath report: synth" in text
    assert "| student | 0.500 | **0.250** | **0.375** |" in text
    assert "Sampled pass@1 over k=4 samples" in text and "| base | 0.062 | 0.000 | 0.031 |" in text
    assert "Eval prompts per domain: math 16, code 8" in text
    for png in ("sft-math.png", "grpo-math.png", "opd-kl-per-teacher.png"):
        data = (run_dir / "report" / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, png
        assert f"plots/{png}" in text
    assert not (run_dir / "report" / "plots" / "prepare.png").exists()  # no metrics, no plot
    assert "| 2 | 0.500 | 0.700 |" in text  # OPD round 2: math 0.5, code 0.7
    assert "| 0 | 1.000 | 1.300 |" in text and "| 2 | 0.400 | 0.600 |" in text  # held-out KL rows
    # per-prompt diffs -0.5, -0.3, -0.4: mean -0.4, sd 0.1, SE 0.1 / sqrt(3)
    assert "| math | 0.800 | 0.400 | -0.400 | 0.058 | -6.9 |" in text
    assert "| grpo:math | done | 30.0 | 1 |" in text
    assert "Total stage time: 88.8 s" in text  # 1.5 + 12.25 + 30 + 40 + 5
    assert "Last step: loss 0.150" in text  # sft step 19: 3/20
    assert "## Exported models" in text and "| sft:math | `sft-math/final` |" in text


def test_table_one_domain_and_ties():
    table = format_results_table({"models": {"base": {"math": 0.0}, "student": {"math": 0.0}}}).splitlines()
    assert table[0] == "| model | math |"  # no mean column for one domain
    assert table[2:] == ["| base | 0.000 |", "| student | 0.000 |"]  # all equal: nothing in bold


def test_read_metrics_skips_torn_line(run_dir):
    rows = read_metrics(run_dir / "sft-math" / "metrics.jsonl")
    assert len(rows) == 20 and rows[-1]["step"] == 19


def test_report_without_results_and_cli(tmp_path):
    run = tmp_path / "r"
    _manifest(run, "prepare", 1.0, 1.0)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "report", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("report.md")
    assert "the eval stage has not finished" in (run / "report" / "report.md").read_text()


def test_report_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        write_report(tmp_path / "missing")
    run = tmp_path / "r"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text('{"sampled": {}}')
    with pytest.raises(RuntimeError, match="no 'models' table"):
        write_report(run)


def test_eval_and_report_stages_on_a_tiny_model(tmp_path, monkeypatch):
    """The real eval stage (HF generator, verifier) and report stage, in process.

    Every model stage is stood in for by a done manifest pointing at the base model, so
    all four rows hold the same weights and must score the same, greedy and sampled.
    """
    import torch
    import yaml

    from pipeline.config import load_config
    from pipeline.graph import build_graph, input_hashes
    from pipeline.rundir import RunDir
    from pipeline.stages import run_stage

    torch.set_num_threads(1)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    raw = {"experiment": "evaltest", "run_dir": str(tmp_path / "run"),
           "model": {"base": "tiny", "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                              "intermediate_size": 64, "max_position_embeddings": 256}},
           "domains": [{"name": "math", "data": {"synthetic": {"generator": "math", "train_size": 8, "eval_size": 4}},
                        "verifier": "math"}],
           "opd": {"student_init": "base"}, "eval": {"max_new_tokens": 8, "samples": 2}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    run_stage(cfg, str(path), "prepare")
    run, hashes = RunDir(cfg.run_path), input_hashes(build_graph(cfg))
    base = run.output("prepare", "model")
    for stage in ("sft:math", "grpo:math", "opd"):
        run.write_manifest(stage, status="done", input_hash=hashes[stage], outputs={"model": base}, seconds=1.0)
    m = run_stage(cfg, str(path), "eval")
    res = json.loads(Path(m["outputs"]["results"]).read_text())
    assert set(res["models"]) == {"base", "sft:math", "grpo:math", "student"}
    assert res["n_eval"] == {"math": 4}
    greedy = {v["math"] for v in res["models"].values()}
    sampled = {v["math"] for v in res["sampled"].values()}
    assert len(greedy) == 1 and len(sampled) == 1  # same weights, same seeds -> same scores
    assert all(0.0 <= x <= 1.0 for x in greedy | sampled)
    m = run_stage(cfg, str(path), "report")
    text = Path(m["outputs"]["report"]).read_text()
    assert "| student |" in text and "Eval prompts per domain: math 4" in text
