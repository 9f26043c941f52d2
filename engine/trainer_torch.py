"""PyTorch trainer: gradient accumulation over micro-batches, clipping, LR schedule, exact
checkpoint/resume (HF weights + optimizer/scheduler/RNG state).

One process, or one of `world_size` data-parallel ranks (run as Ray actors by
`pipeline/actors.py`): each rank keeps a full replica, accumulates its own micro-batches,
then the gradients are summed over the ranks in one flat all-reduce before clipping and
the optimiser step (the losses carry a global denominator, so the sum is the gradient one
process would get from every micro-batch), so the replicas stay identical. This is DDP's
contract without `DistributedDataParallel`'s module wrapper, whose forward hooks the
loss path (decoder + LM head weight handed to the loss) would bypass. A padding
micro-batch (`DUMMY_KEY`) is skipped: the only collective is once per step.

Mixed precision (`dtype: bf16`): `self.lm` holds the fp32 master weights, which the
optimiser (AdamW or Muon, state in fp32) steps, which `state_dict`/`save_hf`/checkpoints
hold, and which resume loads; `self.compute_lm`, a bf16 copy, runs every forward and
backward. After each micro-batch's backward its bf16 gradients are added into the masters'
fp32 gradients (accumulation, the all-reduce and clipping in fp32); after the step the
masters are rounded into the copy. Stepping bf16 weights instead loses RL-sized steps: a
weight of 0.02 has a bf16 resolution of ~1.2e-4, far above an Adam step at lr 1e-6. With
`dtype: fp32` the copy is `self.lm` itself and none of this runs.

LoRA (`trainer.lora`, `engine.lora`): peft's adapters are injected into `self.lm` (frozen
base, trainable A/B); the optimiser, the gradient all-reduce, clipping and the master/copy
pairs cover the trainable (adapter) weights only. `state_dict` and `save_hf` give the
merged weights (plain HF names, no peft needed to load); a checkpoint holds those merged
weights (a checkpoint stays an HF model directory, which later stages load) plus the
adapter alone under `adapter/`, and resume loads the base from `model_dir` and the adapter
(with the optimiser state over it) from the checkpoint.
Imports no pydantic: `settings` is read by attribute (tests/gpu run without it)."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from engine.model import DTYPES, load_model
from engine.optim import build_optimizer, build_scheduler
from engine.trainer_common import (DUMMY_KEY, LogprobFn, as_float, barrier, broadcast_parameters,
                                   enable_gradient_checkpointing, init_process_group,
                                   merge_step_metrics, read_extra_state, rng_state, run_loss, save_hf_dir,
                                   seed_everything, set_rng_state, sum_gradients_over_ranks, to_device,
                                   write_extra_state)


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


def _param_pairs(master, low) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(master parameter, compute-copy parameter) by name, trainable ones only (all of them
    without LoRA); tied weights appear once."""
    lows = dict(low.named_parameters())
    pairs = [(p, lows[n]) for n, p in master.named_parameters() if p.requires_grad]
    if len(pairs) != sum(p.requires_grad for p in lows.values()):
        raise RuntimeError(f"compute copy has {len(lows)} parameters, the masters {len(pairs)}")
    return pairs


class TorchTrainer:
    def __init__(self, settings, model_dir: str, *, tokenizer_dir: str | None = None, rank: int = 0,
                 world_size: int = 1):
        if settings.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if world_size > 1:
            init_process_group(rank, world_size, settings.device)
        seed_everything(settings.seed, settings.deterministic)
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.device = torch.device(settings.device, torch.cuda.current_device()) if settings.device == "cuda" \
            else torch.device("cpu")
        self.tokenizer_dir = tokenizer_dir
        self.lm = load_model(model_dir, dtype="fp32", device=str(self.device))  # the master weights
        self.peft = None
        if getattr(settings, "lora", None) is not None:
            from engine.lora import apply_lora

            self.peft = apply_lora(self.lm, settings.lora)  # self.lm now holds the adapters (in place)
        if world_size > 1:
            broadcast_parameters(list(self.lm.parameters()))
        self.compute_lm = self.lm
        if DTYPES[settings.dtype] != torch.float32:  # mixed precision: a low-precision copy computes
            self.compute_lm = copy.deepcopy(self.lm).to(DTYPES[settings.dtype])
            self._pairs = _param_pairs(self.lm, self.compute_lm)
        if getattr(settings, "gradient_checkpointing", False):
            enable_gradient_checkpointing(self.compute_lm)
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
        self.compute_lm.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens, count, extra = 0.0, 0, 0, {}
        for mb in micro_batches:
            if DUMMY_KEY in mb:
                continue  # keeps ranks in step only; this backend's one collective is below
            mb = to_device(mb, self.device)
            loss, metrics = run_loss(self.compute_lm, mb, loss_fn)
            loss.backward()
            if self.compute_lm is not self.lm:
                self._accumulate_master_grads()
            loss_sum += float(loss.detach())
            tokens += int(mb["attention_mask"].sum())
            count += 1
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + as_float(v)
        trainable = [p for p in self.lm.parameters() if p.requires_grad]
        if self.world_size > 1:
            sum_gradients_over_ranks(trainable)
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._sync_compute_copy()
        part = {"loss": loss_sum, "tokens": tokens, "num_micro_batches": count, "grad_norm": grad_norm,
                "lr": lr, "seconds": time.perf_counter() - t0,
                "loss_metrics": {k: v / max(count, 1) for k, v in extra.items()}}
        return part

    @torch.no_grad()
    def _accumulate_master_grads(self) -> None:
        """Add the compute copy's gradients into the masters' fp32 ones, and free them."""
        for master, low in self._pairs:
            if low.grad is None:
                continue
            if master.grad is None:
                master.grad = low.grad.float()
            else:
                master.grad.add_(low.grad)
            low.grad = None

    @torch.no_grad()
    def _sync_compute_copy(self) -> None:
        """Round the fp32 masters into the low-precision compute copy (no-op in fp32)."""
        if self.compute_lm is not self.lm:
            for master, low in self._pairs:
                low.copy_(master)

    @torch.no_grad()
    def forward_logprobs(self, batch: dict) -> torch.Tensor:
        self.compute_lm.eval()
        lp, _ = run_loss(self.compute_lm, to_device(batch, self.device), LogprobFn(self.settings.logprob_chunk))
        return lp.cpu()  # (B, T)

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights: the fp32 masters under mixed precision; with LoRA, the base
        with the adapters merged (HF names)."""
        if self.peft is not None:
            from engine.lora import merged_state_dict

            return merged_state_dict(self.lm)
        return {k: v.detach().cpu().clone() for k, v in self.lm.state_dict().items()}

    def save_hf(self, path: str | os.PathLike) -> None:
        if self.rank == 0:  # the replicas are identical
            save_hf_dir(self.lm, self.state_dict(), Path(path), self.tokenizer_dir)
            if self.peft is not None:
                from engine.lora import save_adapter

                save_adapter(self.peft, Path(path))
        barrier(self.world_size)

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict) -> None:
        path = Path(path)
        self.save_hf(path)
        if self.rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "step": self.step}, path / "trainer_state.pt")
            write_extra_state(path, extra_state)
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        barrier(self.world_size)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        path = Path(path)
        extra = read_extra_state(path)
        if self.peft is not None:  # the base is model_dir's; the trained weights are the adapter's
            from engine.lora import load_adapter

            load_adapter(self.peft, path)
        else:
            load_hf_weights(self.lm, path)  # the masters (fp32 in checkpoints written since they exist)
        self._sync_compute_copy()
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False))
        return extra

