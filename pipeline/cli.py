"""`polymath` (or `python -m pipeline`) {validate,plan,stage,run,report}.

validate  check a config (schema, files, registries) without running anything
plan      print the stage graph in order with each stage's `ray job submit` line
stage     run one stage in this process (what each Ray job runs)
run       run the whole graph on an embedded local Ray, or on a cluster (--address)
report    (re)build the report of a run directory

Overrides (`key.path=value`) may stand anywhere after the subcommand:
`polymath run CFG --only sft:math opd trainer.lr=1e-4` runs two stages with one override.
Every usage, config or data error exits 2 with a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from pipeline.config import ConfigError, load_config


class _StageList(argparse.Action):
    """`--only a,b`, `--only a b` and `--only a --only b` all select stages a and b."""

    def __call__(self, parser, namespace, values, option_string=None):
        chosen = list(getattr(namespace, self.dest) or [])
        for value in values:
            for name in value.split(","):
                if not name.strip():
                    parser.error(f"{option_string}: empty stage name in {value!r}")
                if name.strip() not in chosen:
                    chosen.append(name.strip())
        setattr(namespace, self.dest, chosen)


# domains.math.grpo.lr=1e-4; a later segment may name a stage (resources.stages.sft:all.num_cpus=1,
# resources.stages.grpo:math@think-high.num_cpus=2)
OVERRIDE = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-\[\]:@]+)*=")
DOTTED_KEY = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-\[\]:@]+)+$")  # opd.rounds (no file path: no '/')
OVERRIDES_HELP = "dotted overrides applied after the file, anywhere among the arguments, e.g. opd.rounds=3"
CONFIG_HELP = "experiment YAML file (e.g. configs/tiny.yaml)"
USAGE_ERROR = 2  # argparse's own exit status for a bad command line


def _malformed_override(arg: str) -> bool:
    """`opd.rounds` without '=': a dotted key, not a config file (`tiny.yaml`, an existing path)."""
    return bool(DOTTED_KEY.match(arg)) and not re.search(r"\.(ya?ml|json)$", arg) and not os.path.exists(arg)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the `key=value` overrides), wherever the overrides stand: an
    option's value never looks like one (`--from=x` starts with '-', a URL has no bare key)."""
    rest, overrides = [], []
    for arg in argv:
        # a dotted key without '=' (`opd.rounds`) is a malformed override: load_config names it
        (overrides if OVERRIDE.match(arg) or _malformed_override(arg) else rest).append(arg)
    return rest, overrides


