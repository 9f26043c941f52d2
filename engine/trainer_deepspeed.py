"""DeepSpeed trainer: one data-parallel rank (ZeRO 0-3, fp32 or bf16; gloo on CPU, NCCL
on CUDA). Several ranks are run as Ray actors by `pipeline/actors.py`.

- The optimiser and LR schedule are torch objects handed to `deepspeed.initialize`, so
  no DeepSpeed op is JIT-compiled for them (only DeepSpeed's shared-memory comm op, once,
  cached under `TORCH_EXTENSIONS_DIR`).
- Gradient accumulation boundaries are set by hand (`set_gradient_accumulation_boundary`)
  so each step may have any number of micro-batches; DeepSpeed runs with
  `gradient_accumulation_steps=1`, hence never rescales the loss.
- A padding micro-batch (`DUMMY_KEY`, so every rank runs as many as the longest share)
  runs forward/backward with `padding_loss` (zero, reaching every parameter), never loss_fn.
- Losses arrive normalised by a global denominator, so the gradient wanted is the SUM over
  ranks; DeepSpeed averages over ranks, so each rank back-propagates `world_size * loss`.
- The LM head weight is used outside its module's forward (the loss takes it as an
  argument): under ZeRO-3 it is registered as an external parameter of the wrapper, so it
  is gathered for the wrapper's forward and its gradient is reduced like any other.
- LoRA (`trainer.lora`, `engine.lora`): peft's adapters are injected into the fp32 model
  before `deepspeed.initialize` (peft's documented order for DeepSpeed), so the engine sees
  frozen base weights and trainable A/B; the optimiser (built from `requires_grad`
  parameters), ZeRO's partitions and the gradient reduction cover the adapter only.
  `state_dict`/`save_hf` give the merged weights under the plain HF names (gathered first
  under ZeRO-3), `save_hf` also writes `adapter/` (peft format); DeepSpeed's checkpoint
  leaves the frozen base out (`exclude_frozen_parameters`), which resume takes from
  `model_dir` as the torch backend does.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.model import load_model
from engine.optim import build_optimizer, build_scheduler
from engine.trainer_common import (DUMMY_KEY, LogprobFn, as_float, barrier, enable_gradient_checkpointing,
                                   merge_step_metrics, padding_loss,
                                   read_extra_state, rng_state, run_loss, save_hf_dir, seed_everything,
                                   set_rng_state, to_device, write_extra_state)

if TYPE_CHECKING:
    from engine.trainer_settings import TrainerSettings

CKPT_TAG = "state"


class _LossModule(nn.Module):
    """What DeepSpeed wraps: forward = hidden states -> `loss_fn(hidden, W_head, batch)`."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict, loss_fn):
        return run_loss(self.lm, batch, loss_fn)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_deepspeed_process_group(rank: int, world_size: int, device: str) -> None:
    """Form (once per process) the process group and let DeepSpeed adopt it."""
    import deepspeed

    from engine.trainer_common import init_process_group as form_group

    form_group(rank, world_size, device)
    for var, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world_size)):
        os.environ.setdefault(var, str(value))  # DeepSpeed's engine reads them
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False)


