"""Single-process PyTorch trainer: gradient accumulation over micro-batches, clipping,
LR schedule, exact checkpoint/resume (HF weights + optimizer/scheduler/RNG state)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from engine.model import DTYPES, load_model
from engine.optim import build_optimizer, build_scheduler
from engine.trainer import (DUMMY_KEY, LogprobFn, TrainerSettings, as_float, merge_step_metrics,
                            read_extra_state, rng_state, run_loss, save_hf_dir, seed_everything, set_rng_state,
                            to_device, write_extra_state)


def load_hf_weights(lm, path: Path) -> None:
    """Load the safetensors weights of an HF directory into `lm` (tied heads allowed)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(lm.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise KeyError(f"{path}: weights do not match the model: missing {sorted(set(missing) - tied)}, "
                       f"unexpected {sorted(unexpected)}")


class TorchTrainer:
    def __init__(self, settings: TrainerSettings, model_dir: str, *, tokenizer_dir: str | None = None):
        seed_everything(settings.seed, settings.deterministic)
        self.settings = settings
        self.device = torch.device(settings.device)
        self.tokenizer_dir = tokenizer_dir
        self.lm = load_model(model_dir, dtype=settings.dtype, device=settings.device)
        self.optimizer = build_optimizer(self.lm, settings.optimizer, lr=settings.lr,
                                         weight_decay=settings.weight_decay, betas=settings.betas,
                                         eps=settings.eps)
        self.scheduler = build_scheduler(self.optimizer, schedule=settings.schedule,
                                         warmup_steps=settings.warmup_steps,
                                         total_steps=settings.total_steps or 1,
                                         min_lr_ratio=settings.min_lr_ratio)
        self.step = 0

    # --------------------------------------------------------------------- training
    def train_step(self, micro_batches: list[dict], loss_fn) -> dict:
        """One optimiser step; metrics: loss (sum of micro-batch losses), grad_norm, lr,
        tokens, tokens_per_s, and the loss_fn's own metrics averaged over micro-batches."""
        return merge_step_metrics([self.train_step_part(micro_batches, loss_fn)])

    def train_step_part(self, micro_batches: list[dict], loss_fn) -> dict:
        """One optimiser step: sum of the micro-batch losses (already globally normalised)."""
        if not micro_batches:
            raise ValueError("train_step: no micro-batches")
        t0 = time.perf_counter()
        self.lm.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens, count, extra = 0.0, 0, 0, {}
        for mb in micro_batches:
            mb = to_device(mb, self.device)
            loss, metrics = run_loss(self.lm, mb, loss_fn)
            if DUMMY_KEY in mb:
                (loss * 0.0).backward()
                continue
            loss.backward()
            loss_sum += float(loss.detach())
            tokens += int(mb["attention_mask"].sum())
            count += 1
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + as_float(v)
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.lm.parameters(), max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        part = {"loss": loss_sum, "tokens": tokens, "num_micro_batches": count, "grad_norm": grad_norm,
                "lr": lr, "seconds": time.perf_counter() - t0,
                "loss_metrics": {k: v / max(count, 1) for k, v in extra.items()}}
        return part

    @torch.no_grad()
    def forward_logprobs(self, batch: dict) -> torch.Tensor:
        self.lm.eval()
        lp, _ = run_loss(self.lm, to_device(batch, self.device), LogprobFn(self.settings.logprob_chunk))
        return lp.cpu()  # (B, T)

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.lm.state_dict().items()}

    def save_hf(self, path: str | os.PathLike) -> None:
        save_hf_dir(self.lm, self.state_dict(), Path(path), self.tokenizer_dir)

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict) -> None:
        path = Path(path)
        self.save_hf(path)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step}, path / "trainer_state.pt")
        torch.save(rng_state(), path / "rng_rank0.pt")
        write_extra_state(path, extra_state)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        path = Path(path)
        extra = read_extra_state(path)
        load_hf_weights(self.lm, path)
        self.lm.to(DTYPES[self.settings.dtype])
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        set_rng_state(torch.load(path / "rng_rank0.pt", weights_only=False))
        return extra
