"""What both trainer back-ends share (`engine.trainer_torch`, `engine.trainer_deepspeed`):
the model forward that feeds a loss, aligned token log-probs, step metrics, RNG and
extra-state files, the Hugging Face export, and the data-parallel process group. The
interface and the factory are `engine.trainer`; this module imports neither back-end.

Attention: models are called with `attention_mask=None`, `use_cache=False` and the
batch's `position_ids`; transformers then derives block-diagonal causal attention from
the position restarts, which serves padded and packed rows alike (`engine/batching.py`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

import torch

from engine.batching import unpack_to_samples
from engine.logprobs import compute_chunked_token_logprobs

LossFn = Callable[[torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, dict]]
DUMMY_KEY = "_dummy"  # a padding micro-batch that only keeps ranks in step: no loss_fn, zero gradient
# ----------------------------------------------------------------------------- math


def batch_temperature(batch: dict) -> float:
    """The temperature a batch's rollouts were sampled at (`temperature`, 0-d), 1 if absent:
    log-probs for ratios against the sampler's divide the logits by it."""
    return float(batch["temperature"]) if "temperature" in batch else 1.0


def batch_sampling(batch: dict) -> dict:
    """The sampling distribution a batch's rollouts came from: `temperature` (1 if absent),
    `top_k` (0) and `top_p` (1), each a 0-d tensor in the batch. Log-probs taken with these
    are the generator's own (`engine.logprobs`: one definition of the truncation)."""
    return {"temperature": batch_temperature(batch),
            "top_k": int(batch["top_k"]) if "top_k" in batch else 0,
            "top_p": float(batch["top_p"]) if "top_p" in batch else 1.0}


class LogprobFn:
    """Loss-shaped function returning aligned log-probs (zero at every segment start), (B, T),
    or per sample (S, L) for a packed batch (`unpack_index`, `engine.batching`).

    A batch may carry `temperature`, `top_k`, `top_p` (0-d, `batch_sampling`): the
    log-probs are then those of the distribution a generator sampled from."""

    def __init__(self, chunk: int = 0):
        self.chunk = chunk

    def __call__(self, hidden, weight, batch):
        lp = compute_chunked_token_logprobs(hidden, weight, batch["input_ids"], self.chunk or None,
                                            **batch_sampling(batch))  # (B, T)
        # a packed batch's log-probs come back per sample (S, L) (`engine.batching.unpack_to_samples`)
        return unpack_to_samples(lp.masked_fill(batch["position_ids"] == 0, 0.0), batch), {}


# ----------------------------------------------------------------------------- model forward


def run_loss(lm, batch: dict, loss_fn: LossFn):
    """Post-final-norm hidden states of `lm` on `batch`, handed with the LM head to `loss_fn`."""
    out = lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=None, use_cache=False)
    return loss_fn(out.last_hidden_state, lm.get_output_embeddings().weight, batch)


