"""Generators: sample completions (token ids + per-token log-probs) from a causal LM.

A generator has `generate(prompt_ids, sampling) -> list[Completion]`, `load_weights(state)`
and `close()`. `generate` returns a FLAT list: `sampling.n` completions per prompt, the
prompt's samples consecutive, prompts in the order given (`out[i * n + j]` is sample j of
prompt i). Stage drivers only ever see this protocol; `HFGenerator` (a transformers model,
CPU default) is here, `VLLMGenerator` (CUDA or vLLM's CPU build) in `engine.generation_vllm`.

Finished rows. `HFGenerator` decodes with its own loop over the model's forward and a
`DynamicCache` (`_decode_compact`): the inputs `generate` would build, but a row that emitted
a stop token leaves the batch (cache, mask, positions: `Cache.batch_select_indices`), so a
batch of 6-token math answers beside 96-token replies stops computing the short ones; the
cache's full-attention layers write in place (no per-step `torch.cat`) and, on CPU, one-token
steps of grouped-query attention skip transformers' `repeat_kv` copy (`DECODE_ATTENTION`).
Models the loop cannot drive (`supports_compact_decode`) and `compact=False` use transformers
`generate`, which computes every row until the batch's last one stops. Both give the same
tokens and log-probs; on CPU (MKL) bit for bit, as long as a batch does not shrink below
`compact_min_rows` rows (bench/bench_generation.py, BENCHMARKS.md).

Log-probs. `Completion.logprobs[t]` is the log-probability of the sampled token under the
distribution it was actually sampled from: `log_softmax(filter(logits / T))`, where
`filter` applies top-k and top-p (tokens outside get -inf and the rest is renormalised;
`engine.logprobs.compute_sampling_keep_mask`, the one definition the trainer uses too:
GRPO batches carry top_k/top_p and the trainer's log-probs truncate the same way).
With the defaults (top_k=0, top_p=1) this is exactly `log_softmax(logits / T)`, the
quantity a trainer computes by dividing its logits by the sampling temperature. Greedy
decoding (T == 0) reports `log_softmax(logits)`. This is vLLM's `processed_logprobs`
mode, which `VLLMGenerator` requests, so both back-ends report the same quantity.

Determinism. Every sampled row draws its `max_new_tokens` uniforms up front from its own
`torch.Generator`, seeded from (`sampling.seed`, prompt index, sample index); step t of a
row samples by inverting the CDF at its t-th uniform, for all rows at once (one
vectorised search per step, not one `multinomial` call per row). Outputs depend on the
seed only, not on `batch_size`, the order rows are batched in, or the global RNG.
`seed=None` draws a seed from the global torch RNG.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Callable

import torch

from engine.generator_api import Completion, Generator, SamplingParams, row_seed, validate_prompts
from engine.logprobs import compute_sampling_keep_mask
from engine.registry import Registry


# ---------------------------------------------------------------- pure sampling math
def compute_sampling_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                              top_p: float = 1.0) -> torch.Tensor:
    """Log-probs (B, V) of the distribution sampled from: temperature, then top-k, then
    top-p (`engine.logprobs.compute_sampling_keep_mask`, the trainer's definition too);
    -inf outside the kept set. temperature == 0 means greedy and returns log_softmax(logits)."""
    logits = logits.float()  # (B, V)
    if temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    scaled = logits / temperature  # (B, V)
    keep = compute_sampling_keep_mask(scaled, top_k, top_p)  # (B, V) bool, None: no filter
    if keep is not None:
        scaled = scaled.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def split_completion(tokens: list[int], logprobs: list[float], stop_ids: set[int],
                     max_new_tokens: int) -> Completion:
    """Cut a generated row after its first stop token (kept); else it ran to the limit."""
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            return Completion(tokens[: i + 1], logprobs[: i + 1], "stop")
    if len(tokens) < max_new_tokens:
        raise RuntimeError(f"generation ended after {len(tokens)} < {max_new_tokens} tokens without a stop token")
    return Completion(tokens[:max_new_tokens], logprobs[:max_new_tokens], "length")


# ---------------------------------------------------------------- HF back-end
def sample_inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids (B,) drawn from `exp(logp)` (B, V) by inverting each row's CDF at `u` (B,),
    u in (0, 1]: the first token whose cumulative probability reaches u * total. A token of
    probability 0 (filtered by top-k/top-p: -inf) is never chosen."""
    cdf = logp.double().exp().cumsum(dim=-1)  # (B, V)
    target = (u.double().to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    idx = torch.searchsorted(cdf, target).squeeze(-1)  # (B,) first index with cdf >= target
    return idx.clamp(max=logp.shape[-1] - 1)


class _RowSampler:
    """A transformers logits processor that samples each row from its own pre-drawn
    uniforms and records the sampled token's log-prob. It returns a one-hot score row
    (0 at the chosen token, -inf elsewhere), so `generate`'s greedy arg-max picks exactly
    the token chosen here."""

    def __init__(self, sampling: SamplingParams, uniforms: torch.Tensor | None, prompt_len: int):
        self.sampling = sampling
        self.uniforms = uniforms  # (B, max_new_tokens) in (0, 1], None when greedy
        self.prompt_len = prompt_len
        self.steps: dict[int, torch.Tensor] = {}  # step -> (B,) log-probs

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = self.sampling
        logp = compute_sampling_logprobs(scores, s.temperature, s.top_k, s.top_p)  # (B, V)
        t = input_ids.shape[1] - self.prompt_len  # index of the token being chosen
        if s.greedy:
            chosen = scores.argmax(dim=-1)  # (B,)
        else:
            chosen = sample_inverse_cdf(logp, self.uniforms[:, t]).to(scores.device)  # (B,)
        self.steps[t] = logp.gather(-1, chosen[:, None])[:, 0].cpu()
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen[:, None], 0.0)


def model_end_ids(model, tokenizer=None) -> list[int]:
    """Ids that end a turn: the tokenizer's EOS and template end of turn
    (`engine.chat.end_of_turn_ids`), then the model's `generation_config`/`config` EOS ids."""
    from engine.chat import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer) if tokenizer is not None else []
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids += [int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos]) if t is not None]
    return list(dict.fromkeys(ids))


