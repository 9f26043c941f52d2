"""OPD ablations on a finished run's experts: each arm reruns the `opd` stage (config
overrides) against the same teachers, and with `--rerun sft:all` the student's start too,
then scores its student greedily on the eval prompts the eval stage uses, paired per prompt
against the run's own student and each domain's expert.

    python scripts/opd_ablation.py configs/tiny.yaml --source runs/tiny --out runs/ablate \\
        --arm teacher_mean=opd.loss_aggregation=teacher_token_mean \\
        --arm fkl=opd.divergence=forward_kl
    python scripts/opd_ablation.py configs/tiny.yaml --source runs/tiny --out runs/ablate-start \\
        --rerun sft:all --arm balanced=student_sft.loss_aggregation=domain_token_mean

Each arm's run directory links the source's finished stages (prepare, sft-*, grpo-*; not the
ones it reruns), so the arm's `opd` stage reads exactly the source's teachers; `<out>/<arm>/ablation.json`
holds its greedy per-prompt scores and `<out>/summary.md` the paired table (difference
+- paired standard error). Run from the repository root (manifest outputs are relative to it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _link_source(source: Path, arm_dir: Path, rerun: list[str]) -> None:
    arm_dir.mkdir(parents=True, exist_ok=True)
    own = {s.replace(":", "-") for s in rerun}
    for d in sorted(source.iterdir()):
        if d.is_dir() and d.name not in own and (d.name == "prepare" or d.name.startswith(("sft-", "grpo-"))):
            link = arm_dir / d.name
            if not link.exists():
                link.symlink_to(d.resolve(), target_is_directory=True)


def _run_stage(config: str, arm_dir: Path, stage: str, overrides: list[str]) -> None:
    """One stage as `pipeline run` launches it: the same command and the same torch threads
    (OMP_NUM_THREADS = the stage's CPUs, pipeline.launch), so an arm without overrides
    reproduces the source run's student bit for bit. A stage already done is skipped."""
    import math

    from pipeline.config import load_config

    cpus = load_config(config, [f"run_dir={arm_dir}", *overrides]).resources_for(stage).num_cpus
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, math.ceil(cpus)))}
    manifest = arm_dir / stage.replace(":", "-") / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("status") == "done":
        return
    cmd = [sys.executable, "-m", "pipeline", "stage", config, stage, f"run_dir={arm_dir}", "logging.wandb=disabled",
           "logging.progress=false", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def _evaluate(config: str, source: Path, model_dir: str, overrides: list[str]) -> dict:
    """The eval stage's own method (greedy, its settings, its policy and scorer) on one model."""
    from engine.data import load_rows
    from pipeline.config import load_config
    from pipeline.evaluate import EvalSet, EvalSettings, evaluate_models
    from pipeline.rundir import RunDir
    from pipeline.eval_policy import eval_policy
    from pipeline.stage_workers import checked_scores, scorer_pool

    cfg = load_config(config, [f"run_dir={source}", *overrides])
    run = RunDir(source)
    sets = [EvalSet(d.name, d.verifier, load_rows(run.output("prepare", f"data:{d.name}:eval"), on_bad_row="error"),
                    d.data.synthetic.generator if d.data.synthetic else None) for d in cfg.domains]
    settings = EvalSettings(samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                            max_new_tokens=cfg.eval.max_new_tokens, max_prompts=cfg.eval.max_prompts)
    import torch

    torch.set_num_threads(1)  # as the eval stage's workers (one thread each)
    with scorer_pool(cfg, 2) as pool:
        return evaluate_models({"student": model_dir}, sets, lambda d: eval_policy(cfg, d),
                               checked_scores(pool, "ablation eval"), settings)


def _summary(source: Path, arms: dict[str, dict]) -> str:
    from pipeline.evaluate import paired_difference

    base = json.loads((source / "eval" / "results.json").read_text())
    per = base["greedy_per_prompt"]
    domains = sorted(per["student"])
    lines = ["| arm | " + " | ".join(f"{d} (vs run's student; / expert)" for d in domains) + " |",
             "|---|" + "---|" * len(domains)]
    row = ["run's student"] + [f"{base['models']['student'][d]:.3f} (/{base['models'][f'grpo:{d}'][d]:.3f} = "
                               f"{base['models']['student'][d] / max(base['models'][f'grpo:{d}'][d], 1e-9):.2f})"
                               for d in domains]
    lines.append("| " + " | ".join(row) + " |")
    for name, res in arms.items():
        cells = []
        for d in domains:
            mine = res["greedy_per_prompt"]["student"][d]
            diff, se = paired_difference(per["student"][d], mine)
            score = res["models"]["student"][d]
            cells.append(f"{score:.3f} ({diff:+.3f} +- {se:.3f}; / expert {score / max(base['models'][f'grpo:{d}'][d], 1e-9):.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _split_overrides(text: str) -> list[str]:
    """`a=1,b={x: 1, y: 2}` -> ['a=1', 'b={x: 1, y: 2}']: commas inside brackets stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--source", required=True, help="a finished run directory (its experts and student start)")
    ap.add_argument("--out", required=True, help="where the arms' run directories go")
    ap.add_argument("--arm", action="append", required=True, metavar="NAME=OVERRIDE[,OVERRIDE...]")
    ap.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                    help="a stage each arm reruns before opd instead of linking the source's (e.g. sft:all)")
    args = ap.parse_args(argv)
    source, out = Path(args.source), Path(args.out)
    arms = {}
    for spec in args.arm:
        name, _, ov = spec.partition("=")
        overrides = [o for o in _split_overrides(ov) if o]
        arm_dir = out / name
        _link_source(source, arm_dir, args.rerun)
        for stage in [*args.rerun, "opd"]:
            _run_stage(args.config, arm_dir, stage, overrides)
        result_path = arm_dir / "ablation.json"
        if not result_path.is_file():
            res = _evaluate(args.config, source, json.loads((arm_dir / "opd" / "manifest.json").read_text())
                            ["outputs"]["final"], overrides)
            res["overrides"] = overrides
            res["opd_metrics"] = json.loads((arm_dir / "opd" / "manifest.json").read_text())["metrics"]
            tmp = result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            os.replace(tmp, result_path)
        arms[name] = json.loads(result_path.read_text())
        text = _summary(source, arms)
        (out / "summary.md").write_text(text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
