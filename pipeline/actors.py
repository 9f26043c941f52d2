"""Ray actor groups: N data-parallel trainer ranks behind one trainer-shaped object.

`TrainerGroup` starts one `TrainerRank` actor per rank (DeepSpeed ZeRO 0-3 or the torch
backend's data parallelism; NCCL on CUDA, gloo on CPU). The driver calls the group exactly
as it would a local trainer (docs/CONTRACTS.md "Trainer"):

- Placement: rank 0 runs beside the stage process, on the resources the launcher gave the
  stage process (bundle 0 of the stage's placement group under `pipeline run`, the job's
  entrypoint resources under `ray job submit`); ranks 1..N-1 each take one bundle of
  `num_cpus`/`num_gpus`: the bundles 1..N-1 of the stage's placement group
  (`POLYMATH_PLACEMENT_GROUP`), or a placement group of N-1 bundles the group makes itself.
  A CUDA rank 0 sees the stage process's GPUs; every other rank sees the GPU Ray gave it.
- Rendezvous: rank 0 reports its node's IP and a free port there; every rank forms the
  process group at that address (MASTER_ADDR / MASTER_PORT).
- `train_step(micro_batches, loss_fn)`: micro-batches are dealt round-robin to the ranks;
  a rank left short is padded with copies of its own last micro-batch marked `DUMMY_KEY`,
  which the trainers run with a zero loss and never hand to `loss_fn` (so an OPD rank
  never asks for a teacher outside its share). The losses are already normalised
  globally and the ranks' gradients are summed, so the update equals one process running
  every micro-batch. Per-rank figures come back in `rank_metrics`.
- A rank that dies (or raises) fails the call at once with that rank's error, and the
  other ranks are killed (they would wait on a collective forever).
- `forward_logprobs(batch)`: rows are split across ranks and the results concatenated.
- `state_dict`, `save_hf`, `save_checkpoint`, `load_checkpoint`: run on every rank
  (ZeRO-3 gathers are collective), rank 0's answer is returned.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from engine.trainer_common import DUMMY_KEY, merge_step_metrics

_FORWARD_ENV = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "TOKENIZERS_PARALLELISM", "PYTHONPATH", "POLYMATH_COLLECTIVE_TIMEOUT_S")
PLACEMENT_GROUP_ENV = "POLYMATH_PLACEMENT_GROUP"
READY_TIMEOUT_S = 600.0


def join_ray() -> bool:
    """Connect this (stage) process to the Ray cluster it runs in; True if it started one.

    Inside a Ray job, or wherever `RAY_ADDRESS` is set (`pipeline run` sets it for its
    stage processes), the existing cluster is joined; otherwise a local instance starts."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or ("auto" if os.environ.get("RAY_JOB_ID") else None)
    if address:
        ray.init(address=address, namespace=os.environ.get("RAY_NAMESPACE") or None, configure_logging=False)
        return False
    from pipeline.launch import default_ray_temp_dir

    temp = default_ray_temp_dir()
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", include_dashboard=False, _temp_dir=str(temp), configure_logging=False,
             object_store_memory=128 * 1024**2)
    return True


class TrainerRank:
    """One data-parallel rank (wrapped by `ray.remote` in `TrainerGroup`)."""

    def __init__(self, rank: int, env: dict, threads: int):
        os.environ.update(env)
        torch.set_num_threads(threads)
        self.rank = rank
        self.trainer = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it: the rendezvous, asked of rank 0."""
        import ray

        from engine.trainer_deepspeed import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port("")

    def setup(self, settings: dict, model_dir: str, tokenizer_dir: str | None, world_size: int,
              master_addr: str, master_port: int, device: str) -> int:
        from engine.trainer import build_trainer
        from engine.trainer_settings import TrainerSettings

        local = "0" if device == "cuda" else str(self.rank)  # a CUDA rank sees only its own GPU(s)
        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": local,
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        self.trainer = build_trainer(TrainerSettings(**settings), model_dir, tokenizer_dir=tokenizer_dir,
                                     rank=self.rank, world_size=world_size)
        # in the stage log (Ray forwards actor output): which process is which rank
        print(f"[trainer rank {self.rank}/{world_size}] pid {os.getpid()}", flush=True)
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
        extra = self.trainer.load_checkpoint(path)
        print(f"[trainer rank {self.rank}] resumed from {path}", flush=True)
        return extra


def deal_micro_batches(micro_batches: list[dict], world_size: int) -> list[list[dict]]:
    """Round-robin shares; a short share is padded with `DUMMY_KEY` copies of its own last
    micro-batch (the global first one for an empty share), so every rank runs as many."""
    if not micro_batches:
        raise ValueError("train_step: no micro-batches")
    shares = [micro_batches[r::world_size] for r in range(world_size)]
    longest = max(len(s) for s in shares)
    out = []
    for s in shares:
        pad = {**(s[-1] if s else micro_batches[0]), DUMMY_KEY: torch.tensor(1)}
        out.append(s + [pad] * (longest - len(s)))
    return out


def split_rows_over_ranks(batch: dict, world_size: int) -> tuple[list[dict], list[int]]:
    """Rows of a batch in `world_size` contiguous chunks (0-d tensors go to every chunk);
    an empty chunk becomes a one-row stand-in whose result is dropped (count 0). A packed
    batch is cut at row boundaries with its samples (`engine.batching.split_packed_rows`):
    counts are samples, the results' rows."""
    if "unpack_index" in batch:
        from engine.batching import split_packed_rows

        return split_packed_rows(batch, world_size)
    B = batch["input_ids"].shape[0]
    bounds = [B * r // world_size for r in range(world_size + 1)]
    chunks, counts = [], []
    for r in range(world_size):
        lo, hi = bounds[r], bounds[r + 1]
        counts.append(hi - lo)
        lo, hi = (lo, hi) if hi > lo else (0, 1)
        chunks.append({k: v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in batch.items()})
    return chunks, counts


def _bundle(num_cpus: float, num_gpus: float) -> dict:
    b = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}
    return b or {"CPU": 0.01}  # a bundle may not be empty