@functools.cache
def _preallocated_layer_class():
    """A transformers `DynamicLayer` whose keys/values live in buffers with room for `capacity`
    positions: `update` writes the new positions in place instead of concatenating the whole
    cache into a new tensor every step (`DynamicLayer.update`'s `torch.cat`, ~13% of a tiny
    model's decode step on CPU). `keys`/`values` are views of the filled part, the very values
    `torch.cat` would give. Batch selection copies the buffers' live rows."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                b, h, _, _ = key_states.shape
                self._k = key_states.new_empty((b, h, self.capacity, key_states.shape[-1]))
                self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            n = key_states.shape[-2]
            if self.length + n > self.capacity:
                raise RuntimeError(f"PreallocatedLayer: {self.length + n} positions > capacity {self.capacity}")
            self._k[:, :, self.length:self.length + n] = key_states
            self._v[:, :, self.length:self.length + n] = value_states
            self.length += n
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.length:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("PreallocatedLayer: the decode loop never crops")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("PreallocatedLayer: the decode loop never repeats rows")

    return PreallocatedLayer


DECODE_ATTENTION = "polymath_sdpa_decode"


@functools.cache
def _register_decode_attention() -> str:
    """Register (once) `DECODE_ATTENTION` with transformers' attention and mask interfaces:
    transformers' SDPA, except that a one-token decode step of a grouped-query attention layer
    on CPU passes the cache's keys/values to `scaled_dot_product_attention(enable_gqa=True)`
    instead of materialising them `num_key_value_groups` times (`repeat_kv`, which transformers
    does whenever there is a padding mask: a copy of the whole cache per layer per step, ~15%
    of a tiny model's decode step). The same kernel computes the same values (checked bit for
    bit against `generate`, tests/unit/test_generation_compact.py). Prefill, other devices and
    anything unusual (dropout, position bias, paged cache) go to transformers' own function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
        groups = getattr(module, "num_key_value_groups", 1)
        if (query.shape[2] != 1 or groups <= 1 or query.device.type != "cpu" or dropout
                or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    return DECODE_ATTENTION


def supports_compact_decode(model) -> bool:
    """Whether `HFGenerator._decode_compact` can drive `model`: a decoder-only model that takes
    `position_ids` and a `DynamicCache` whose every layer can drop batch rows (full or sliding
    attention; not linear-attention/recurrent states), and whose generation inputs are the
    standard ones (no `prepare_inputs_for_generation` override, e.g. multimodal models or 3-D
    rotary positions). Anything else generates through transformers `generate` (no compaction)."""
    from transformers import DynamicCache, GenerationMixin
    from transformers.cache_utils import DynamicLayer

    cls = type(model)
    if model.config.is_encoder_decoder or not cls._supports_default_dynamic_cache():
        return False
    if cls.prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation:
        return False
    params = inspect.signature(model.forward).parameters
    if not {"position_ids", "past_key_values", "attention_mask"} <= set(params):
        return False
    layers = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
    return bool(layers) and all(isinstance(layer, DynamicLayer) for layer in layers)


class HFGenerator:
    """Batched generation with left padding and the KV cache; finished rows leave the batch.

    `compact=False` decodes with transformers `generate` instead (every row computed until
    the batch's last one stops). `compact_fraction`: the batch is compacted once its finished
    rows are at least this fraction of it (each compaction copies the whole cache).
    `compact_min_rows`: it never shrinks below this many rows (finished rows fill up): MKL's
    sgemm rounds a row differently below ~16 rows (per-row results of `x @ W.T` then depend on
    the batch size), so with 16 the rows get the very numbers `generate` gives them."""

    def __init__(self, model, tokenizer=None, device: str = "cpu", dtype: str = "fp32", batch_size: int = 64,
                 compact: bool = True, compact_fraction: float = 0.25, compact_min_rows: int = 16):
        from transformers import GenerationConfig

        from engine.model import load_model, load_tokenizer

        if batch_size < 1:
            raise ValueError(f"HFGenerator: batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= compact_fraction <= 1.0:
            raise ValueError(f"HFGenerator: compact_fraction must be in [0, 1], got {compact_fraction}")
        if compact_min_rows < 1:
            raise ValueError(f"HFGenerator: compact_min_rows must be >= 1, got {compact_min_rows}")
        if isinstance(model, (str, os.PathLike)):
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
            model = load_model(model, dtype=dtype, device=device)
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.end_ids = model_end_ids(self.model, tokenizer)  # EOS first, then the template's end of turn
        self.eos_id = self.end_ids[0] if self.end_ids else None
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None else self.model.config.pad_token_id
        if self.eos_id is None or self.pad_id is None:
            raise ValueError("HFGenerator: need EOS and pad token ids (pass the tokenizer)")
        # A clean generation config: a checkpoint's own (repetition penalty, top-k ...) must
        # never leak into sampling, which `_RowSampler` alone controls.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # The compacting decode loop (`_decode_compact`) where the model allows it, else transformers `generate`.
        self.compact = compact and supports_compact_decode(self.model)
        self.compact_fraction = compact_fraction
        self.compact_min_rows = compact_min_rows
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    # -- generation
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        validate_prompts(prompt_ids, self.vocab_size)
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
        rows = [(i, j) for i in range(len(prompt_ids)) for j in range(sampling.n)]
        # Longest first, so a batch holds prompts of similar length (less padding).
        order = sorted(range(len(rows)), key=lambda r: -len(prompt_ids[rows[r][0]]))
        out: list[Completion | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch_rows = [rows[r] for r in chunk]
            for r, completion in zip(chunk, self._generate_batch(prompt_ids, batch_rows, sampling, seed)):
                out[r] = completion
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, prompt_ids, batch_rows, sampling: SamplingParams, seed: int) -> list[Completion]:
        prompts = [list(prompt_ids[i]) for i, _ in batch_rows]
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), self.pad_id, dtype=torch.long)  # (B, P) left-padded
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, P - len(p):] = 1
        uniforms = None
        if not sampling.greedy:  # (B, max_new_tokens), each row from its own generator, in (0, 1]
            uniforms = torch.stack([1.0 - torch.rand(sampling.max_new_tokens, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(row_seed(seed, i, j)))
                                    for i, j in batch_rows])
        stop_ids = list(dict.fromkeys([*self.end_ids, *sampling.stop_token_ids]))
        run = self._decode_compact if self.compact else self._decode_generate
        tokens, logp = run(ids, mask, uniforms, sampling, stop_ids)  # (B, steps) each
        return [split_completion(tokens[b].tolist(), logp[b].tolist(), set(stop_ids), sampling.max_new_tokens)
                for b in range(len(prompts))]

    def _decode_generate(self, ids, mask, uniforms, sampling: SamplingParams, stop_ids: list[int]):
        """transformers `generate`, every row computed until the batch's last one stops."""
        from transformers import GenerationConfig, LogitsProcessorList

        P = ids.shape[1]
        sampler = _RowSampler(sampling, uniforms, P)
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=sampling.max_new_tokens,
                                   eos_token_id=stop_ids, pad_token_id=self.pad_id, use_cache=True)
        seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                   generation_config=gen_cfg, logits_processor=LogitsProcessorList([sampler]))
        new = seqs[:, P:].cpu()  # (B, steps)
        steps = new.shape[1]
        logp = torch.stack([sampler.steps[t] for t in range(steps)], dim=1) if steps else torch.zeros(len(ids), 0)
        return new, logp

    def _decode_compact(self, ids, mask, uniforms, sampling: SamplingParams, stop_ids: list[int]):
        """`_decode_loop`, with transformers' SDPA swapped for `DECODE_ATTENTION` while it runs
        (a CPU model on SDPA whose attention layers dispatch through transformers'
        `AttentionInterface`; the model's setting is restored after)."""
        config = self.model.config
        if (config._attn_implementation != "sdpa" or torch.device(self.device).type != "cpu"
                or not type(self.model)._can_set_attn_implementation()):
            return self._decode_loop(ids, mask, uniforms, sampling, stop_ids)
        config._attn_implementation_internal = _register_decode_attention()
        try:
            return self._decode_loop(ids, mask, uniforms, sampling, stop_ids)
        finally:
            config._attn_implementation_internal = "sdpa"

    def _decode_loop(self, ids, mask, uniforms, sampling: SamplingParams, stop_ids: list[int]):
        """Our own decode loop over the model's forward with a `DynamicCache`: the same model
        inputs `generate` builds (left-padded prefill, position ids `cumsum(mask) - 1`, the 2-D
        mask dropped when nothing is padded, `logits_to_keep=1`), the same per-step sampling
        as `_RowSampler`, but rows that emitted a stop token leave the batch: once they are at
        least `compact_fraction` of it, the cache, mask, positions and inputs keep only the
        live rows (`Cache.batch_select_indices`). A finished row still in the batch is fed the
        pad token, as `generate` does, and its outputs are ignored."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        s, model, dev = sampling, self.model, self.device
        B, T = ids.shape[0], s.max_new_tokens
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T) filled up to each row's stop
        logps = torch.zeros((B, T), dtype=torch.float32)
        stop = torch.tensor(stop_ids, dtype=torch.long)
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        # full-attention layers write in place (sliding-window ones keep transformers' own)
        layer_cls = _preallocated_layer_class()
        cache.layers = [layer_cls(ids.shape[1] + T) if type(layer) is DynamicLayer else layer
                        for layer in cache.layers]
        pos = mask.cumsum(-1) - 1  # (B, P), as `generate`: left padding gets position 0
        pos = pos.masked_fill(mask == 0, 0)
        attn = None if bool((mask == 1).all()) else mask.to(dev)  # `generate` drops an all-ones mask
        kw = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = model(input_ids=ids.to(dev), attention_mask=attn, position_ids=pos.to(dev), past_key_values=cache,
                    use_cache=True, return_dict=True, **kw)
        last_pos = pos[:, -1:].to(dev)  # (b, 1) position of each row's last token
        rows = torch.arange(B)  # (b,) original row of each batch row
        live = torch.ones(B, dtype=torch.bool)  # (b,) not yet stopped
        steps = 0
        for t in range(T):
            scores = out.logits[:, -1].to(copy=True, dtype=torch.float32)  # (b, V)
            logp = compute_sampling_logprobs(scores, s.temperature, s.top_k, s.top_p)  # (b, V)
            if s.greedy:
                chosen = scores.argmax(dim=-1)  # (b,)
            else:
                chosen = sample_inverse_cdf(logp, uniforms[rows, t]).to(scores.device)  # (b,)
            chosen_lp = logp.gather(-1, chosen[:, None])[:, 0].cpu()
            chosen = chosen.cpu()
            idx = rows[live]
            tokens[idx, t] = chosen[live]
            logps[idx, t] = chosen_lp[live]
            steps = t + 1
            live = live & ~torch.isin(chosen, stop)
            if t == T - 1 or not bool(live.any()):
                break
            feed = torch.where(live, chosen, torch.full_like(chosen, self.pad_id))  # (b,)
            keep = self._rows_to_keep(live)
            if keep is not None:
                keep_dev = keep.to(dev)
                cache.batch_select_indices(keep_dev)
                rows, live, feed, last_pos = rows[keep], live[keep], feed[keep], last_pos[keep_dev]
                if attn is not None:
                    attn = attn[keep_dev]
            if attn is not None:
                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
            last_pos = last_pos + 1
            out = model(input_ids=feed[:, None].to(dev), attention_mask=attn, position_ids=last_pos,
                        past_key_values=cache, use_cache=True, return_dict=True, **kw)
        return tokens[:, :steps], logps[:, :steps]

    def _rows_to_keep(self, live: torch.Tensor) -> torch.Tensor | None:
        """The batch rows (ascending) to keep when compacting, or None to leave the batch as is:
        the live rows once the finished ones are at least `compact_fraction` of the batch,
        topped up with finished rows to at least `compact_min_rows` rows (never more than now)."""
        b, n_live = len(live), int(live.sum())
        if b - n_live == 0 or b - n_live < self.compact_fraction * b:
            return None
        size = max(n_live, min(self.compact_min_rows, b))
        if size >= b:
            return None
        keep = live.clone()
        keep[(~live).nonzero()[: size - n_live, 0]] = True
        return keep.nonzero()[:, 0]

    # -- weights
    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy `state_dict` (HF names) into the model's parameters in place."""
        copy_state_into(self.model, state_dict, strict=strict)

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@torch.no_grad()
def copy_state_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """In-place copy by HF name; unknown names and shape mismatches are errors, and with
    `strict` every tensor must be covered (a tied alias counts as covered)."""
    targets = model.state_dict(keep_vars=True)
    unknown = sorted(set(state_dict) - set(targets))
    if unknown:
        raise KeyError(f"load_weights: unknown parameter names {unknown[:5]}; known e.g. {sorted(targets)[:5]}")
    for name, value in state_dict.items():
        dst = targets[name]
        if tuple(dst.shape) != tuple(value.shape):
            raise ValueError(f"load_weights: {name} has shape {tuple(value.shape)}, model expects {tuple(dst.shape)}")
        dst.data.copy_(value.detach().to(device=dst.device, dtype=dst.dtype))
    if strict:
        covered = {targets[n].data_ptr() for n in state_dict}
        missing = sorted(n for n, t in targets.items() if n not in state_dict and t.data_ptr() not in covered)
        if missing:
            raise KeyError(f"load_weights: state_dict lacks {len(missing)} tensors, e.g. {missing[:5]}")


# ---------------------------------------------------------------- registry
GENERATORS: Registry[Callable[..., Generator]] = Registry("generator backend")
register_generator = GENERATORS.register


@register_generator("hf")
def _build_hf(config, model_dir, *, tokenizer, dtype: str, device: str | None = None) -> Generator:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HFGenerator(model_dir, tokenizer, device=device, dtype=dtype, batch_size=config.batch_size,
                       compact=getattr(config, "compact", True))


@register_generator("vllm")
def _build_vllm(config, model_dir, *, tokenizer, dtype: str, device: str | None = None) -> Generator:
    from engine.generation_vllm import VLLMGenerator  # lazy: vllm is an extra (CUDA or CPU build)

    return VLLMGenerator(model_dir, tokenizer, dtype=dtype,
                         gpu_memory_utilization=config.gpu_memory_utilization,
                         **({"enforce_eager": True} if getattr(config, "enforce_eager", False) else {}))


def build_generator(config, model_dir, *, tokenizer=None, dtype: str = "fp32", device: str | None = None) -> Generator:
    """A generator from a `GeneratorConfig` (backend, batch_size, gpu_memory_utilization)."""
    return GENERATORS.get(config.backend)(config, model_dir, tokenizer=tokenizer, dtype=dtype, device=device)
