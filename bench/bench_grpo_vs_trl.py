"""Our GRPO step (`experts.grpo.run_grpo`), padded and packed, vs `trl.GRPOTrainer` (use_vllm=False), CPU.

    python -m bench.bench_grpo_vs_trl [--quick] [--repeats N] [--steps N]

Same tiny model (the project's Qwen2 tiny shape, hidden 128 x 4 layers, character
vocabulary), same 8 arithmetic prompts per step, G=8, at most 96 new tokens, temperature 1,
the same reward (`rewards.get_verifier("math")`, scored in-process on both sides), AdamW
lr 5e-4, clip 1.0, token-mean aggregation (TRL `loss_type="dapo"`), z-scored group
advantages, eps 0.2 / 0.28, no KL term, one optimiser step per generation batch, fp32,
1 thread, gradient checkpointing off.
Length spread: the random model's end-of-sequence row of the output layer is set to
`eos_scale` x a random unit vector, so its EOS logit is `eos_scale` x N(0, 1) at each
position and completions stop anywhere from 1 token to the 96-token budget (the spread is
measured and reported: median, 10th and 90th percentile of the completion lengths; as in
the demo, where math answers of ~6 tokens sit beside 96-token replies).
- ours (padded): one `run_grpo` step = rollout with `HFGenerator` + scoring, train step
  (no old-log-prob forward: one on-policy mini-batch, as TRL with num_iterations=1) on
  right-padded micro-batches of 16 samples, pushing the weights to the generator.
- ours (packed): the same with `micro_batch_tokens` (samples packed into rows as long as
  the step's longest, 2048 tokens per micro-batch).
  Generation excluded = the step minus `time/generate_score`.
- TRL: one optimiser step (`on_step_begin` -> `on_step_end`), generating with the training
  model itself, the whole batch in one forward (its default). Generation excluded = the step
  minus the time inside `_generate` and `_calculate_rewards` (wrapped with a timer).
Sampling is random on both sides, so completion lengths differ from step to step (and
between the sides): throughput is tokens/s, tokens = prompt + completion tokens of the
step's samples, over the step's time (whole step) or its time excluding generation
(training step). Each side runs in fresh processes (`--repeats`), `--steps` timed steps
after one warm-up.
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
FULL = {"prompts": 8, "group": 8, "max_new_tokens": 96, "hidden": 128, "layers": 4, "eos_scale": 5.0,
        "micro_batch_size": 16, "micro_batch_tokens": 2048}
QUICK = {"prompts": 2, "group": 2, "max_new_tokens": 4, "hidden": 32, "layers": 1, "eos_scale": 3.0,
         "micro_batch_size": 2, "micro_batch_tokens": 64}


def spread_lengths(model_dir: str, eos_scale: float, seed: int = 0) -> None:
    """Set the output row of EOS to `eos_scale` x a random unit vector (in place, safetensors):
    the EOS logit becomes eos_scale x N(0, 1) per position (the final norm makes hidden
    states of norm ~sqrt(H)), so random completions end at spread lengths."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    eos = cfg["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    f = Path(model_dir) / "model.safetensors"
    state = load_file(str(f))
    key = "lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"
    row = torch.randn(state[key].shape[1], generator=torch.Generator().manual_seed(seed))
    state[key][eos] = eos_scale * row / row.norm()
    save_file(state, str(f), metadata={"format": "pt"})


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
                            max_new_tokens=c["max_new_tokens"], lr=5e-4, micro_batch_size=c["micro_batch_size"],
                            micro_batch_tokens=c["micro_batch_tokens"] if a["packed"] else None,
                            loss_agg="token-mean", save_every=10_000, seed=0)
    tok = load_tokenizer(a["model"])
    trainer = build_trainer(TrainerSettings(lr=5e-4, seed=0, deterministic=False), a["model"])
    clock = _Clock()
    t0, c0 = time.perf_counter(), time.process_time()
    gen = HFGenerator(a["model"], tok)
    lengths: list[list[int]] = []  # per generate call (one per step): the completions' lengths
    plain = gen.generate
    gen.generate = lambda prompts, sampling: _recorded(plain(prompts, sampling), lengths)
    run_grpo(settings, trainer=trainer, generator=gen, scorer=LocalScorer(), tokenizer=tok,
             train_rows=make_rows(c["prompts"] * steps), domains={"math": DomainSpec("math")},
             out_dir=a["work_dir"], logger=clock)
    marks = [t0] + [r["t"] for r in clock.records]
    total = [e - s for s, e in zip(marks, marks[1:])]
    gen = [r["time/generate_score"] for r in clock.records]
    w = a["warmup"]
    cpu = [c0] + [r["cpu"] for r in clock.records]
    return {"step_seconds": total[w:], "step_cpu_seconds": [e - s for s, e in zip(cpu, cpu[1:])][w:],
            "excl_generation_seconds": [t - g for t, g in zip(total, gen)][w:],
            "tokens": [r["tokens_per_s"] * r["time/train"] for r in clock.records][w:],
            "completion_lengths": [x for step in lengths[w:] for x in step],
            "response_len": [r["response_len"] for r in clock.records][w:]}