class TrainerGroup:
    """`num_ranks` trainer ranks as Ray actors, used like one local trainer."""

    def __init__(self, settings, model_dir: str | os.PathLike, num_ranks: int, *,
                 tokenizer_dir: str | os.PathLike | None = None, num_cpus_per_rank: float = 1.0,
                 num_gpus_per_rank: float = 0.0, placement_group_name: str | None = None):
        import ray
        from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                                    PlacementGroupSchedulingStrategy)

        if num_ranks < 1:
            raise ValueError(f"TrainerGroup: num_ranks must be >= 1, got {num_ranks}")
        if settings.device == "cuda" and num_gpus_per_rank < 1:
            raise ValueError(f"TrainerGroup: device 'cuda' needs num_gpus_per_rank >= 1, got {num_gpus_per_rank}")
        if not ray.is_initialized():
            raise RuntimeError("TrainerGroup needs Ray: call pipeline.actors.join_ray() first")
        self.world_size = num_ranks
        self.ranks: list = []
        self._own_pg = None
        env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
        threads = max(1, math.ceil(num_cpus_per_rank))
        env["OMP_NUM_THREADS"] = str(threads)
        actor = ray.remote(TrainerRank)
        # rank 0: beside this process, on its resources (and its GPUs)
        env0 = dict(env)
        if settings.device == "cuda" and "CUDA_VISIBLE_DEVICES" in os.environ:
            env0["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        pg = ray.util.get_placement_group(placement_group_name) if placement_group_name else None
        if pg is not None:
            first = 1  # bundle r holds rank r; bundle 0 is the stage process's
            here = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        else:
            first = 0
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            if num_ranks > 1:
                from ray.util.placement_group import placement_group

                pg = self._own_pg = placement_group([_bundle(num_cpus_per_rank, num_gpus_per_rank)] * (num_ranks - 1),
                                                    strategy="PACK")
                self._wait(pg.ready(), f"a placement group of {num_ranks - 1} x "
                                       f"{_bundle(num_cpus_per_rank, num_gpus_per_rank)} for ranks 1..{num_ranks - 1}")
        self.ranks.append(actor.options(num_cpus=0, num_gpus=0, scheduling_strategy=here).remote(0, env0, threads))
        for r in range(1, num_ranks):
            self.ranks.append(actor.options(
                num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=r - 1 + first)).remote(r, env, threads))
        try:
            master_addr, port = self._gather([self.ranks[0].address.remote()])[0]
            self._gather([a.setup.remote(settings.model_dump(), str(model_dir),
                                         str(tokenizer_dir) if tokenizer_dir else None, num_ranks, master_addr,
                                         port, settings.device) for a in self.ranks])
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, ref, what: str):
        import ray

        ready, _ = ray.wait([ref], timeout=READY_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"TrainerGroup: the cluster did not grant {what} within {READY_TIMEOUT_S:.0f} s "
                               f"(resources: {ray.available_resources()})")
        return ray.get(ref)

    def _gather(self, refs: list) -> list:
        """Results in order; the first rank error (a raise or a dead actor) is raised at once,
        after killing every rank (the others would hang on a collective)."""
        import ray

        index = {r: i for i, r in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as exc:
                rank = index[done[0]] if len(refs) == len(self.ranks) else 0
                self.shutdown()
                raise RuntimeError(f"trainer rank {rank} failed: {type(exc).__name__}: "
                                   f"{str(exc).strip()[-2000:]}") from exc
        return ray.get(list(refs))

    def _all(self, method: str, *args) -> list:
        return self._gather([getattr(a, method).remote(*args) for a in self.ranks])

    def train_step(self, micro_batches: list[dict], loss_fn) -> dict:
        shares = deal_micro_batches(micro_batches, self.world_size)
        parts = self._gather([a.train_step_part.remote(s, loss_fn) for a, s in zip(self.ranks, shares)])
        out = merge_step_metrics(parts)
        out["rank_metrics"] = [{"num_micro_batches": p["num_micro_batches"], **p["loss_metrics"]} for p in parts]
        return out

    def forward_logprobs(self, batch: dict) -> torch.Tensor:
        chunks, counts = split_rows_over_ranks(batch, self.world_size)
        outs = self._gather([a.forward_logprobs.remote(c) for a, c in zip(self.ranks, chunks)])
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
        if self._own_pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._own_pg)
            self._own_pg = None


