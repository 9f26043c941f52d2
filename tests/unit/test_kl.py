"""Chunked full-vocabulary divergences vs a naive full-logits float64 reference."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from distill.kl import (DIVERGENCES, compute_chunked_divergence, compute_rmsnorm_logits,
                        get_divergence, register_divergence)

torch.set_num_threads(1)

KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def naive_divergence(z_s, z_t, kind, beta):
    """Straightforward per-token divergence on full logits (N, V) -> (N,), via autograd."""
    log_ps, log_pt = F.log_softmax(z_s, -1), F.log_softmax(z_t, -1)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (p_s * (log_ps - log_pt)).sum(-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (p_t * (log_pt - log_ps)).sum(-1)
    m = (1 - beta) * p_s + beta * p_t
    return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)


def make_inputs(n=37, h=16, ht=24, v=53, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    h_t = torch.randn(n, ht, generator=g, dtype=torch.float64) * 3
    norm_w = 1 + 0.1 * torch.randn(ht, generator=g, dtype=torch.float64)
    proj = torch.randn(v, ht, generator=g, dtype=torch.float64) * 0.7
    tw = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    tw[::5] = 0.0  # dropped tokens
    return [x.to(dtype) for x in (h_s, w, h_t, norm_w, proj, tw)]


def naive_loss(h_s, w, h_t, norm_w, eps, proj, tw, kind, beta):
    z_s = h_s @ w.T  # (N, V)
    x = h_t * torch.rsqrt(h_t.pow(2).mean(-1, keepdim=True) + eps)
    z_t = (norm_w * x) @ proj.T  # (N, V)
    d = naive_divergence(z_s, z_t, kind, beta)
    return (d * tw).sum(), d


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_matches_naive_float64(kind, beta, chunk):
    h_s, w, h_t, norm_w, proj, tw = make_inputs()
    eps = 1e-6
    a_h, a_w = h_s.clone().requires_grad_(), w.clone().requires_grad_()
    loss, per_tok = compute_chunked_divergence(a_h, a_w, h_t, (norm_w, eps, proj), tw,
                                               kind=kind, chunk_size=chunk, beta=beta)
    loss.backward()
    b_h, b_w = h_s.clone().requires_grad_(), w.clone().requires_grad_()
    ref_loss, ref_d = naive_loss(b_h, b_w, h_t, norm_w, eps, proj, tw, kind, beta)
    ref_loss.backward()
    assert not per_tok.requires_grad
    torch.testing.assert_close(per_tok, ref_d.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a_h.grad, b_h.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a_w.grad, b_w.grad, rtol=1e-9, atol=1e-12)
    assert (per_tok >= -1e-12).all()  # divergences are non-negative


def test_upstream_gradient_scales_and_teacher_gets_none():
    h_s, w, h_t, norm_w, proj, tw = make_inputs(n=9, v=11)
    a_h = h_s.clone().requires_grad_()
    h_t = h_t.clone().requires_grad_()
    loss, _ = compute_chunked_divergence(a_h, w, h_t, (norm_w, 1e-6, proj), tw, chunk_size=4)
    (3.0 * loss).backward()
    b_h = h_s.clone().requires_grad_()
    ref, _ = naive_loss(b_h, w, h_t.detach(), norm_w, 1e-6, proj, tw, "reverse_kl", 0.5)
    (3.0 * ref).backward()
    torch.testing.assert_close(a_h.grad, b_h.grad, rtol=1e-9, atol=1e-12)
    assert h_t.grad is None


@pytest.mark.parametrize("kind,beta", KINDS[:3])
def test_gradcheck_finite_differences(kind, beta):
    h_s, w, h_t, norm_w, proj, tw = make_inputs(n=5, h=3, ht=4, v=7)
    head = lambda x: compute_rmsnorm_logits(x, norm_w, 1e-6, proj)  # noqa: E731
    fn = lambda a, b: compute_chunked_divergence(a, b, h_t, head, tw, kind=kind, chunk_size=2,  # noqa: E731
                                                 beta=beta)[0]
    assert torch.autograd.gradcheck(fn, (h_s.requires_grad_(), w.requires_grad_()))


def test_hand_worked_two_token_vocabulary():
    # Student logits [0, 0] -> p_s = [.5, .5]; teacher p_t = [.8, .2].
    # reverse KL = .5 ln(.5/.8) + .5 ln(.5/.2) = .5(-0.470004) + .5(0.916291) = 0.223144
    # forward KL = .8 ln(.8/.5) + .2 ln(.2/.5) = 0.376003 - 0.183258 = 0.192745
    # JSD(.5): m = [.65, .35]; KL(p_t||m) = .8 ln(.8/.65) + .2 ln(.2/.35) = 0.054188,
    #          KL(p_s||m) = .5 ln(.5/.65) + .5 ln(.5/.35) = 0.047155; JSD = 0.050672
    # reverse-KL grad wrt z_s = p_s (log p_s - log p_t - KL) = [-0.346574, +0.346574],
    # and with h_s = [1], dW = that gradient times h_s.
    h_s = torch.ones(1, 1, dtype=torch.float64)
    w = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    z_t = torch.tensor([[math.log(0.8), math.log(0.2)]], dtype=torch.float64)
    head = lambda x: z_t  # noqa: E731
    one = torch.ones(1, dtype=torch.float64)
    loss, _ = compute_chunked_divergence(h_s, w, z_t, head, one, kind="reverse_kl")
    loss.backward()
    assert loss.item() == pytest.approx(0.223144, abs=1e-6)
    assert w.grad[:, 0].tolist() == pytest.approx([-0.346574, 0.346574], abs=1e-6)
    fwd, _ = compute_chunked_divergence(h_s, w, z_t, head, one, kind="forward_kl")
    assert fwd.item() == pytest.approx(0.192745, abs=1e-6)
    jsd, _ = compute_chunked_divergence(h_s, w, z_t, head, one, kind="jsd", beta=0.5)
    assert jsd.item() == pytest.approx(0.050672, abs=1e-6)


def test_jsd_matches_trl_generalized_jsd_loss():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    h_s, w, h_t, norm_w, proj, tw = make_inputs(n=6, v=13)
    z_s = h_s @ w.T
    z_t = compute_rmsnorm_logits(h_t, norm_w, 1e-6, proj)
    for beta in (0.0, 0.25, 0.9, 1.0):
        _, ours = compute_chunked_divergence(h_s, w, h_t, (norm_w, 1e-6, proj), tw, kind="jsd", beta=beta,
                                             chunk_size=4)
        trl = gkd.GKDTrainer.generalized_jsd_loss(z_s[None], z_t[None], beta=beta, reduction="none")
        torch.testing.assert_close(ours, trl[0].sum(-1), rtol=1e-10, atol=1e-12)


def test_bf16_inputs_to_tolerance():
    h_s, w, h_t, norm_w, proj, tw = make_inputs(n=40, h=32, ht=32, v=301, dtype=torch.float64)
    bf = [x.to(torch.bfloat16) for x in (h_s, w, h_t, norm_w, proj)]
    a_h, a_w = bf[0].clone().requires_grad_(), bf[1].clone().requires_grad_()
    loss, per_tok = compute_chunked_divergence(a_h, a_w, bf[2], (bf[3], 1e-6, bf[4]), tw.float(),
                                               chunk_size=16)
    loss.backward()
    assert a_h.grad.dtype == torch.bfloat16 and a_w.grad.dtype == torch.bfloat16
    # reference: float64 on the same (bf16-rounded) values
    r = [x.double() for x in bf]
    b_h, b_w = r[0].clone().requires_grad_(), r[1].clone().requires_grad_()
    ref, ref_d = naive_loss(b_h, b_w, r[2], r[3], 1e-6, r[4], tw, "reverse_kl", 0.5)
    ref.backward()
    assert per_tok.dtype == torch.float32
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-2
    torch.testing.assert_close(per_tok.double(), ref_d.detach(), rtol=5e-2, atol=5e-2)
    for got, want in ((a_h.grad, b_h.grad), (a_w.grad, b_w.grad)):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 5e-2, rel


def test_empty_and_bad_inputs():
    h_s, w, h_t, norm_w, proj, tw = make_inputs(n=4, v=9)
    head = (norm_w, 1e-6, proj)
    loss, per_tok = compute_chunked_divergence(h_s[:0], w, h_t[:0], head, tw[:0])
    assert loss.item() == 0.0 and per_tok.shape == (0,)
    with pytest.raises(KeyError, match="known: .*reverse_kl"):
        compute_chunked_divergence(h_s, w, h_t, head, tw, kind="nope")
    with pytest.raises(ValueError, match="vocabularies differ"):
        compute_chunked_divergence(h_s, w[:-1], h_t, head, tw)
    with pytest.raises(ValueError, match="N=4"):
        compute_chunked_divergence(h_s, w, h_t[:3], head, tw)
    with pytest.raises(ValueError, match="beta"):
        compute_chunked_divergence(h_s, w, h_t, head, tw, kind="jsd", beta=1.5)
    with pytest.raises(TypeError, match="teacher_head"):
        compute_chunked_divergence(h_s, w, h_t, (norm_w, proj), tw)


def test_registry_rejects_duplicates():
    assert {"reverse_kl", "forward_kl", "jsd"} <= set(DIVERGENCES)
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("reverse_kl")(lambda *a: None)
    assert get_divergence("forward_kl") is DIVERGENCES.get("forward_kl")
    assert get_divergence("forward_kl") is not get_divergence("reverse_kl")


def test_import_is_torch_only():
    code = ("import sys, distill.kl; bad = [m for m in ('ray', 'deepspeed', 'vllm', 'transformers') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
