"""`python -m pipeline {validate,plan,stage,run,report}`.

validate  check a config (schema, files, registries) without running anything
plan      print the stage graph in order with each stage's `ray job submit` line
stage     run one stage in this process (what each Ray job runs)
run       run the whole graph on an embedded local Ray, or on a cluster (--address)
report    (re)build the report of a run directory
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("validate", "plan"):
        s = sub.add_parser(name)
        s.add_argument("config")
        s.add_argument("overrides", nargs="*", help="dotted overrides: opd.rounds=3")
        if name == "plan":
            s.add_argument("--address", default="http://127.0.0.1:8265")
    s = sub.add_parser("stage")
    s.add_argument("config")
    s.add_argument("stage")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--force", action="store_true", help="rerun even if done")
    s = sub.add_parser("run")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--address", default=None, help="Ray dashboard URL: submit each stage as a job")
    s.add_argument("--only", nargs="+", default=None, metavar="STAGE")
    s.add_argument("--from", dest="start", default=None, metavar="STAGE")
    s = sub.add_parser("report")
    s.add_argument("run_dir")
    return p


def _load(args):
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        for path, reason in exc.errors:
            print(f"config error: {path}: {reason}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "report":
        from pipeline.report import write_report

        print(write_report(args.run_dir))
        return 0
    cfg = _load(args)
    if cfg is None:
        return 2
    if args.cmd == "validate":
        from pipeline.graph import build_graph

        print(f"ok: experiment {cfg.experiment!r}, {len(cfg.domains)} domains "
              f"({', '.join(cfg.domain_names)}), {len(build_graph(cfg))} stages, run dir {cfg.run_path}")
        return 0
    if args.cmd == "plan":
        from pipeline.graph import build_graph, input_hashes, submit_command

        stages = build_graph(cfg)
        hashes = input_hashes(stages)
        for i, s in enumerate(stages, 1):
            deps = ", ".join(s.deps) or "-"
            print(f"{i:2d}. {s.name:<12} after: {deps}  [input {hashes[s.name]}]")
            print(f"    {submit_command(args.config, s.name, args.address, args.overrides)}")
        return 0
    if args.cmd == "stage":
        from pipeline.stages import run_stage

        run_stage(cfg, args.config, args.stage, args.overrides, force=args.force)
        return 0
    if args.cmd == "run":
        from pipeline.runner import run_experiment

        return run_experiment(cfg, args.config, args.overrides, address=args.address,
                              only=args.only, start=args.start)
    return 1
