"""Chunked full-vocabulary divergences between a student and a teacher, per token.

The OPD loss (docs/DESIGN.md section 4) is `sum_i w_i * D(p_s(.|i), p_t(.|i))` over response
tokens i, where both distributions cover the whole vocabulary. The student's logits are
`h_s @ W^T` (h_s: the student's post-final-norm hidden state, W: its vocabulary
projection); the teacher's are `head_t(h_t)` (h_t: the teacher's cached PRE-final-norm
hidden state, head_t: final RMSNorm + projection). `compute_chunked_divergence` never
builds an (all tokens x vocabulary) tensor: a custom autograd function walks the tokens in
chunks, and its backward recomputes each chunk's logits and forms the gradient with
respect to the student logits in closed form, then with respect to h_s and W.

Divergences (registry `DIVERGENCES`, one signature `(log_ps, log_pt, beta, with_grad)`):
- `reverse_kl` (default, as in DeepSeek-V4): `KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)`;
  d/dz_s = `p_s * (log p_s - log p_t - KL)`.
- `forward_kl`: `KL(p_t || p_s)`; d/dz_s = `p_s - p_t`.
- `jsd`: generalised JSD(beta) exactly as TRL's `GKDTrainer.generalized_jsd_loss`
  (trl 1.16): with `m = (1 - beta) p_s + beta p_t`,
  `JSD = beta KL(p_t || m) + (1 - beta) KL(p_s || m)`; d/dz_s = `p_s * (g - sum_v p_s g)`
  with `g = (1 - beta)(log p_s - log m)`. The general formula is 0 at beta in {0, 1}, so
  TRL (and we) define the endpoints as `beta = 0 -> forward KL`, `beta = 1 -> reverse KL`.

Numerics: the student's vocabulary projection runs in float32 for half-precision inputs
(`fp32_logits`, None = that default; the weight's float32 copy is made once per forward
and once per backward, O(V x H), so memory stays bounded by the chunk), or in the inputs'
dtype with `fp32_logits=False` (bf16 logits rounded before the softmax: per-token KL
errors of several % at logits ~26); the softmaxes and divergences run in float32 (float64
when the student is float64); the weight gradient accumulates in float32 when W is half
precision. The teacher's cached states enter its head in the cache's dtype
(`compute_rmsnorm_logits` normalises them in float32 before any rounding). No temperature (the paper uses
none). Departure from a plain autograd graph: the teacher head is called again in
backward, so backward must run while the teacher head is still resident (it is, when
each micro-batch's backward follows its forward, as in gradient accumulation).
`token_weights` get no gradient; the returned per-token values are unweighted.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.logprobs import add_chunk_input_grads, chunk_bounds, projection_weight, zero_input_grads
from engine.registry import Registry

Tensor = torch.Tensor
# (log_ps (n, V), log_pt (n, V), beta, with_grad) -> (D (n,), dD/dz_s (n, V) or None)
DivergenceFn = Callable[[Tensor, Tensor, float, bool], "tuple[Tensor, Tensor | None]"]
TeacherHeadLike = Callable[[Tensor], Tensor] | tuple

DIVERGENCES: Registry[DivergenceFn] = Registry("divergence")
register_divergence = DIVERGENCES.register
get_divergence = DIVERGENCES.get
DEFAULT_CHUNK_SIZE = 1024


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b, -1) for (n, V) tensors without an (n, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)  # (n,)


# The divergence functions treat log_ps / log_pt as scratch: they may overwrite them, so
# a chunk holds only ~3 (c, V) buffers at a time.
@register_divergence("reverse_kl")
def compute_reverse_kl(log_ps: Tensor, log_pt: Tensor, beta: float, with_grad: bool):
    diff = log_pt.neg_().add_(log_ps)  # log p_s - log p_t, (n, V), in log_pt's buffer
    p_s = log_ps.exp_()  # (n, V), in log_ps's buffer
    kl = _rowdot(p_s, diff)  # (n,)
    if not with_grad:
        return kl, None
    return kl, diff.sub_(kl.unsqueeze(-1)).mul_(p_s)  # p_s (log p_s - log p_t - KL)


@register_divergence("forward_kl")
def compute_forward_kl(log_ps: Tensor, log_pt: Tensor, beta: float, with_grad: bool):
    p_t = log_pt.exp()  # (n, V)
    kl = _rowdot(p_t, log_pt.sub_(log_ps))  # (n,)
    if not with_grad:
        return kl, None
    return kl, log_ps.exp_().sub_(p_t)  # p_s - p_t


@register_divergence("jsd")
def compute_generalized_jsd(log_ps: Tensor, log_pt: Tensor, beta: float, with_grad: bool):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return compute_forward_kl(log_ps, log_pt, beta, with_grad)
    if beta == 1.0:
        return compute_reverse_kl(log_ps, log_pt, beta, with_grad)
    b = torch.tensor(beta, dtype=log_ps.dtype, device=log_ps.device)
    log_m = torch.logaddexp(log_ps + torch.log1p(-b), log_pt + torch.log(b))  # (n, V)
    d_t = _rowdot(log_pt.exp(), log_pt.sub_(log_m))  # KL(p_t || m), (n,)
    g = log_pt.copy_(log_ps).sub_(log_m).mul_(1 - beta)  # dD/dp_s = (1-beta)(log p_s - log m)
    del log_m
    p_s = log_ps.exp_()  # (n, V)
    d = beta * d_t + _rowdot(p_s, g)  # (1-beta) KL(p_s || m) = sum p_s g
    if not with_grad:
        return d, None
    return d, g.sub_(_rowdot(p_s, g).unsqueeze(-1)).mul_(p_s)  # p_s (g - sum p_s g)


def compute_rmsnorm_logits(hidden: Tensor, norm_weight: Tensor, eps: float, proj_weight: Tensor) -> Tensor:
    """Teacher logits `proj(RMSNorm(hidden))` in the op order of HF Qwen2/Llama RMSNorm.

    The norm runs in float32 (float64 for float64 input), is cast back to the weights'
    dtype and scaled, then projected in that dtype: in float32 this reproduces the HF
    model's own logits bit for bit. Returns float32 (float64 for float64 weights).
    """
    dtype = proj_weight.dtype
    # the cached states as they are (an fp32 cache of a bf16 head is not rounded first); for
    # states already in the head's dtype this is HF's op order exactly
    xf = hidden.to(torch.promote_types(dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    logits = torch.nn.functional.linear(norm_weight * xf.to(dtype), proj_weight)  # (n, V), as nn.Linear
    return logits.to(torch.promote_types(dtype, torch.float32))


def _as_head_fn(teacher_head: TeacherHeadLike) -> Callable[[Tensor], Tensor]:
    if callable(teacher_head):
        return teacher_head
    if isinstance(teacher_head, tuple) and len(teacher_head) == 3:
        norm_weight, eps, proj_weight = teacher_head
        return lambda h: compute_rmsnorm_logits(h, norm_weight, float(eps), proj_weight)
    raise TypeError("teacher_head must be a callable hidden -> logits or a tuple "
                    f"(norm_weight, eps, proj_weight); got {type(teacher_head).__name__}")


def _chunk_log_probs(h_s, weight, h_t, head_fn, acc_dtype):
    """Student and teacher log-probabilities of one chunk, each (c, V); the student's matmul
    in `weight`'s dtype (`engine.logprobs.projection_weight` picks it)."""
    z_s = (h_s.to(weight.dtype) @ weight.T).to(acc_dtype)  # (c, V)
    with torch.no_grad():
        z_t = head_fn(h_t).to(acc_dtype)  # (c, V)
    if z_t.shape != z_s.shape:
        raise ValueError(f"teacher logits {tuple(z_t.shape)} do not match student logits "
                         f"{tuple(z_s.shape)}: student and teacher vocabularies differ")
    # the head's output may be a tensor the caller keeps: not overwritten
    return _log_softmax_(z_s), torch.log_softmax(z_t, dim=-1)


