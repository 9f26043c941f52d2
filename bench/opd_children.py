"""The measured processes of `bench.bench_opd_vs_trl`: each runs in a fresh interpreter.

- `teach_child`: our teach phase for one configuration: every teacher in turn (one model
  resident) prefills the samples routed to it into the hidden-state cache, and its head is
  extracted. Reports prefill seconds and the phase's peak RSS.
- `ours_child`: our training step, `distill.opd.train_round` with `OPDLoss` (student forward,
  cached teacher states through the extracted head under the `HeadManager`, chunked reverse
  KL) on the torch trainer. A step's time is the interval between two consecutive logger
  calls, so it includes building the micro-batches from the cache reader.
- `trl_child`: `trl.DistillationTrainer` (teacher resident, its own chunked full-vocabulary
  divergence, beta=1.0 = reverse KL). Its `_generate` is replaced by a function returning
  the same pre-generated sequences, so generation is excluded and both sides train on the
  same token ids. A step is `on_step_begin` -> `on_step_end` (forward, teacher forward,
  backward, optimizer step).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import current_rss_bytes, peak_rss_bytes, set_threads


def load_sequences(path: str) -> dict:
    """{"prompt_len", "seqs": [[ids]]}: prompt_len prompt tokens then the response."""
    return json.loads(Path(path).read_text())


def samples_for(seqs: dict, n_teachers: int) -> list:
    from engine.episode import RolloutSample

    p = seqs["prompt_len"]
    return [RolloutSample(input_ids=ids, loss_mask=[0] * p + [1] * (len(ids) - p), rollout_logprobs=[0.0] * len(ids),
                          finish_reason="length", text="", reference=None, route=f"t{i % n_teachers}",
                          sample_id=f"s{i}", teacher_index=i % n_teachers) for i, ids in enumerate(seqs["seqs"])]


def teach_child(a: dict) -> dict:
    set_threads(a["threads"])
    from distill.cache import write_teacher_cache
    from distill.heads import extract_head
    from engine.model import load_model

    samples = samples_for(load_sequences(a["seqs"]), len(a["teachers"]))
    seconds = []
    for t, tdir in enumerate(a["teachers"]):
        model = load_model(tdir)
        routed = [s for s in samples if s.teacher_index == t]
        summary = write_teacher_cache(model, t, f"t{t}", routed, a["cache_dir"], batch_size=len(routed),
                                      dtype="fp32", pad_token_id=0,
                                      max_tokens=sum(len(s.input_ids) for s in routed) if a.get("packed") else None)
        seconds.append(summary["seconds"])
        extract_head(tdir, Path(a["cache_dir"]).parent / f"head{t}.safetensors")
        del model
    return {"prefill_seconds": seconds, "peak_rss": peak_rss_bytes()}


class _StepClock:
    """A logger whose `log` calls mark the end of each optimiser step."""

    def __init__(self):
        self.marks = [(time.perf_counter(), time.process_time())]

    def log(self, _metrics, step=None):
        self.marks.append((time.perf_counter(), time.process_time()))

    def intervals(self, k: int = 0) -> list[float]:
        """Wall (k=0) or this process's CPU (k=1) seconds of each step."""
        return [b[k] - a[k] for a, b in zip(self.marks, self.marks[1:])]


def ours_child(a: dict) -> dict:
    set_threads(a["threads"])
    from distill.opd import OPDLoss, train_round
    from distill.opd_settings import OPDSettings
    from engine.trainer import TrainerSettings, build_trainer

    base_rss = current_rss_bytes()
    seqs = load_sequences(a["seqs"])
    n_teachers = len(a["heads"])
    samples = samples_for(seqs, n_teachers)
    b = len(samples)
    steps = a["warmup"] + a["steps"]
    longest = max(len(s.input_ids) for s in samples)
    settings = OPDSettings(epochs_per_round=steps, mini_batch_size=b, micro_batch_size=a["micro_batch"],
                           micro_batch_tokens=a["micro_batch"] * longest if a.get("packed") else None,
                           chunk_size=a["chunk_size"], lr=1e-4, seed=0)
    trainer = build_trainer(TrainerSettings(lr=1e-4, seed=0, deterministic=False), a["student"])
    loss_fn = OPDLoss(a["heads"], [1.0] * n_teachers, "reverse_kl", a["chunk_size"], 0.5)
    clock = _StepClock()
    records, _ = train_round(settings, samples, Path(a["cache_dir"]), trainer=trainer, loss_fn=loss_fn,
                             pad_id=0, round_idx=0, step0=0, logger=clock)
    finish = loss_fn.finish()
    return {"step_seconds": clock.intervals()[a["warmup"]:], "step_cpu_seconds": clock.intervals(1)[a["warmup"]:],
            "loss": [r["loss"] for r in records],
            "head_loads_per_step": finish["head_loads_per_step"], "max_resident_heads": finish["max_resident_heads"],
            "peak_rss": peak_rss_bytes(), "base_rss": base_rss}


def _fixed_generate(seqs: dict):
    """Stand-in for DistillationTrainer._generate: the same sequences, every call."""
    p = seqs["prompt_len"]
    prompts = [ids[:p] for ids in seqs["seqs"]]
    completions = [ids[p:] for ids in seqs["seqs"]]

    def generate(prompt_texts):
        n = len(prompt_texts)
        if n > len(prompts):
            raise ValueError(f"TRL asked for {n} completions; the benchmark has {len(prompts)} sequences")
        return prompts[:n], completions[:n], None, None, None
    return generate


def trl_child(a: dict) -> dict:
    set_threads(a["threads"])
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from engine.model import load_model, load_tokenizer

    base_rss = current_rss_bytes()
    seqs = load_sequences(a["seqs"])
    b, steps = len(seqs["seqs"]), a["warmup"] + a["steps"]
    marks: list[tuple[float, float]] = []  # (wall, CPU) seconds per step

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter() - self.t0, time.process_time() - self.c0))

    args = DistillationConfig(
        output_dir=a["work_dir"], per_device_train_batch_size=b, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, beta=1.0, temperature=1.0,
        max_completion_length=max(len(x) for x in seqs["seqs"]) - seqs["prompt_len"], gradient_checkpointing=False,
        bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    student, teacher = load_model(a["student"]), load_model(a["teacher"])
    data = Dataset.from_list([{"prompt": f"p{i}"} for i in range(b * steps)])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=load_tokenizer(a["student"]), callbacks=[Clock()])
    trainer._generate = _fixed_generate(seqs)
    torch.manual_seed(0)
    trainer.train()
    w = a["warmup"]
    return {"step_seconds": [t for t, _ in marks][w:], "step_cpu_seconds": [c for _, c in marks][w:],
            "peak_rss": peak_rss_bytes(), "base_rss": base_rss,
            "optimizer": type(trainer.optimizer).__name__}


CHILDREN = {"teach": teach_child, "ours": ours_child, "trl": trl_child}


def run_named_child(a: dict) -> dict:
    return CHILDREN[a["kind"]](a)
