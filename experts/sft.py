"""SFT stage driver: fine-tune a model on one domain's (or every domain's) demonstrations.

rows -> `engine.chat.render` (loss on assistant tokens only) -> samples truncated to
`max_length` -> a seeded `EpochCursor` picks `batch_size` samples per optimiser step ->
packed (or padded) micro-batches carrying the step's target count -> `trainer.train_step`
with token-level cross-entropy averaged over all the step's target tokens. Eval loss on
held-out rows every `eval_every` steps; checkpoints every `save_every` steps and at the
end. The driver receives its trainer (a local backend or a Ray actor group) as an
argument. Resume: a run started again in the same `out_dir` continues from `latest`,
restoring weights, optimizer, scheduler, RNG and the cursor, so it ends with the same
weights as an uninterrupted run and reads each sample exactly when that run would.
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.batching import EpochCursor, Sample, build_step_batches, pad_rows
from engine.chat import render, row_template_kwargs
from engine.checkpoint import CheckpointManager
from engine.logprobs import compute_chunked_token_logprobs
from experts.sft_settings import SFTSettings


class SFTLoss:
    """Token-level cross-entropy summed over this micro-batch's targets and divided by the
    step's total target count (`batch["global_tokens"]`), so micro-batches and ranks sum.
    Picklable (sent to Ray trainer ranks); `chunk` > 0 bounds the logits alive at once."""

    def __init__(self, chunk: int = 0):
        self.chunk = chunk

    def __call__(self, hidden, weight, batch):
        logprobs = compute_chunked_token_logprobs(hidden, weight, batch["input_ids"], self.chunk or None)  # (B, T)
        mask = batch["loss_mask"].to(logprobs.dtype)  # (B, T)
        loss = -(logprobs * mask).sum() / batch["global_tokens"]
        return loss, {}


def render_samples(rows: list[dict], tokenizer, max_length: int) -> list[Sample]:
    """Rows -> samples with assistant-only masks, cut to `max_length` tokens."""
    out = []
    for i, row in enumerate(rows):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not messages:
            raise ValueError(f"SFT row {i} (id {row.get('id') if isinstance(row, dict) else None!r}) has no messages")
        r = render(messages, tokenizer, **row_template_kwargs(row))
        ids, mask = r.input_ids[:max_length], r.loss_mask[:max_length]
        if sum(mask) == 0:
            raise ValueError(f"SFT row {i} (id {row.get('id')!r}) has no assistant tokens within "
                             f"max_length={max_length}")
        out.append(Sample(ids, mask, row.get("domain", "")))
    return out


def compute_eval_loss(trainer, samples: list[Sample], *, pad_id: int, batch_size: int) -> float:
    """Mean next-token NLL over all target tokens of `samples` (trainer.forward_logprobs)."""
    total, count = 0.0, 0.0
    for i in range(0, len(samples), batch_size):
        batch = pad_rows(samples[i:i + batch_size], pad_id)
        lp = trainer.forward_logprobs(batch)  # (B, T)
        total -= float((lp * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
    return total / max(count, 1.0)


def _resume(trainer, checkpoints, cursor: EpochCursor, logger) -> int:
    latest = checkpoints.latest()
    if latest is None:
        return 0
    extra = trainer.load_checkpoint(latest)
    cursor.load_state_dict(extra["cursor"])
    if hasattr(logger, "truncate_after"):
        logger.truncate_after(extra["step"])
    return int(extra["step"])


def run_sft(settings: SFTSettings, *, trainer, tokenizer, train_rows: list[dict], out_dir: str | Path,
            eval_rows: list[dict] | None = None, logger=None, checkpoints: CheckpointManager | None = None) -> dict:
    """Train for `settings.steps` optimiser steps (resuming from `out_dir/checkpoints`).

    Without a `logger`, metrics go to `out_dir/metrics.jsonl` (no wandb, no progress bar).
    Returns `{"steps", "resumed_from", "final": last step's metrics (+ eval_loss),
    "checkpoint": the final step-N directory (an HF model directory)}`.
    """
    out_dir = Path(out_dir)
    checkpoints = checkpoints or CheckpointManager(out_dir / "checkpoints", keep_last=settings.keep_last)
    pad_id = tokenizer.pad_token_id
    train = render_samples(train_rows, tokenizer, settings.max_length)
    evals = render_samples(eval_rows, tokenizer, settings.max_length) if eval_rows else []
    cursor = EpochCursor(len(train), seed=settings.seed, shuffle=settings.shuffle)
    own_logger = logger is None
    if own_logger:
        from engine.metrics import MetricsLogger

        logger = MetricsLogger(out_dir, total_steps=settings.steps, wandb_mode="disabled", progress=False)
    start = _resume(trainer, checkpoints, cursor, logger)
    loss_fn = SFTLoss()
    last: dict = {}
    latest_path = checkpoints.latest()
    if evals and start == 0:  # the starting model's eval loss, logged as step 0
        logger.log({"eval_loss": compute_eval_loss(trainer, evals, pad_id=pad_id,
                                                   batch_size=settings.eval_batch_size)}, step=0)
    for step in range(start, settings.steps):
        picked = [train[i] for i in cursor.take(settings.batch_size)]
        micro = build_step_batches(picked, micro_batch_size=settings.micro_batch_size, pad_id=pad_id,
                                   pack_length=(settings.pack_length or settings.max_length) if settings.pack else None,
                                   balance_groups=settings.loss_aggregation == "domain_token_mean",
                                   group_shares=settings.domain_shares)
        t0 = time.perf_counter()
        metrics = trainer.train_step(micro, loss_fn)
        last = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
                "tokens": metrics["tokens"], "tokens_per_s": metrics["tokens"] / max(time.perf_counter() - t0, 1e-9),
                "micro_batches": len(micro), "epoch": cursor.epoch}
        done = step + 1
        if evals and ((settings.eval_every and done % settings.eval_every == 0) or done == settings.steps):
            last["eval_loss"] = compute_eval_loss(trainer, evals, pad_id=pad_id, batch_size=settings.eval_batch_size)
        logger.log(last, step=done)
        if done % settings.save_every == 0 or done == settings.steps:
            latest_path = checkpoints.save(trainer, done, {"step": done, "cursor": cursor.state_dict()})
    if not last and evals:  # resumed after the final checkpoint: nothing left to train
        last["eval_loss"] = compute_eval_loss(trainer, evals, pad_id=pad_id, batch_size=settings.eval_batch_size)
    if own_logger:
        logger.close()
    return {"steps": settings.steps, "resumed_from": start, "final": last,
            "checkpoint": str(latest_path) if latest_path else None}
