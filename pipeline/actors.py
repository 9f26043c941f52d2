"""Ray actor groups: N data-parallel trainer ranks behind one trainer-shaped object.

`TrainerGroup` starts one `TrainerRank` actor per rank; each sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT and builds a DeepSpeed trainer, so together they
form one process group (gloo on CPU, NCCL on CUDA). The driver calls the group exactly as
it would a local trainer (docs/CONTRACTS.md "Trainer"):

- `train_step(micro_batches, loss_fn)`: micro-batches are dealt round-robin to the ranks;
  a rank left short gets zero-weighted copies (`DUMMY_KEY`) so every rank runs the same
  number of forward/backward passes (ZeRO's collectives need it). The losses are already
  normalised globally and each rank back-propagates `world_size * loss` against
  DeepSpeed's averaging, so the update equals one process running every micro-batch.
- `forward_logprobs(batch)`: rows are split across ranks and the results concatenated.
- `state_dict`, `save_hf`, `save_checkpoint`, `load_checkpoint`: run on every rank
  (ZeRO-3 gathers are collective), rank 0's answer is returned.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.trainer import DUMMY_KEY, TrainerSettings, merge_step_metrics

_FORWARD_ENV = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "TOKENIZERS_PARALLELISM")


class TrainerRank:
    """One data-parallel rank (wrapped by `ray.remote` in `TrainerGroup`)."""

    def __init__(self, settings: dict, model_dir: str, tokenizer_dir: str | None, rank: int, world_size: int,
                 master_port: int, env: dict, threads: int):
        os.environ.update(env)
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)})
        torch.set_num_threads(threads)
        from engine.trainer import build_trainer

        self.rank = rank
        self.trainer = build_trainer(TrainerSettings(**settings), model_dir, tokenizer_dir=tokenizer_dir,
                                     rank=rank, world_size=world_size)

    def ready(self) -> int:
        return self.rank

    def train_step_part(self, micro_batches, loss_fn):
        return self.trainer.train_step_part(micro_batches, loss_fn)

    def forward_logprobs(self, batch):
        return self.trainer.forward_logprobs(batch)

    def state_dict(self):
        state = self.trainer.state_dict()
        return state if self.rank == 0 else None

    def save_hf(self, path):
        self.trainer.save_hf(path)

    def save_checkpoint(self, path, extra_state):
        self.trainer.save_checkpoint(path, extra_state)

    def load_checkpoint(self, path):
        return self.trainer.load_checkpoint(path)


def deal_micro_batches(micro_batches: list[dict], world_size: int) -> list[list[dict]]:
    """Round-robin shares, the short ones padded with zero-weighted copies of a real batch."""
    if not micro_batches:
        raise ValueError("train_step: no micro-batches")
    shares = [micro_batches[r::world_size] for r in range(world_size)]
    longest = max(len(s) for s in shares)
    dummy = {**micro_batches[0], DUMMY_KEY: torch.tensor(1)}
    return [s + [dummy] * (longest - len(s)) for s in shares]


def split_rows(batch: dict, world_size: int) -> tuple[list[dict], list[int]]:
    """Rows of a batch in `world_size` contiguous chunks (0-d tensors go to every chunk);
    an empty chunk becomes a one-row stand-in whose result is dropped (count 0)."""
    B = batch["input_ids"].shape[0]
    bounds = [B * r // world_size for r in range(world_size + 1)]
    chunks, counts = [], []
    for r in range(world_size):
        lo, hi = bounds[r], bounds[r + 1]
        counts.append(hi - lo)
        lo, hi = (lo, hi) if hi > lo else (0, 1)
        chunks.append({k: v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in batch.items()})
    return chunks, counts


class TrainerGroup:
    """`num_ranks` DeepSpeed ranks as Ray actors, used like one local trainer."""

    def __init__(self, settings: TrainerSettings, model_dir: str | os.PathLike, num_ranks: int, *,
                 tokenizer_dir: str | os.PathLike | None = None, num_cpus_per_rank: float = 0.0,
                 num_gpus_per_rank: float = 0.0, threads_per_rank: int = 1):
        import ray

        from engine.trainer_deepspeed import free_port

        if settings.backend != "deepspeed":
            raise ValueError(f"TrainerGroup runs deepspeed ranks; settings.backend is {settings.backend!r}")
        if num_ranks < 1:
            raise ValueError(f"TrainerGroup: num_ranks must be >= 1, got {num_ranks}")
        if not ray.is_initialized():
            raise RuntimeError("TrainerGroup needs ray.init(...) first")
        self.world_size = num_ranks
        env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
        port = free_port()
        actor = ray.remote(num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank)(TrainerRank)
        self.ranks = [actor.remote(settings.model_dump(), str(model_dir),
                                   str(tokenizer_dir) if tokenizer_dir else None, r, num_ranks, port, env,
                                   threads_per_rank) for r in range(num_ranks)]
        ray.get([a.ready.remote() for a in self.ranks])

    def _all(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.ranks])

    def train_step(self, micro_batches: list[dict], loss_fn) -> dict:
        import ray

        shares = deal_micro_batches(micro_batches, self.world_size)
        parts = ray.get([a.train_step_part.remote(s, loss_fn) for a, s in zip(self.ranks, shares)])
        return merge_step_metrics(parts)

    def forward_logprobs(self, batch: dict) -> torch.Tensor:
        import ray

        chunks, counts = split_rows(batch, self.world_size)
        outs = ray.get([a.forward_logprobs.remote(c) for a, c in zip(self.ranks, chunks)])
        return torch.cat([o[:n] for o, n in zip(outs, counts) if n > 0], dim=0)  # (B, T)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._all("state_dict")[0]

    def save_hf(self, path: str | os.PathLike) -> None:
        self._all("save_hf", str(Path(path)))

    def save_checkpoint(self, path: str | os.PathLike, extra_state: dict) -> None:
        self._all("save_checkpoint", str(Path(path)), extra_state)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        return self._all("load_checkpoint", str(Path(path)))[0]

    def shutdown(self) -> None:
        import ray

        for a in self.ranks:
            ray.kill(a)
        self.ranks = []