def _log_softmax_(z: Tensor) -> Tensor:
    """In-place log-softmax over the last dimension (z must be a fresh buffer)."""
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, weight, h_t, token_weights, head_fn, fn, beta, chunk_size, fp32_logits):
        acc = torch.promote_types(h_s.dtype, torch.float32)
        n = h_s.shape[0]
        per_token = torch.zeros(n, dtype=acc, device=h_s.device)  # (N,)
        w = projection_weight(h_s, weight, fp32_logits)  # (V, H)
        for s, e in chunk_bounds(n, chunk_size):
            log_ps, log_pt = _chunk_log_probs(h_s[s:e], w, h_t[s:e], head_fn, acc)
            per_token[s:e], _ = fn(log_ps, log_pt, beta, False)
        loss = (per_token * token_weights.to(acc)).sum()
        ctx.save_for_backward(h_s, weight, h_t, token_weights)
        ctx.head_fn, ctx.fn, ctx.beta, ctx.chunk_size, ctx.acc = head_fn, fn, beta, chunk_size, acc
        ctx.fp32_logits = fp32_logits
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        h_s, weight, h_t, token_weights = ctx.saved_tensors
        grad_h, grad_w = zero_input_grads(ctx, h_s, weight)  # (N, H), (V, H)
        scale = token_weights.to(ctx.acc) * grad_loss.to(ctx.acc)  # (N,)
        w = projection_weight(h_s, weight, ctx.fp32_logits)  # (V, H)
        for s, e in chunk_bounds(h_s.shape[0], ctx.chunk_size):
            log_ps, log_pt = _chunk_log_probs(h_s[s:e], w, h_t[s:e], ctx.head_fn, ctx.acc)
            _, g = ctx.fn(log_ps, log_pt, ctx.beta, True)
            g.mul_(scale[s:e].unsqueeze(-1))  # dL/dz_s, (c, V)
            del log_ps, log_pt
            add_chunk_input_grads(g, h_s, w, s, e, grad_h, grad_w)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def compute_chunked_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                               teacher_head: TeacherHeadLike, token_weights: Tensor, *,
                               kind: str = "reverse_kl", chunk_size: int = DEFAULT_CHUNK_SIZE,
                               beta: float = 0.5, fp32_logits: bool | None = None) -> tuple[Tensor, Tensor]:
    """Weighted sum over tokens of D(p_s || p_t), chunked over tokens in forward and backward.

    student_hidden (N, H) post-norm, differentiable; student_weight (V, H) differentiable;
    teacher_hidden (N, Ht) pre-norm, no gradient; teacher_head: callable (n, Ht) -> (n, V)
    logits, or a tuple (norm_weight (Ht,), eps, proj_weight (V, Ht)); token_weights (N,)
    (e.g. the sample's teacher weight, 0 to drop a token). `beta` is used by `jsd` only.
    `fp32_logits`: the student's projection in float32 (None: for half-precision inputs).
    Returns (loss_sum: scalar `sum_i w_i D_i`, per_token: (N,) unweighted D_i, detached).
    """
    fn = get_divergence(kind)
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden.dim() != 2 or student_weight.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError("student_hidden (N, H), student_weight (V, H), teacher_hidden (N, Ht) must be 2-D; got "
                         f"{tuple(student_hidden.shape)}, {tuple(student_weight.shape)}, {tuple(teacher_hidden.shape)}")
    n, h = student_hidden.shape
    if student_weight.shape[1] != h:
        raise ValueError(f"student_weight {tuple(student_weight.shape)} does not match hidden size {h}")
    if teacher_hidden.shape[0] != n or tuple(token_weights.shape) != (n,):
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and token_weights "
                         f"{tuple(token_weights.shape)} must have N={n} rows")
    dev = student_hidden.device  # cached states and weights may arrive on the host
    return _ChunkedDivergence.apply(student_hidden, student_weight, teacher_hidden.detach().to(dev),
                                    token_weights.detach().to(dev), _as_head_fn(teacher_head), fn,
                                    float(beta), int(chunk_size), fp32_logits)
