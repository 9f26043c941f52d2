"""Probe one GRPO setting without rerunning the pipeline: start from a finished run's
`sft:<domain>` checkpoint, run `experts.grpo.run_grpo` with overridden settings, and
compare the greedy score before and after on N held-out problems (paired standard error).

    .venv/bin/python scripts/probe_grpo.py DOMAIN [key=value ...] [--run runs/tiny]
        [--config configs/tiny.yaml] [--neval 256] [--out /tmp/grpo-probe]

e.g. `scripts/probe_grpo.py math steps=120 lr=3e-5 max_new_tokens=48`. Keys are
`GRPOSettings` fields (values parsed as JSON), applied over the config's `domains.<d>.grpo`.
Prints one JSON line per step (reward, response length, times) and a final line
{"sft", "grpo", "diff", "se"}. This is how the tiny.yaml GRPO settings were chosen
(issue 5's note lists the probes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("domain")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--run", default="runs/tiny")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--neval", type=int, default=256)
    p.add_argument("--out", default="/tmp/grpo-probe")
    a = p.parse_args()

    import torch

    from engine.checkpoint import CheckpointManager
    from engine.data import load_rows
    from engine.domains import get_domain
    from engine.generation import build_generator
    from engine.model import load_tokenizer
    from engine.trainer import build_trainer, with_overrides
    from experts.grpo import DomainSpec, run_grpo
    from experts.grpo_settings import GRPOSettings
    from pipeline.config import load_config
    from pipeline.evaluate import EvalSet, EvalSettings, evaluate_domain, paired_difference
    from pipeline.eval_policy import eval_policy
    from pipeline.stage_workers import checked_scores
    from rewards import ScorerPool

    torch.set_num_threads(1)
    d = a.domain
    cfg = load_config(a.config)
    dc = cfg.domain(d)
    fields = dc.grpo.model_dump()
    for kv in a.overrides:
        k, _, v = kv.partition("=")
        fields[k] = json.loads(v)
    settings = GRPOSettings(**fields)
    init = CheckpointManager(Path(a.run) / f"sft-{d}" / "checkpoints").latest()
    if init is None:
        raise SystemExit(f"no sft:{d} checkpoint under {a.run}: run the pipeline up to sft:{d} first")
    init = str(init)
    out = Path(a.out) / d
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok = load_tokenizer(init)
    dom = get_domain(dc.data.synthetic.generator)
    env = dom.environment()
    evals = dom.generate("eval", a.neval, seed=cfg.seed)
    pool = ScorerPool(num_workers=1)

    eval_set = EvalSet(d, dc.verifier, evals, dc.data.synthetic.generator)

    def greedy(model_dir: str) -> list[float]:  # the eval stage's greedy pass, per prompt
        policy = eval_policy(cfg, model_dir)
        try:
            return evaluate_domain(policy, eval_set, checked_scores(pool, "probe eval"),
                                   EvalSettings(samples=0, max_new_tokens=cfg.eval.max_new_tokens))["greedy_scores"]
        finally:
            policy.close()

    class Log:
        def log(self, m, step):
            keep = ("step", "reward_mean", "response_len", "truncated_frac", "time/")
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()
                              if k.startswith(keep)}), flush=True)

    before = greedy(init)
    trainer = build_trainer(with_overrides(cfg.trainer, lr=settings.lr, weight_decay=settings.weight_decay,
                                           warmup_steps=settings.warmup_steps, grad_clip=settings.grad_clip,
                                           schedule="constant", total_steps=None, seed=settings.seed),
                            init, tokenizer_dir=init)
    gen = build_generator(cfg.generator, init, tokenizer=tok, dtype=cfg.model.dtype)
    ck = CheckpointManager(out / "checkpoints", keep_last=1)
    t0 = time.time()
    run_grpo(settings, trainer=trainer, generator=gen, scorer=pool, tokenizer=tok,
             train_rows=load_rows(Path(a.run) / "prepare" / "data" / d / "train.jsonl"),
             domains={d: DomainSpec(verifier=dc.verifier, environment=env)}, out_dir=out, logger=Log(),
             checkpoints=ck)
    seconds = time.time() - t0
    gen.close()
    after = greedy(str(ck.latest()))
    pool.close()
    diff, se = paired_difference(before, after)
    print(json.dumps({"domain": d, "overrides": a.overrides, "n": len(evals), "sft": round(sum(before) / len(before), 4),
                      "grpo": round(sum(after) / len(after), 4), "diff": round(diff, 4), "se": round(se, 4),
                      "train_seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
