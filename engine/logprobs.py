"""Per-token log-probabilities (and entropy) of a causal LM, chunked over tokens.

`compute_chunked_token_logprobs(hidden (B,T,H), weight (V,H), input_ids (B,T))` returns
`logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])` from the logits at position
t - 1, with `logprobs[:, 0] = 0` (docs/CONTRACTS.md alignment). `hidden` is the model's
post-final-norm hidden state and `weight` its vocabulary projection.

The (tokens x vocabulary) logits are never all alive at once: a custom autograd function
walks the tokens in chunks of `chunk_size`, saving only its inputs; backward recomputes
each chunk's log-softmax and forms the gradient with respect to the logits in closed
form (as `distill/kl.py` does). Not `torch.utils.checkpoint`: its first call imports
torch._dynamo, ~5 s on the 2-core CI machine. The log-softmax runs in float32 (float64
for float64 inputs). The vocabulary projection: with `fp32_logits` (None, the default:
on for half-precision inputs) the hidden states and the weight are cast to float32 and
the logits computed in float32 (the weight's float32 copy is made once per forward and
once per backward: O(V x H) memory, independent of the token count, so the chunking
still bounds memory); with `fp32_logits=False` in the inputs' dtype (a bf16 matmul,
whose logits are rounded to bf16 before the softmax: at logits ~26 that is ~0.1 a logit).
Pure math: torch + stdlib only.

Sampling distribution (one definition, shared with `engine.generation`). With top-k /
top-p the generator samples from the TRUNCATED distribution, `log_softmax(filter(logits /
T))` (`compute_sampling_keep_mask`: tokens outside the kept set get -inf, the rest is
renormalised), and reports that log-prob, as vLLM's `processed_logprobs` mode does.
`compute_chunked_token_logprobs(..., top_k, top_p)` computes the same quantity from the
trainer's logits, so sampler and trainer log-probs agree on the sampled tokens and the
importance ratio compares like with like. One addition: the position's own target token
is always kept, so a policy that has moved since sampling (or a reference model) gives a
finite log-prob for a token outside its own top-p set instead of -inf. The filter set is
a constant for autograd (piecewise; no gradient through the choice of kept tokens).
Without top-k / top-p (top_k=0, top_p=1) nothing is filtered, exactly as before.

Caveat: the recomputation in backward reads `weight` again, so it must still hold its
full values then (under DeepSpeed ZeRO-3 pass a gathered weight, or `chunk_size=None`
for one plain autograd pass that keeps the (tokens, V) log-softmax for backward).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
DEFAULT_CHUNK_SIZE = 1024


def compute_sampling_keep_mask(scaled: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor | None:
    """Bool (N, V): the tokens a sampler keeps from temperature-scaled logits (N, V): top-k,
    then top-p (the smallest set of most likely tokens whose mass reaches top_p) over the
    top-k survivors. None when nothing is filtered (top_k=0 or >= V, top_p=1)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    keep = None
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]  # (N, 1)
        keep = scaled >= kth
        scaled = scaled.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # (N, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # exclusive cumsum (N, V)
        drop_sorted = mass_before >= top_p  # the top token always has mass_before 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        keep = ~drop if keep is None else keep & ~drop
    return keep


def projection_weight(h: Tensor, weight: Tensor, fp32_logits: bool | None) -> Tensor:
    """The weight the logits are computed with: `weight` itself, or its float32 copy where
    `fp32_logits` (None: when `h` or `weight` is half precision) asks for float32 logits."""
    if fp32_logits is None:
        fp32_logits = h.dtype in (torch.bfloat16, torch.float16) or weight.dtype in (torch.bfloat16, torch.float16)
    if not fp32_logits or weight.dtype in (torch.float32, torch.float64):
        return weight
    return weight.float()


