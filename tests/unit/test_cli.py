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