def _add_config(sub: argparse.ArgumentParser, *positionals: tuple[str, str]) -> None:
    """CONFIG, the subcommand's other positionals, and a usage line that shows [KEY=VALUE ...]."""
    sub.add_argument("config", help=CONFIG_HELP)
    for name, text in positionals:
        sub.add_argument(name, help=text)
    sub.set_defaults(overrides=[])
    sub.usage = (f"%(prog)s [options] CONFIG {' '.join(n.upper() for n, _ in positionals)} [KEY=VALUE ...]"
                 .replace("  ", " "))
    sub.epilog = f"KEY=VALUE  {OVERRIDES_HELP}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polymath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, text in (("validate", "check a config (schema, paths, registry names) without running anything; "
                                    "exit 2 on errors"),
                       ("plan", "print the stage graph in order with each stage's `ray job submit` line")):
        s = sub.add_parser(name, help=text, description=text)
        _add_config(s)
        if name == "plan":
            s.add_argument("--address", default="http://127.0.0.1:8265",
                           help="Ray dashboard URL the printed `ray job submit` lines use")
    text = "run one stage in this process (what each Ray job runs)"
    s = sub.add_parser("stage", help=text, description=text)
    _add_config(s, ("stage", "stage name as `plan` prints it, e.g. sft:math, opd, eval"))
    s.add_argument("--force", action="store_true", help="rerun even if the stage is done")
    text = "run the whole graph on an embedded local Ray, or on a cluster (--address)"
    s = sub.add_parser("run", help=text, description=text)
    _add_config(s)
    s.add_argument("--address", default=None, help="Ray dashboard URL: submit each stage as a job")
    s.add_argument("--only", nargs="+", action=_StageList, default=None, metavar="STAGE",
                   help="run only these stages (their inputs must be done): --only a,b, --only a b "
                        "or --only a --only b")
    s.add_argument("--from", dest="start", default=None, metavar="STAGE",
                   help="run this stage and every stage after it in graph order")
    s.add_argument("--seeds", default=None, metavar="SEEDS",
                   help="run the graph once per seed (0,1,2 or 0-2): the config's seed in its run_dir, every other "
                        "in <run_dir>-seed<N>; then the report over the seeds in <run_dir>-seeds/")
    text = "(re)build the report of a run directory; over several run directories (seeds), the figures over seeds"
    s = sub.add_parser("report", help=text, description=text)
    s.add_argument("run_dir", nargs="+", help="the run directory, e.g. runs/tiny; or several, e.g. runs/tiny "
                                              "runs/tiny-seed1 runs/tiny-seed2")
    s.add_argument("-o", "--out", default=None, help="with several run directories: where the seeds report goes "
                                                     "(default: <first run_dir>-seeds)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with its overrides taken out first, so they may stand anywhere."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    rest, overrides = split_overrides(argv[cmd_at + 1:])
    parser = _parser()
    args = parser.parse_args(argv[:cmd_at + 1] + rest)
    if overrides and not hasattr(args, "config"):
        parser.error(f"{args.cmd} takes no KEY=VALUE overrides: {' '.join(overrides)}")
    args.overrides = overrides
    return args


def _user_errors(files: bool) -> tuple[type, ...]:
    """Errors that mean bad input (config, data, template; a missing file where `files`), not
    a bug: one line, no traceback. Only from modules already loaded (an error cannot come
    from one that is not). Inside a stage a missing file is not counted: `validate` checks
    the inputs a config names, so there it is more likely a fault worth a retry."""
    named = {"pipeline.config": "ConfigError", "engine.data": "DataError", "engine.chat": "ChatTemplateError",
             "distill.heads": "VocabMismatchError", "pipeline.stages": "StageUsageError"}
    return ((FileNotFoundError, NotADirectoryError) if files else ()) + tuple(
        getattr(sys.modules[m], n) for m, n in named.items() if m in sys.modules)


def _print_user_error(exc: BaseException, where: str) -> int:
    from pipeline.config import ConfigError

    if isinstance(exc, ConfigError):
        for path, reason in exc.errors:
            print(f"config error: {path}: {reason}", file=sys.stderr)
    else:
        print(f"error: {where}{type(exc).__name__}: {exc}", file=sys.stderr)
    return USAGE_ERROR


def _load(args):
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        _print_user_error(exc, "")
        return None


def _run_seeds(cfg, args, seeds: list[int]) -> int:
    """One run of the graph per seed, one after another, then the report over the seeds."""
    from pipeline.runner import run_experiment
    from pipeline.seeds import seed_run_dir, write_seeds_report

    codes, dirs = [], []
    for seed in seeds:
        run_dir = seed_run_dir(cfg.run_path, cfg.seed, seed)
        overrides = [*args.overrides, f"seed={seed}", f"run_dir={run_dir}"]
        print(f"== seed {seed}: {run_dir}", flush=True)
        seed_cfg = load_config(args.config, overrides)
        codes.append(run_experiment(seed_cfg, args.config, overrides, address=args.address,
                                    only=args.only, start=args.start))
        dirs.append(run_dir)
    print("", *(f"seed {s}: {d}: {'ok' if c == 0 else f'exit {c}'}" for s, d, c in zip(seeds, dirs, codes)),
          sep="\n")
    if len(dirs) > 1 and all(c == 0 for c in codes):
        try:
            print(f"report over seeds: {write_seeds_report(dirs)}")
        except (FileNotFoundError, RuntimeError) as exc:  # e.g. --only without eval
            print(f"no report over seeds: {exc}")
    return max(codes)


def _data_ok(cfg, config_path: str) -> bool:
    """The first rows of every data source read through their adapters (pipeline.data_check)."""
    from pathlib import Path

    from pipeline.data_check import data_errors

    errors, warnings = data_errors(cfg, Path(config_path).parent)
    for path, reason in warnings:
        print(f"data warning: {path}: {reason}", file=sys.stderr)
    for path, reason in errors:
        print(f"data error: {path}: {reason}", file=sys.stderr)
    return not errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _dispatch(args)
    except Exception as exc:  # noqa: BLE001 - a user error is one line; anything else is a bug
        if isinstance(exc, _user_errors(files=args.cmd != "stage")):
            where = f"stage {args.stage}: " if args.cmd == "stage" else ""
            if args.cmd == "stage":
                print(f"[{args.stage}] failed; the traceback is in its manifest.json", file=sys.stderr)
            return _print_user_error(exc, where)
        raise


def _dispatch(args) -> int:
    if args.cmd == "report":
        if len(args.run_dir) == 1:
            from pipeline.report import write_report

            print(write_report(args.run_dir[0]))
            return 0
        from pipeline.seeds import write_seeds_report

        try:
            print(write_seeds_report(args.run_dir, args.out))
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return USAGE_ERROR
        return 0
    cfg = _load(args)
    if cfg is None:
        return USAGE_ERROR
    if args.cmd in ("validate", "run") and not _data_ok(cfg, args.config):
        return USAGE_ERROR
    if args.cmd == "validate":
        from pipeline.graph import build_graph

        print(f"ok: experiment {cfg.experiment!r}, {len(cfg.domains)} domains "
              f"({', '.join(cfg.domain_names)}), {len(build_graph(cfg))} stages, run dir {cfg.run_path}")
        return 0
    if args.cmd == "plan":
        from pipeline.graph import build_graph, input_hashes
        from pipeline.launch import submit_command

        stages = build_graph(cfg)
        hashes = input_hashes(stages)
        for i, s in enumerate(stages, 1):
            deps = ", ".join(s.deps) or "-"
            print(f"{i:2d}. {s.name:<12} after: {deps}  [input {hashes[s.name]}]")
            print(f"    {submit_command(cfg, args.config, s.name, args.address, args.overrides)}")
        return 0
    if args.cmd == "stage":
        from pipeline.stages import run_stage

        run_stage(cfg, args.config, args.stage, args.overrides, force=args.force)
        return 0
    if args.cmd == "run":
        from pipeline.runner import run_experiment

        seeds = cfg.seeds
        if args.seeds is not None:
            from pipeline.seeds import parse_seeds

            try:
                seeds = parse_seeds(args.seeds)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return USAGE_ERROR
        if not seeds:
            return run_experiment(cfg, args.config, args.overrides, address=args.address,
                                  only=args.only, start=args.start)
        return _run_seeds(cfg, args, seeds)
    return 1
