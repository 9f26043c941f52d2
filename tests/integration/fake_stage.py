"""A stand-in stage process for runner tests: `python fake_stage.py PLAN CONFIG STAGE [overrides]`.

It loads the config and runs the real `pipeline.stages.run_stage` (deps check, skip
rule, manifest, resume bookkeeping), with every stage kind replaced by a fake driver
whose behaviour comes from the JSON file PLAN (or "-" for all ok):
`{"<stage>": "ok" | "fail" | "fail_once" | "die_once" | "slow:N"}` (default ok).
- slow:N  N steps of ~0.3 s; each step appends "attempt step" to steps.log and writes a
          checkpoint atomically; a restarted stage resumes after its last checkpoint.
- gate:N  as slow:N, but waits after step 0 until the file `go` appears in the stage dir.
- meet:S  waits until stage S is running or done too (proves two stages ran at once).
- die_once  SIGKILLs its own process on the first attempt (a worker that dies).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.atomic import atomic_write_json  # noqa: E402
from pipeline import stages as stages_mod  # noqa: E402
from pipeline.config import load_config  # noqa: E402


PLAN: dict = {}


def _behaviour(stage: str) -> str:
    return PLAN.get(stage, "ok")


def _slow(ctx, steps: int, gate: bool = False) -> None:
    ckpt = ctx.out_dir / "ckpt.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.is_file() else 0
    attempt = ctx.run.read_manifest(ctx.stage.name)["attempt"]
    for step in range(start, steps):
        time.sleep(0.3)
        deadline = time.time() + 120
        while gate and step >= 1 and not (ctx.out_dir / "go").exists() and time.time() < deadline:
            time.sleep(0.1)
        with open(ctx.out_dir / "steps.log", "a") as f:
            f.write(f"{attempt} {step}\n")
        atomic_write_json(ckpt, {"step": step + 1})


def fake_driver(ctx) -> dict:
    name = ctx.stage.name
    how = _behaviour(name)
    marker = ctx.out_dir / "failed-once"
    if how == "fail" or (how == "fail_once" and not marker.exists()):
        marker.touch()
        raise RuntimeError(f"fake failure in {name}")
    if how == "die_once" and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if how.startswith("meet:"):  # wait (up to 60 s) until another stage is running too
        other, deadline = how[5:], time.time() + 60
        while (ctx.run.read_manifest(other) or {}).get("status") not in ("running", "done"):
            if time.time() > deadline:
                raise RuntimeError(f"fake: {name} waited 60 s for {other} to run alongside")
            time.sleep(0.1)
    if how.startswith(("slow:", "gate:")):
        _slow(ctx, int(how.split(":")[1]), gate=how.startswith("gate:"))
    else:
        time.sleep(0.2)
    atomic_write_json(ctx.out_dir / "env.json", {k: v for k, v in os.environ.items()
                                                  if k.startswith(("POLYMATH_", "RAY_ADDRESS", "RAY_NAMESPACE"))})
    with open(ctx.out_dir / "metrics.jsonl", "a") as f:
        for step in range(3):
            f.write(json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\n")
    if ctx.stage.kind == "eval":  # a results table in the real shape, so the runner prints it
        atomic_write_json(ctx.out_dir / "results.json",
                          {"models": {"base": {d: 0.0 for d in ctx.cfg.domain_names},
                                      "student": {d: 0.5 for d in ctx.cfg.domain_names}}})
    if ctx.stage.kind == "report":
        from pipeline.report import write_report

        return {"outputs": {"report": str(write_report(ctx.run.root))}}
    model = ctx.out_dir / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "input_hash").write_text(ctx.input_hash)  # which config made this output
    return {"outputs": {"model": str(model)}, "metrics": {"fake": True}}


def main(argv: list[str]) -> int:
    plan, config, stage, *overrides = argv
    if plan != "-":
        PLAN.update(json.loads(Path(plan).read_text()))
    cfg = load_config(config, overrides)
    stages_mod._stage_functions = lambda: {k: fake_driver for k in
                                           ("prepare", "sft", "grpo", "mixed_rl", "opd", "eval", "report")}
    stages_mod.run_stage(cfg, config, stage, overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