def ds_config(settings: TrainerSettings, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {"stage": settings.zero_stage,
                              "stage3_gather_16bit_weights_on_model_save": True,
                              "overlap_comm": False, "reduce_bucket_size": 2_000_000,
                              "allgather_bucket_size": 2_000_000, "stage3_prefetch_bucket_size": 2_000_000},
        "bf16": {"enabled": settings.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedTrainer:
    def __init__(self, settings: TrainerSettings, model_dir: str, *, tokenizer_dir: str | None = None,
                 rank: int = 0, world_size: int = 1):
        import deepspeed

        if settings.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        init_deepspeed_process_group(rank, world_size, settings.device)
        seed_everything(settings.seed, settings.deterministic)
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.tokenizer_dir = tokenizer_dir
        module = _LossModule(load_model(model_dir, dtype="fp32", device=settings.device))
        self.peft = None
        if getattr(settings, "lora", None) is not None:
            from engine.lora import apply_lora

            self.peft = apply_lora(module.lm, settings.lora)  # module.lm now holds the adapters (in place)
        if getattr(settings, "gradient_checkpointing", False):
            enable_gradient_checkpointing(module.lm)
        if settings.zero_stage == 3:
            deepspeed.zero.register_external_parameter(module, module.lm.get_output_embeddings().weight)
        optimizer = build_optimizer(module.lm, settings.optimizer, lr=settings.lr,
                                    weight_decay=settings.weight_decay, betas=settings.betas, eps=settings.eps)
        scheduler = build_scheduler(optimizer, schedule=settings.schedule, warmup_steps=settings.warmup_steps,
                                    total_steps=settings.total_steps or 1, min_lr_ratio=settings.min_lr_ratio)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(settings, world_size))
        self.device = self.engine.device
        self.step = 0

    @property
    def lm(self) -> nn.Module:
        return self.engine.module.lm

    # --------------------------------------------------------------------- training
    def train_step(self, micro_batches: list[dict], loss_fn) -> dict:
        """One optimiser step; metrics: loss (sum of micro-batch losses), grad_norm, lr,
        tokens, tokens_per_s, and the loss_fn's own metrics averaged over micro-batches."""
        return merge_step_metrics([self.train_step_part(micro_batches, loss_fn)])

    def train_step_part(self, micro_batches: list[dict], loss_fn) -> dict:
        """One optimiser step over this rank's micro-batches; every rank must pass the same
        number of micro-batches (pad with `DUMMY_KEY` batches)."""
        if not micro_batches:
            raise ValueError("train_step: no micro-batches")
        t0 = time.perf_counter()
        self.engine.train()
        lr = self.scheduler.get_last_lr()[0]
        loss_sum, tokens, count, extra = 0.0, 0, 0, {}
        for i, mb in enumerate(micro_batches):
            mb = to_device(mb, self.device)
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            # a padding micro-batch joins ZeRO's collectives with a zero loss; loss_fn is not called
            loss, metrics = self.engine(mb, padding_loss if DUMMY_KEY in mb else loss_fn)
            scale = 0.0 if DUMMY_KEY in mb else float(self.world_size)
            self.engine.backward(loss * scale)
            if i == len(micro_batches) - 1:
                own_norm = self._plain_grad_norm()
            self.engine.step()
            if DUMMY_KEY in mb:
                continue
            loss_sum += float(loss.detach())
            tokens += int(mb["attention_mask"].sum())
            count += 1
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + as_float(v)
        self.step += 1
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else norm
        part = {"loss": loss_sum, "tokens": tokens, "num_micro_batches": count,
                "grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr,
                "seconds": time.perf_counter() - t0,
                "loss_metrics": {k: v / max(count, 1) for k, v in extra.items()}}
        return part

    def _plain_grad_norm(self) -> float | None:
        """Global grad norm where DeepSpeed keeps none (ZeRO 0, fp32: grads are all-reduced
        in place before the step); None otherwise."""
        if self.settings.zero_stage or self.settings.dtype != "fp32":
            return None
        grads = [p.grad for p in self.lm.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    @torch.no_grad()
    def forward_logprobs(self, batch: dict) -> torch.Tensor:
        self.engine.eval()
        lp, _ = self.engine(to_device(batch, self.device), LogprobFn(self.settings.logprob_chunk))
        return lp.float().cpu()  # (B, T)

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full HF-named weights on CPU (gathered from the partitions under ZeRO-3); with
        LoRA, the base with the adapters merged."""
        return self._gathered_states()[0]

    def _gathered_states(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(HF state dict, peft's full state dict or None without LoRA), gathered once."""
        import deepspeed

        params = list(self.lm.parameters())
        enabled = self.settings.zero_stage == 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=enabled):
            if self.peft is None:
                return {k: v.detach().cpu().clone() for k, v in self.lm.state_dict().items()}, None
            from engine.lora import merged_state_dict

            raw = {k: v.detach().cpu().clone() for k, v in self.peft.state_dict().items() if ".lora_" in k}
            return merged_state_dict(self.lm), raw

    def save_hf(self, path: str | os.PathLike) -> None:
        state, raw = self._gathered_states()  # collective under ZeRO-3: every rank calls it
        if self.rank == 0:
            save_hf_dir(self.lm, state, Path(path), self.tokenizer_dir)
            if self.peft is not None:
                from engine.lora import save_adapter

                save_adapter(self.peft, Path(path), state_dict=raw)
        barrier(self.world_size)

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict) -> None:
        path = Path(path)
        self.engine.save_checkpoint(str(path / "deepspeed"), tag=CKPT_TAG, client_state={"step": self.step},
                                    save_latest=False, exclude_frozen_parameters=self.peft is not None)
        self.save_hf(path)
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            write_extra_state(path, extra_state)
        barrier(self.world_size)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        path = Path(path)
        extra = read_extra_state(path)
        _, client = self.engine.load_checkpoint(str(path / "deepspeed"), tag=CKPT_TAG,
                                                load_optimizer_states=True, load_lr_scheduler_states=True,
                                                load_module_strict=self.peft is None)  # LoRA: base from model_dir
        if client is None:
            raise FileNotFoundError(f"load_checkpoint: no DeepSpeed state under {path / 'deepspeed'}")
        self.step = client["step"]
        set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False))
        return extra