# ------------------------------------------------------------------------------ teacher prefill


def _prefill_task(settings, teacher, routed: list[dict], cache_dir: str, pad_id: int, dtype: str, device: str,
                  threads: int) -> dict:
    """One teacher's prefill, in a Ray worker: load it, write its cache directory."""
    torch.set_num_threads(threads)
    from distill.opd import prefill_teacher
    from engine.model import load_model

    stats = prefill_teacher(settings, teacher, routed, Path(cache_dir), pad_id=pad_id,
                            load_teacher=lambda p: load_model(p, dtype=dtype, device=device))
    import ray

    held = {k: v for k, v in ray.get_runtime_context().get_assigned_resources().items() if k in ("CPU", "GPU")}
    return {**stats, "worker_pid": os.getpid(), "resources": held}


class TeacherPrefillPool:
    """The teach phase on Ray (`distill.opd.teach_round`'s `prefill`): one task per teacher,
    each with `num_cpus`/`num_gpus` (`resources.stages.teach`, or `per_teacher[index]` =
    (num_cpus, num_gpus) from `resources.stages.teach:<domain>`), as many at once as the
    cluster has room for, each writing its own `teacher-NNN` cache directory (on a cluster,
    storage every node sees); the stage process loads no teacher for it (nor for the
    held-out KL, which reads states the pool prefilled: `distill.opd.measure_heldout_kl`).
    The tasks leave the stage's placement group (its bundles belong to the trainer ranks).
    A failed teacher fails the round at once, naming it."""

    def __init__(self, *, dtype: str, device: str, num_cpus: float, num_gpus: float,
                 per_teacher: dict[int, tuple[float, float]] | None = None):
        self.per_teacher = dict(per_teacher or {})
        for where, gpus in [("", num_gpus)] + [(f" (teacher {i})", g) for i, (_, g) in self.per_teacher.items()]:
            if device == "cuda" and gpus < 1:
                raise ValueError(f"TeacherPrefillPool: device 'cuda' needs num_gpus >= 1{where}, got {gpus}")
        self.dtype, self.device, self.num_cpus, self.num_gpus = dtype, device, num_cpus, num_gpus

    def resources(self, teacher_index: int) -> tuple[float, float]:
        """(num_cpus, num_gpus) of one teacher's prefill task."""
        return self.per_teacher.get(teacher_index, (self.num_cpus, self.num_gpus))

    def __call__(self, settings, todo: list, cache_dir, pad_id: int) -> dict:
        import ray

        refs = {}
        for t, routed in todo:
            cpus, gpus = self.resources(t.index)
            task = ray.remote(_prefill_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                                     scheduling_strategy="DEFAULT")
            refs[task.remote(settings, t, routed, str(cache_dir), pad_id, self.dtype, self.device,
                             max(1, math.ceil(cpus)))] = t
        out, pending = {}, list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            t = refs[done[0]]
            try:
                out[t.name] = ray.get(done[0])
                print(f"[teach] {t.name}: {out[t.name]['tokens']} tokens prefilled in Ray worker "
                      f"{out[t.name]['worker_pid']} (stage process {os.getpid()})", flush=True)
            except Exception as exc:
                for r in pending:
                    ray.cancel(r, force=True)
                raise RuntimeError(f"teacher prefill of {t.name} (teacher {t.index}) failed: "
                                   f"{type(exc).__name__}: {str(exc).strip()[-2000:]}") from exc
        return {t.name: out[t.name] for t, _ in todo}