def _chunk_log_softmax(h: Tensor, weight: Tensor, temperature: float, acc: torch.dtype,
                       top_k: int = 0, top_p: float = 1.0, targets: Tensor | None = None) -> Tensor:
    """log_softmax(filter(h W^T / temperature)) of one chunk, (c, V) in `acc`; -inf outside
    the kept set, which always holds each row's target (module docstring). The matmul runs
    in `weight`'s dtype (`projection_weight` picks it)."""
    logits = (h.to(weight.dtype) @ weight.T).to(acc)  # (c, V)
    if temperature != 1.0:
        logits = logits / temperature
    keep = compute_sampling_keep_mask(logits, top_k, top_p)
    if keep is not None:
        if targets is not None:
            keep = keep.scatter(-1, targets.unsqueeze(-1), True)
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _entropy(logp: Tensor) -> Tensor:
    """-sum p log p over the last dim (c,), 0 * log 0 = 0 for filtered tokens."""
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


def zero_input_grads(ctx, h: Tensor, weight: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Zeroed gradient accumulators of a chunked autograd function's first two inputs:
    hidden states (N, H) in their dtype, the head weight (V, H) in at least float32; None
    where `ctx` needs no gradient."""
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = torch.zeros_like(h) if need_h else None  # (N, H)
    w_acc = torch.promote_types(weight.dtype, torch.float32)
    grad_w = torch.zeros(weight.shape, dtype=w_acc, device=weight.device) if need_w else None  # (V, H)
    return grad_h, grad_w


def chunk_bounds(n: int, chunk_size: int):
    """(start, end) of the consecutive chunks of `chunk_size` tokens that cover range(n)."""
    for s in range(0, n, chunk_size):
        yield s, min(s + chunk_size, n)


def add_chunk_input_grads(g: Tensor, h: Tensor, weight: Tensor, s: int, e: int, grad_h: Tensor | None,
                          grad_w: Tensor | None) -> None:
    """Back-propagate dL/dlogits of tokens [s, e) `g` (c, V) through `logits = h @ weight.T`:
    its rows of `grad_h` (N, H) and its term of `grad_w` (V, H), each where not None
    (`zero_input_grads`)."""
    if grad_h is not None:
        grad_h[s:e] = (g.to(weight.dtype) @ weight).to(h.dtype)  # (c, H)
    if grad_w is not None:
        grad_w.addmm_(g.to(grad_w.dtype).T, h[s:e].to(grad_w.dtype))  # (V, H)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward and backward walk the tokens in chunks; backward recomputes each chunk's
    log-softmax and uses the closed forms (z = logits / temperature, p = softmax(z)):
    d logp_y / dz = onehot(y) - p;  d H / dz = -p (log p + H)."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk_size, top_k, top_p, fp32_logits):
        acc = torch.promote_types(h.dtype, torch.float32)
        n = h.shape[0]
        filtered = bool(top_k) or top_p < 1.0
        lp = torch.empty(n, dtype=acc, device=h.device)  # (N,)
        ent = torch.empty(n, dtype=acc, device=h.device)  # (N,)
        w = projection_weight(h, weight, fp32_logits)  # (V, H)
        for s, e in chunk_bounds(n, chunk_size):
            logp = _chunk_log_softmax(h[s:e], w, temperature, acc, top_k, top_p, targets[s:e])  # (c, V)
            lp[s:e] = logp.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1)
            ent[s:e] = _entropy(logp) if filtered else -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(h, weight, targets, ent)
        ctx.temperature, ctx.chunk_size, ctx.acc = temperature, chunk_size, acc
        ctx.top_k, ctx.top_p, ctx.filtered, ctx.fp32_logits = top_k, top_p, filtered, fp32_logits
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        h, weight, targets, ent = ctx.saved_tensors
        grad_h, grad_w = zero_input_grads(ctx, h, weight)  # (N, H), (V, H)
        w = projection_weight(h, weight, ctx.fp32_logits)  # (V, H)
        for s, e in chunk_bounds(h.shape[0], ctx.chunk_size):
            logp = _chunk_log_softmax(h[s:e], w, ctx.temperature, ctx.acc, ctx.top_k, ctx.top_p,
                                      targets[s:e])  # (c, V)
            p = logp.exp()
            if ctx.filtered:  # p = 0 off the kept set: its (log p + H) p term is 0, not nan
                logp.masked_fill_(torch.isinf(logp), 0.0)
            # dL/dz = g_lp (onehot - p) - g_ent p (log p + H)
            g = logp.add_(ent[s:e].unsqueeze(-1)).mul_(p).mul_(-grad_ent[s:e].unsqueeze(-1))
            g.sub_(p.mul_(grad_lp[s:e].unsqueeze(-1)))
            g.scatter_add_(-1, targets[s:e].unsqueeze(-1), grad_lp[s:e].unsqueeze(-1).to(g.dtype))
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)  # dz/dlogits
            add_chunk_input_grads(g, h, w, s, e, grad_h, grad_w)
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None, None, None


def _check_inputs(hidden: Tensor, weight: Tensor, input_ids: Tensor, chunk_size, temperature: float) -> None:
    if hidden.dim() != 3 or weight.dim() != 2 or input_ids.dim() != 2:
        raise ValueError("hidden (B, T, H), weight (V, H), input_ids (B, T) expected; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(input_ids.shape)}")
    if hidden.shape[1] < 1:
        raise ValueError("hidden and input_ids need at least one position (T >= 1)")
    if hidden.shape[:2] != input_ids.shape or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"input_ids {tuple(input_ids.shape)}")
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= weight.shape[0]):
        bad = ((input_ids < 0) | (input_ids >= weight.shape[0])).nonzero()[0].tolist()
        raise ValueError(f"input_ids[{bad[0]}, {bad[1]}] = {int(input_ids[bad[0], bad[1]])} is outside "
                         f"the vocabulary of size {weight.shape[0]}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def compute_target_logprobs(h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = DEFAULT_CHUNK_SIZE, *,
                            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            fp32_logits: bool | None = None) -> tuple[Tensor, Tensor]:
    """(log p(targets_i | h_i), entropy_i), each (N,), for states h (N, H) that each predict
    one target (N,): the flat core of `compute_chunked_token_logprobs` (same numerics, same
    chunked backward), for callers whose states are already gathered (OPD's reward term)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    if chunk_size is None:  # plain autograd over all tokens at once
        logp = _chunk_log_softmax(h, projection_weight(h, weight, fp32_logits), float(temperature), acc, int(top_k),
                                  float(top_p), targets)  # (N, V)
        lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
        ent = _entropy(logp) if (top_k or top_p < 1.0) else -(logp.exp() * logp).sum(-1)  # (N,)
        return lp, ent
    return _ChunkedTokenLogprobs.apply(h, weight, targets, float(temperature), int(chunk_size), int(top_k), float(top_p),
                                       fp32_logits)


def compute_chunked_token_logprobs(hidden: Tensor, weight: Tensor, input_ids: Tensor,
                           chunk_size: int | None = DEFAULT_CHUNK_SIZE, *, temperature: float = 1.0,
                           top_k: int = 0, top_p: float = 1.0, return_entropy: bool = False,
                           fp32_logits: bool | None = None):
    """Aligned log-probs (B, T) [and entropies (B, T)], chunked over tokens.

    `entropy[:, t]` is the entropy of the distribution that predicted token t (0 at t=0).
    `temperature` divides the logits (match the sampler's when computing ratios to its
    log-probs). `top_k` / `top_p`: the sampler's truncation (module docstring); the
    entropy is then the truncated distribution's. `chunk_size=None`: one plain autograd
    pass (no chunking, no recompute). `fp32_logits`: the projection in float32 (None: for
    half-precision inputs; module docstring).
    """
    _check_inputs(hidden, weight, input_ids, chunk_size, temperature)
    B, T, H = hidden.shape
    acc = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden[:, :-1].reshape(-1, H)  # (N, H), N = B * (T - 1)
    targets = input_ids[:, 1:].reshape(-1).to(hidden.device)  # (N,)
    lp, ent = compute_target_logprobs(h, weight, targets, chunk_size, temperature=temperature, top_k=top_k, top_p=top_p,
                                      fp32_logits=fp32_logits)
    zeros = torch.zeros(B, 1, dtype=acc, device=hidden.device)  # (B, 1)
    logprobs = torch.cat([zeros, lp.view(B, T - 1)], dim=1)  # (B, T)
    if not return_entropy:
        return logprobs
    return logprobs, torch.cat([zeros, ent.view(B, T - 1)], dim=1)  # (B, T) each
