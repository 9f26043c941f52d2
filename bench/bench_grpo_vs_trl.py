"""Our GRPO step (`experts.grpo.run_grpo`) vs `trl.GRPOTrainer` (use_vllm=False), CPU.

    python -m bench.bench_grpo_vs_trl [--quick] [--repeats N] [--steps N]

Same tiny model (the project's Qwen2 tiny shape, hidden 128 x 4 layers, character
vocabulary), same 4 arithmetic prompts per step, G=4, at most 32 new tokens, temperature 1,
the same reward (`rewards.get_verifier("math")`, scored in-process on both sides), AdamW
lr 5e-4, clip 1.0, token-mean aggregation (TRL `loss_type="dapo"`), z-scored group
advantages, eps 0.2 / 0.28, no KL term, one optimiser step per generation batch, fp32,
1 thread, gradient checkpointing off.
- ours: one `run_grpo` step = rollout with `HFGenerator` + scoring, train step (no
  old-log-prob forward: one on-policy mini-batch, as TRL with num_iterations=1), pushing the weights to the
  generator. Generation excluded = the step minus `time/generate_score`.
- TRL: one optimiser step (`on_step_begin` -> `on_step_end`), generating with the training
  model itself. Generation excluded = the step minus the time inside `_generate` and
  `_calculate_rewards` (wrapped with a timer).
Sampling is random on both sides, so completion lengths differ from step to step (and
between the two): the tokens per step are reported beside the times.
Each side runs in fresh processes (`--repeats`), `--steps` timed steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (MIB, child_main, fmt, print_table, run_child, set_threads, summarize, write_results)

MODULE = "bench.bench_grpo_vs_trl"
FULL = {"prompts": 4, "group": 4, "max_new_tokens": 32, "hidden": 128, "layers": 4}
QUICK = {"prompts": 2, "group": 2, "max_new_tokens": 4, "hidden": 32, "layers": 1}


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        rows.append({"id": f"add-{i}", "domain": "math", "messages": [{"role": "user", "content": f"{a}+{b}="}],
                     "reference": {"answer": str(a + b)}})
    return rows


class LocalScorer:
    """`score(name, completions, references)` in this process (both sides score alike)."""

    def score(self, name, completions, references):
        from rewards import get_verifier

        fn = get_verifier(name)
        return [fn(c, r) for c, r in zip(completions, references)]


class _Clock:
    def __init__(self):
        self.records = []

    def log(self, metrics, step=None):
        self.records.append({"t": time.perf_counter(), "cpu": time.process_time(), **metrics})


def ours_child(a: dict) -> dict:
    set_threads(a["threads"])
    from engine.generation import HFGenerator
    from engine.model import load_tokenizer
    from engine.trainer import TrainerSettings, build_trainer
    from experts.grpo import DomainSpec, run_grpo
    from experts.grpo_settings import GRPOSettings

    c = a["cfg"]
    steps = a["warmup"] + a["steps"]
    settings = GRPOSettings(steps=steps, prompts_per_step=c["prompts"], group_size=c["group"],
                            max_new_tokens=c["max_new_tokens"], lr=5e-4, micro_batch_size=c["prompts"] * c["group"],
                            loss_agg="token-mean", save_every=10_000, seed=0)
    tok = load_tokenizer(a["model"])
    trainer = build_trainer(TrainerSettings(lr=5e-4, seed=0, deterministic=False), a["model"])
    clock = _Clock()
    t0, c0 = time.perf_counter(), time.process_time()
    run_grpo(settings, trainer=trainer, generator=HFGenerator(a["model"], tok), scorer=LocalScorer(), tokenizer=tok,
             train_rows=make_rows(c["prompts"] * steps), domains={"math": DomainSpec("math")},
             out_dir=a["work_dir"], logger=clock)
    marks = [t0] + [r["t"] for r in clock.records]
    total = [e - s for s, e in zip(marks, marks[1:])]
    gen = [r["time/generate_score"] for r in clock.records]
    w = a["warmup"]
    cpu = [c0] + [r["cpu"] for r in clock.records]
    return {"step_seconds": total[w:], "step_cpu_seconds": [e - s for s, e in zip(cpu, cpu[1:])][w:],
            "excl_generation_seconds": [t - g for t, g in zip(total, gen)][w:],
            "response_len": [r["response_len"] for r in clock.records][w:]}


def trl_child(a: dict) -> dict:
    set_threads(a["threads"])
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from engine.model import load_model, load_tokenizer
    from rewards import get_verifier

    c = a["cfg"]
    steps = a["warmup"] + a["steps"]
    spans, gen_time = [], [0.0]
    verifier = get_verifier("math")

    def math_reward(prompts, completions, reference, **kw):
        texts = [x[0]["content"] if isinstance(x, list) else x for x in completions]
        return [verifier(t, r).score for t, r in zip(texts, reference)]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.g0, self.c0 = time.perf_counter(), gen_time[0], time.process_time()

        def on_step_end(self, args, state, control, **kw):
            spans.append((time.perf_counter() - self.t0, gen_time[0] - self.g0, time.process_time() - self.c0))

    rows = make_rows(c["prompts"] * steps)
    data = Dataset.from_list([{"prompt": r["messages"], "reference": r["reference"]} for r in rows])
    args = GRPOConfig(
        output_dir=a["work_dir"], per_device_train_batch_size=c["prompts"] * c["group"], gradient_accumulation_steps=1,
        num_generations=c["group"], max_completion_length=c["max_new_tokens"], temperature=1.0, top_p=1.0,
        learning_rate=5e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, adam_beta1=0.9,
        adam_beta2=0.95, weight_decay=0.0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", num_iterations=1, max_steps=steps, use_vllm=False, use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True,
        shuffle_dataset=False, seed=0)
    trainer = GRPOTrainer(model=load_model(a["model"]), reward_funcs=math_reward, args=args, train_dataset=data,
                          processing_class=load_tokenizer(a["model"]), callbacks=[Clock()])
    for name in ("_generate", "_calculate_rewards"):
        trainer.__dict__[name] = _timed(getattr(trainer, name), gen_time)
    trainer.train()
    w = a["warmup"]
    return {"step_seconds": [t for t, _, _ in spans][w:], "step_cpu_seconds": [c for _, _, c in spans][w:],
            "excl_generation_seconds": [t - g for t, g, _ in spans][w:]}


def _timed(fn, acc: list):
    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            acc[0] += time.perf_counter() - t0
    return wrapper


def run_named_child(a: dict) -> dict:
    return {"ours": ours_child, "trl": trl_child}[a["kind"]](a)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, run_named_child):
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inprocess", action="store_true")
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    cfg = QUICK if opts.quick else FULL
    repeats, steps = opts.repeats or (1 if opts.quick else 2), opts.steps or (1 if opts.quick else 4)
    from engine.model import TinySpec, materialize_tiny

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        spec = TinySpec(hidden_size=cfg["hidden"], num_layers=cfg["layers"], intermediate_size=3 * cfg["hidden"])
        model = str(materialize_tiny(spec, Path(tmp) / "model", seed=0))
        for kind in ("ours", "trl"):
            runs = [run_child(MODULE, {"kind": kind, "cfg": cfg, "model": model, "threads": opts.threads,
                                       "warmup": 1, "steps": steps, "work_dir": str(Path(tmp) / f"{kind}{r}")},
                              inprocess=opts.inprocess, child_fn=run_named_child) for r in range(repeats)]
            out[kind] = {"step_seconds": summarize([s for r in runs for s in r["step_seconds"]]),
                         "step_cpu_seconds": summarize([s for r in runs for s in r["step_cpu_seconds"]]),
                         "excl_generation_seconds": summarize([s for r in runs for s in r["excl_generation_seconds"]])}
    ratio = out["ours"]["step_seconds"]["median"] / out["trl"]["step_seconds"]["median"]
    ratio_cpu = out["ours"]["step_cpu_seconds"]["median"] / out["trl"]["step_cpu_seconds"]["median"]
    ratio_ex = out["ours"]["excl_generation_seconds"]["median"] / out["trl"]["excl_generation_seconds"]["median"]
    res = {"quick": opts.quick, "config": cfg, "repeats": repeats, "steps_per_process": steps, "threads": opts.threads,
           **out, "ratio_ours_over_trl_time": ratio, "ratio_ours_over_trl_time_excl_generation": ratio_ex,
           "ratio_ours_over_trl_cpu_time": ratio_cpu,
           "targets": {"step_time_ours_over_trl": {"target": 1.0, "measured": ratio,
                                                   "measured_excl_generation": ratio_ex}}}
    write_results("grpo_vs_trl", res, opts.out)
    print_table(f"GRPO step, ours vs trl.GRPOTrainer ({cfg['prompts']} prompts x G={cfg['group']}, "
                f"<= {cfg['max_new_tokens']} new tokens; seconds median [min-max])",
                ["", "step s", "step CPU s", "step s excl. generation"],
                [[k, fmt(out[k]["step_seconds"]), fmt(out[k]["step_cpu_seconds"]), fmt(out[k]["excl_generation_seconds"])]
                 for k in ("ours", "trl")] + [["ours/TRL", f"{ratio:.2f}x", f"{ratio_cpu:.2f}x", f"{ratio_ex:.2f}x"]])
    return res


if __name__ == "__main__":
    main()
