"""The vocabulary projection in float32 for bf16 models (`fp32_logits`, on by default for
half-precision inputs) in the chunked log-prob and KL kernels, against float64 references
on the same bf16 values: with large logits (~26, as trained LMs have) bf16 logits are
rounded by ~0.1 before the softmax; float32 logits are not."""

import pytest
import torch

from distill.kl import compute_chunked_divergence, compute_rmsnorm_logits
from engine.logprobs import compute_chunked_token_logprobs


def _inputs(n=64, h=64, v=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = (torch.randn(n, h, generator=g) * 1.0).to(torch.bfloat16)
    w = (torch.randn(v, h, generator=g) * 0.5).to(torch.bfloat16)  # logits of std ~4, max ~26
    return hid, w


def test_token_logprobs_fp32_projection_against_float64():
    hid, w = _inputs()
    ids = torch.randint(0, w.shape[0], (1, hid.shape[0]), generator=torch.Generator().manual_seed(1))
    ref = torch.log_softmax(hid[None, :-1].double() @ w.double().T, -1).gather(-1, ids[:, 1:, None])[..., 0]
    errs = {}
    for fp32 in (None, True, False):
        hh, ww = hid[None].clone().requires_grad_(), w.clone().requires_grad_()
        lp = compute_chunked_token_logprobs(hh, ww, ids, 16, fp32_logits=fp32)
        lp.sum().backward()
        assert ww.grad.dtype == torch.bfloat16 and hh.grad.dtype == torch.bfloat16
        errs[fp32] = float((lp[:, 1:].detach().double() - ref).abs().max())
    print(f"\nmax |log p error|: fp32 projection {errs[True]:.2e}, bf16 projection {errs[False]:.2e}")
    assert errs[None] == errs[True] < 1e-4  # the default for bf16 inputs is the fp32 projection
    assert errs[False] > 100 * errs[True]
    # the unchunked path agrees
    lp_plain = compute_chunked_token_logprobs(hid[None], w, ids, None)
    torch.testing.assert_close(lp_plain, compute_chunked_token_logprobs(hid[None], w, ids, 16), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_kl_fp32_projection_against_float64(kind):
    hid, w = _inputs(seed=2)
    g = torch.Generator().manual_seed(3)
    # a teacher near the student (KL ~0.01-0.1 a token, as late in distillation): its logits
    # are the student's exact ones plus noise, handed over as the "cached states" of an
    # identity head, so the student's side is what is under test
    z_t = (hid.double() @ w.double().T + 0.3 * torch.randn(hid.shape[0], w.shape[0], generator=g, dtype=torch.float64))
    tw = torch.ones(hid.shape[0])
    log_pt = torch.log_softmax(z_t, -1)
    log_ps = torch.log_softmax(hid.double() @ w.double().T, -1)
    h_t, head = z_t.float(), (lambda x: x)
    if kind == "reverse_kl":
        ref = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        ref = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    rel = {}
    for fp32 in (True, False):
        hh, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
        loss, per = compute_chunked_divergence(hh, ww, h_t, head, tw, kind=kind, chunk_size=16,
                                               fp32_logits=fp32)
        loss.backward()
        rel[fp32] = float(((per.double() - ref).abs() / ref).median())
    print(f"\n{kind}: median relative per-token error: fp32 projection {rel[True]:.2e}, bf16 {rel[False]:.2e}")
    assert rel[True] < 1e-3 and rel[False] > 10 * rel[True]


def test_fp32_cache_enters_a_bf16_head_unrounded():
    """The teacher's cached fp32 states are normalised in float32 before any rounding (HF's
    op order would round them on the way in only if the model were bf16 throughout)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(8, 32, generator=g) * 3
    norm = (1 + 0.1 * torch.randn(32, generator=g)).to(torch.bfloat16)
    proj = (torch.randn(64, 32, generator=g) * 0.5).to(torch.bfloat16)
    got = compute_rmsnorm_logits(h, norm, 1e-6, proj)
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # fp32, no rounding of h first
    want = torch.nn.functional.linear(norm * x.to(torch.bfloat16), proj).float()
    assert torch.equal(got, want)
    rounded = compute_rmsnorm_logits(h.to(torch.bfloat16), norm, 1e-6, proj)
    assert not torch.equal(got, rounded)