def _recorded(completions, lengths: list):
    lengths.append([len(c.token_ids) for c in completions])
    return completions


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
    tokens, lengths = [], []  # per `_generate` call (one per step)

    def counted(fn):
        def wrapper(prompts):
            out = fn(prompts)
            prompt_ids, completion_ids = out[0], out[1]
            lengths.append([len(x) for x in completion_ids])
            tokens.append(sum(len(x) for x in prompt_ids) + sum(lengths[-1]))
            return out
        return wrapper

    trainer.__dict__["_generate"] = _timed(counted(trainer._generate), gen_time)
    trainer.__dict__["_calculate_rewards"] = _timed(trainer._calculate_rewards, gen_time)
    trainer.train()
    w = a["warmup"]
    return {"step_seconds": [t for t, _, _ in spans][w:], "step_cpu_seconds": [c for _, _, c in spans][w:],
            "excl_generation_seconds": [t - g for t, g, _ in spans][w:], "tokens": tokens[w:],
            "completion_lengths": [x for step in lengths[w:] for x in step]}


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

    out, spread = {}, {}
    kinds = {"ours (padded)": ("ours", False), "ours (packed)": ("ours", True), "trl": ("trl", False)}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        spec = TinySpec(hidden_size=cfg["hidden"], num_layers=cfg["layers"], intermediate_size=3 * cfg["hidden"])
        model = str(materialize_tiny(spec, Path(tmp) / "model", seed=0))
        spread_lengths(model, cfg["eos_scale"])
        runs = {k: [] for k in kinds}
        for r in range(repeats):  # the sides alternate, so a change in the machine's load hits each alike
            for name, (kind, packed) in kinds.items():
                runs[name].append(run_child(MODULE, {"kind": kind, "packed": packed, "cfg": cfg, "model": model,
                                                     "threads": opts.threads, "warmup": 1, "steps": steps,
                                                     "work_dir": str(Path(tmp) / f"{kind}{packed}{r}")},
                                            inprocess=opts.inprocess, child_fn=run_named_child))
        for name, rs in runs.items():
            flat = lambda key: [s for r in rs for s in r[key]]  # noqa: E731
            tok, step, ex = flat("tokens"), flat("step_seconds"), flat("excl_generation_seconds")
            out[name] = {"step_seconds": summarize(step), "step_cpu_seconds": summarize(flat("step_cpu_seconds")),
                         "excl_generation_seconds": summarize(ex),
                         "tokens_per_step": summarize(tok),
                         "step_tokens_per_s": sum(tok) / sum(step),
                         "train_tokens_per_s": sum(tok) / sum(ex)}
            lens = sorted(flat("completion_lengths"))
            spread[name] = {"median": lens[len(lens) // 2], "p10": lens[len(lens) // 10], "p90": lens[len(lens) * 9 // 10],
                            "max": lens[-1], "at_budget": sum(x >= cfg["max_new_tokens"] for x in lens) / len(lens)}
    trl = out["trl"]
    ratios = {name: {"step_tokens_per_s_over_trl": out[name]["step_tokens_per_s"] / trl["step_tokens_per_s"],
                     "train_tokens_per_s_over_trl": out[name]["train_tokens_per_s"] / trl["train_tokens_per_s"]}
              for name in ("ours (padded)", "ours (packed)")}
    packed_over_padded = out["ours (packed)"]["train_tokens_per_s"] / out["ours (padded)"]["train_tokens_per_s"]
    res = {"quick": opts.quick, "config": cfg, "repeats": repeats, "steps_per_process": steps, "threads": opts.threads,
           **out, "completion_lengths": spread, "ratios": ratios, "packed_over_padded_train_tokens_per_s": packed_over_padded,
           "targets": {"throughput_ours_packed_over_trl": {
               "target": 1.3, "measured_train_step": ratios["ours (packed)"]["train_tokens_per_s_over_trl"],
               "measured_whole_step": ratios["ours (packed)"]["step_tokens_per_s_over_trl"]}}}
    write_results("grpo_vs_trl", res, opts.out)
    print_table(f"GRPO step, ours vs trl.GRPOTrainer ({cfg['prompts']} prompts x G={cfg['group']}, "
                f"<= {cfg['max_new_tokens']} new tokens; seconds median [min-max]; tokens/s = prompt + completion "
                "tokens over the time)",
                ["", "step s", "step s excl. generation", "tokens/step", "tokens/s step", "tokens/s train",
                 "completion len p10/median/p90"],
                [[k, fmt(out[k]["step_seconds"]), fmt(out[k]["excl_generation_seconds"]), fmt(out[k]["tokens_per_step"]),
                  f"{out[k]['step_tokens_per_s']:.0f}", f"{out[k]['train_tokens_per_s']:.0f}",
                  f"{spread[k]['p10']}/{spread[k]['median']}/{spread[k]['p90']}"] for k in out]
                + [[f"{k}/TRL", "", "", "", f"{v['step_tokens_per_s_over_trl']:.2f}x",
                    f"{v['train_tokens_per_s_over_trl']:.2f}x", ""] for k, v in ratios.items()])
    return res


if __name__ == "__main__":
    main()