def enable_gradient_checkpointing(lm) -> None:
    """transformers' gradient (activation) checkpointing on every decoder layer of `lm`, non-reentrant
    (torch.utils.checkpoint with use_reentrant=False: gradients identical to a plain
    backward; the layers' activations are recomputed in backward instead of kept)."""
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"trainer.gradient_checkpointing: {type(lm).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; gradient_* is its deprecated alias
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 5.19, which vLLM 0.32 pins (constraints.txt)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def padding_loss(hidden: torch.Tensor, weight: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """The loss of a padding micro-batch (`DUMMY_KEY`): exactly zero, yet reaching every
    parameter, so the rank joins the gradient collectives without calling the real loss
    (an OPD loss would otherwise load a teacher head for data that is not this rank's)."""
    return hidden.sum() * 0.0 + weight.sum() * 0.0, {}


def as_float(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def merge_step_metrics(parts: list[dict]) -> dict:
    """Sum `loss`/`tokens`/`num_micro_batches` over parts; other loss metrics are averaged
    weighted by micro-batch count (one named like a step figure is dropped); `grad_norm`/`lr`
    come from the first part."""
    n = sum(p["num_micro_batches"] for p in parts)
    out = {"loss": sum(p["loss"] for p in parts), "tokens": sum(p["tokens"] for p in parts),
           "num_micro_batches": n, "grad_norm": parts[0]["grad_norm"], "lr": parts[0]["lr"]}
    seconds = max(p["seconds"] for p in parts)
    out["seconds"] = seconds
    out["tokens_per_s"] = out["tokens"] / max(seconds, 1e-9)
    # a loss's own metric named like a step figure (GRPO's per-micro-batch `loss`) does not
    # replace it: `loss` is the step's, the sum over micro-batches however many there are
    keys = {k for p in parts for k in p.get("loss_metrics", {})} - set(out)
    for k in sorted(keys):
        num = sum(p["loss_metrics"].get(k, 0.0) * p["num_micro_batches"] for p in parts)
        out[k] = num / max(n, 1)
    return out


# ----------------------------------------------------------------------------- state files


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_extra_state(path: Path, extra_state: dict) -> None:
    try:
        text = json.dumps(extra_state, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"save_checkpoint: extra_state must be JSON-serialisable: {e}") from e
    (path / "extra_state.json").write_text(text)


def read_extra_state(path: Path) -> dict:
    f = path / "extra_state.json"
    if not f.exists():
        raise FileNotFoundError(f"load_checkpoint: {f} is missing (not a complete checkpoint)")
    return json.loads(f.read_text())


def save_hf_dir(lm, state_dict: dict, path: Path, tokenizer_dir: str | None) -> None:
    """`state_dict` as an HF model directory (safetensors + config), with the tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(str(path), state_dict=state_dict)
    local = tokenizer_dir is not None and Path(tokenizer_dir).is_dir()
    if tokenizer_dir and (not local or (Path(tokenizer_dir) / "tokenizer_config.json").exists()):
        from engine.model import load_tokenizer  # a local directory or a hub id

        load_tokenizer(tokenizer_dir).save_pretrained(str(path))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------- ranks


def collective_timeout_s() -> float:
    """How long a rank waits in a collective (or the rendezvous) for a peer before it raises:
    `POLYMATH_COLLECTIVE_TIMEOUT_S`, 600 s by default (torch's gloo default is 30 min). The
    driver learns of a dead rank from Ray at once (`pipeline.actors`); this bounds the wait
    of a rank whose peer hangs without dying."""
    raw = os.environ.get("POLYMATH_COLLECTIVE_TIMEOUT_S", "600")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"POLYMATH_COLLECTIVE_TIMEOUT_S must be a number of seconds > 0, got {raw!r}")
    return value


def init_process_group(rank: int, world_size: int, device: str) -> None:
    """Form (once per process) the data-parallel process group: NCCL on CUDA, gloo on CPU,
    over the RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT environment (MASTER_ADDR is rank
    0's node, set by `pipeline.actors`), with a bounded collective timeout
    (`collective_timeout_s`). One rank gets an in-memory store (no TCP port)."""
    from datetime import timedelta

    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"process group already formed as rank {dist.get_rank()}/{dist.get_world_size()}, "
                               f"asked for {rank}/{world_size}")
        return
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"{var} must be set for world_size {world_size} (rank 0's node and a port on it)")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=collective_timeout_s()))


def sum_gradients_over_ranks(params: list[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the ranks, in place, in one flat all-reduce
    (a rank whose micro-batches did not reach a parameter contributes zeros). The losses
    are normalised by a global denominator, so the sum is the one-process gradient."""
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])  # (n_params,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(world_size: int) -> None:
    """Wait for every rank (nothing to wait for with one rank)."""
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Rank 0's parameters on every rank (they load the same checkpoint; this makes it so)."""
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)
