"""The CLI: `--only` in all its spellings, help on every subcommand and option."""

import argparse

import pytest

from pipeline.cli import _parser


@pytest.mark.parametrize("argv", [["--only", "sft:math,opd"], ["--only", "sft:math", "opd"],
                                  ["--only", "sft:math", "--only", "opd"], ["--only", "sft:math,opd", "--only", "opd"]])
def test_only_spellings_select_both_stages(argv):
    args = _parser().parse_args(["run", "configs/tiny.yaml", *argv])
    assert args.only == ["sft:math", "opd"]


def test_only_absent_is_none_and_empty_name_is_an_error(capsys):
    assert _parser().parse_args(["run", "c.yaml"]).only is None
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["run", "c.yaml", "--only", "a,,b"])
    assert exc.value.code == 2 and "empty stage name" in capsys.readouterr().err


def test_every_subcommand_and_option_has_help():
    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"validate", "plan", "stage", "run", "report"}
    helps = {a.dest: a.help for a in subs._choices_actions}
    assert all(helps[name] for name in subs.choices), helps
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name}: option {action.dest} has no help"


# ------------------------------------------------------------------ overrides anywhere, usage errors

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from pipeline.cli import main, parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, train: str | None = None) -> str:
    data = ({"train": train, "eval": train, "on_bad_row": "error"} if train
            else {"synthetic": {"generator": "math", "train_size": 8, "eval_size": 4}})
    raw = {"experiment": "cli-test", "run_dir": str(tmp_path / "run"),
           "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                              "intermediate_size": 64}},
           "domains": [{"name": "math", "verifier": "math", "data": data}],
           "logging": {"progress": False, "wandb": "disabled"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("argv, expected", [
    (["run", "C", "--only", "a", "b", "trainer.lr=1e-4"], {"only": ["a", "b"], "overrides": ["trainer.lr=1e-4"]}),
    (["run", "opd.rounds=2", "C", "--from", "opd"], {"config": "C", "start": "opd", "overrides": ["opd.rounds=2"]}),
    (["run", "C", "--address=http://h:8265/?a=b"], {"address": "http://h:8265/?a=b", "overrides": []}),
    (["stage", "C", "s", "--force", "domains.math.grpo.lr=1e-4"],
     {"stage": "s", "force": True, "overrides": ["domains.math.grpo.lr=1e-4"]}),
    (["plan", "C", "x=1", "--address", "http://h:1"], {"address": "http://h:1", "overrides": ["x=1"]}),
    # a segment may name a stage: what tests/quality and `make experiment` pass
    (["run", "C", "resources.stages.sft:all.num_cpus=1", "--seeds", "0,1"],
     {"config": "C", "seeds": "0,1", "overrides": ["resources.stages.sft:all.num_cpus=1"]}),
    (["run", "C", "resources.stages.grpo:math@think-high.num_cpus=2"],
     {"overrides": ["resources.stages.grpo:math@think-high.num_cpus=2"]}),
    # a dotted key without '=' is a malformed override (load_config names it), a .yaml is the config
    (["validate", "my.yaml", "opd.rounds"], {"config": "my.yaml", "overrides": ["opd.rounds"]}),
])
def test_overrides_are_taken_anywhere_among_the_arguments(argv, expected):
    args = parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


# (argv with CFG for a valid config file, what stderr must say); every one exits 2, no traceback
USAGE_ERRORS = [
    ([], "required: COMMAND"),
    (["bogus"], "invalid choice"),
    (["validate"], "required: config"),
    (["validate", "missing.yaml"], "config file not found"),
    (["validate", "CFG", "not-an-override"], "unrecognized arguments"),
    (["validate", "CFG", "no_such_key=1"], "config error: no_such_key"),
    (["plan"], "required: config"),
    (["plan", "CFG", "--address"], "expected one argument"),
    (["stage", "CFG"], "required: stage"),
    (["stage", "CFG", "nosuch"], "unknown stage 'nosuch'"),
    (["stage", "CFG", "sft:math"], "needs prepare done for this config first"),
    (["stage", "CFG", "prepare", "--force", "trainer.lr=-1"], "config error: trainer.lr"),
    (["run", "CFG", "--only", "nosuch"], "unknown stage 'nosuch'"),
    (["run", "CFG", "--from", "nosuch"], "unknown stage 'nosuch'"),
    (["run", "CFG", "--only", "prepare", "trainer.lr=-1"], "config error: trainer.lr"),
    (["run", "CFG", "--only", "a,,b"], "empty stage name"),
    (["report"], "required: run_dir"),
    (["report", "/no/such/run"], "run directory not found"),
    (["report", "CFG", "x=1"], "report takes no KEY=VALUE overrides"),
]


@pytest.mark.parametrize("argv, says", USAGE_ERRORS, ids=[" ".join(a) or "(none)" for a, _ in USAGE_ERRORS])
def test_every_usage_error_exits_2_with_a_message(argv, says, tmp_path, capsys):
    cfg = _config(tmp_path)
    argv = [cfg if a == "CFG" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "run" / "prepare" / "final").exists()


def test_validate_without_arguments_names_config_not_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["validate"])
    err = capsys.readouterr().err
    assert "usage: polymath validate [options] CONFIG [KEY=VALUE ...]" in err and "overrides" not in err


def test_a_data_error_in_a_stage_process_is_one_line_exit_2(tmp_path):
    """The real entry point, as a Ray job runs it: bad rows under on_bad_row=error."""
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"id": "r0", "messages": [\n')
    cfg = _config(tmp_path, train=str(bad))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "stage", cfg, "prepare"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "DataError" in proc.stderr and "rows.jsonl:1" in proc.stderr
    manifest = json.loads((tmp_path / "run" / "prepare" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "Traceback" in manifest["traceback"]  # kept for the curious
