"""Chunked per-token log-probs and entropy vs a naive full-logits float64 reference."""

import math

import pytest
import torch

from engine.logprobs import compute_chunked_token_logprobs

torch.set_num_threads(1)
D = torch.float64


def make(B=3, T=7, H=8, V=50, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=D).to(dtype)
    weight = (0.5 * torch.randn(V, H, generator=g, dtype=D)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, ids


def naive(hidden, weight, ids, temperature=1.0):
    """Loop reference: logprobs[b, t] = log_softmax(h[b, t-1] W^T / temp)[ids[b, t]], 0 at t=0."""
    B, T, _ = hidden.shape
    lp, ent = torch.zeros(B, T, dtype=D), torch.zeros(B, T, dtype=D)
    rows_lp, rows_ent = [], []
    for b in range(B):
        row_lp, row_ent = [torch.zeros((), dtype=D)], [torch.zeros((), dtype=D)]
        for t in range(1, T):
            logp = torch.log_softmax(hidden[b, t - 1].double() @ weight.double().T / temperature, -1)  # (V,)
            row_lp.append(logp[ids[b, t]])
            row_ent.append(-(logp.exp() * logp).sum())
        rows_lp.append(torch.stack(row_lp))
        rows_ent.append(torch.stack(row_ent))
    return torch.stack(rows_lp), torch.stack(rows_ent)


def test_hand_worked_uniform():
    # weight all zeros -> uniform over V=4: every logprob is log(1/4) = -1.386294, entropy log 4
    hidden, _, ids = make(B=1, T=3, H=2, V=4)
    lp, ent = compute_chunked_token_logprobs(hidden, torch.zeros(4, 2, dtype=D), ids, 2, return_entropy=True)
    assert torch.allclose(lp, torch.tensor([[0.0, -math.log(4), -math.log(4)]], dtype=D))
    assert torch.allclose(ent, torch.tensor([[0.0, math.log(4), math.log(4)]], dtype=D))


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 18, 100, None])  # N = 3 * 6 = 18 predicted tokens
def test_values_and_gradients_match_naive(chunk_size):
    hidden, weight, ids = make()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = compute_chunked_token_logprobs(h1, w1, ids, chunk_size, temperature=0.7, return_entropy=True)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_ref, ent_ref = naive(h2, w2, ids, temperature=0.7)
    assert torch.allclose(lp, lp_ref, atol=1e-12) and torch.allclose(ent, ent_ref, atol=1e-12)
    up = torch.randn(lp.shape, dtype=D, generator=torch.Generator().manual_seed(1))  # upstream gradients
    up_e = torch.randn(lp.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    ((lp * up).sum() + (ent * up_e).sum()).backward()
    ((lp_ref * up).sum() + (ent_ref * up_e).sum()).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-12) and torch.allclose(w1.grad, w2.grad, atol=1e-12)
    assert (h1.grad[:, -1] == 0).all()  # the last position predicts nothing


def test_float32_and_no_grad():
    hidden, weight, ids = make(dtype=torch.float32)
    with torch.no_grad():
        lp = compute_chunked_token_logprobs(hidden, weight, ids, 4)
    assert lp.dtype == torch.float32 and not lp.requires_grad
    assert torch.allclose(lp.double(), naive(hidden, weight, ids)[0], atol=1e-5)


def test_bfloat16_weight_only_gradient():
    # bf16 matmul, float32 log-softmax; gradient for the weight alone (hidden frozen)
    hidden, weight, ids = make(dtype=torch.bfloat16)
    w = weight.clone().requires_grad_()
    lp = compute_chunked_token_logprobs(hidden, w, ids, 4)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    w_ref = weight.double().requires_grad_()
    lp_ref, _ = naive(hidden.double(), w_ref, ids)
    lp_ref.sum().backward()
    assert torch.allclose(lp.double(), lp_ref, atol=0.1)
    assert w.grad.dtype == torch.bfloat16 and torch.allclose(w.grad.double(), w_ref.grad, atol=0.1, rtol=0.05)


def test_chunked_backward_never_saves_full_logits():
    # Tensors saved for backward outside the checkpointed chunks: none may be (tokens x vocab).
    hidden, weight, ids = make(B=2, T=33, H=4, V=500)  # weight (500, 4) < a chunk's logits (8, 500)
    hidden.requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute_chunked_token_logprobs(hidden, weight, ids, 8).sum()
        chunked_max = max(sizes, default=0)
        sizes.clear()
        compute_chunked_token_logprobs(hidden, weight, ids, None).sum()
        plain_max = max(sizes)
    assert plain_max >= 64 * 500  # the unchunked pass keeps (N, V) log-softmax outputs
    assert chunked_max <= 500 * 4  # the chunked one keeps only inputs: the weight, chunks of hidden


def test_bad_input():
    hidden, weight, ids = make(V=10)
    with pytest.raises(ValueError, match=r"input_ids\[\d+, \d+\] = 12 is outside the vocabulary of size 10"):
        compute_chunked_token_logprobs(hidden, weight, ids.clone().fill_(12))
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_chunked_token_logprobs(hidden, weight[:, :-1], ids)
    with pytest.raises(ValueError, match="chunk_size"):
        compute_chunked_token_logprobs(hidden, weight, ids, 0)
    with pytest.raises(ValueError, match="integers"):
        compute_chunked_token_logprobs(hidden, weight, ids.double())


# ------------------------------------------------------------------ the sampler's truncation (top-k / top-p)
def naive_truncated(hidden, weight, ids, temperature, top_k, top_p):
    """Loop reference of the truncated sampling distribution: sort by probability; top-k
    keeps the k best; top-p then keeps the best tokens, in order, while the mass before
    each (renormalised over the top-k survivors) is < top_p; the target is always kept.
    logprob = z_y - logsumexp(z over kept), entropy of the renormalised kept set."""
    B, T, _ = hidden.shape
    rows_lp, rows_ent, n_dropped = [], [], 0
    for b in range(B):
        row_lp, row_ent = [torch.zeros((), dtype=D)], [torch.zeros((), dtype=D)]
        for t in range(1, T):
            z = hidden[b, t - 1].double() @ weight.double().T / temperature  # (V,)
            order = torch.argsort(z.detach(), descending=True).tolist()
            cand = order[:top_k] if top_k else order
            p = torch.softmax(z.detach()[cand], -1).tolist()
            kept, before = [], 0.0
            for tok, q in zip(cand, p):
                if before >= top_p:
                    break
                kept.append(tok)
                before += q
            y = int(ids[b, t])
            if y not in kept:
                kept.append(y)
            n_dropped += z.shape[0] - len(kept)
            logp = z[kept] - torch.logsumexp(z[kept], -1)  # (K,)
            row_lp.append(logp[kept.index(y)])
            row_ent.append(-(logp.exp() * logp).sum())
        rows_lp.append(torch.stack(row_lp))
        rows_ent.append(torch.stack(row_ent))
    return torch.stack(rows_lp), torch.stack(rows_ent), n_dropped


@pytest.mark.parametrize("chunk_size", [4, None])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (7, 1.0), (12, 0.6), (0, 0.3)])
def test_truncated_values_and_gradients_match_naive(chunk_size, top_k, top_p):
    hidden, weight, ids = make(V=30, seed=3)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = compute_chunked_token_logprobs(h1, w1, ids, chunk_size, temperature=0.7, top_k=top_k, top_p=top_p,
                                     return_entropy=True)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_ref, ent_ref, dropped = naive_truncated(h2, w2, ids, 0.7, top_k, top_p)
    assert dropped > 0  # the test can fail: tokens really were filtered out
    assert torch.isfinite(lp).all()  # a target outside the kept set is kept, never -inf
    assert torch.allclose(lp, lp_ref, atol=1e-12) and torch.allclose(ent, ent_ref, atol=1e-12)
    plain = compute_chunked_token_logprobs(hidden, weight, ids, chunk_size, temperature=0.7)
    assert (lp - plain)[:, 1:].abs().max() > 1e-3  # truncation changes the values
    up = torch.randn(lp.shape, dtype=D, generator=torch.Generator().manual_seed(1))
    up_e = torch.randn(lp.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    ((lp * up).sum() + (ent * up_e).sum()).backward()
    ((lp_ref * up).sum() + (ent_ref * up_e).sum()).backward()
    assert torch.isfinite(h1.grad).all() and torch.isfinite(w1.grad).all()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-12) and torch.allclose(w1.grad, w2.grad, atol=1e-12)


def test_truncation_is_the_generator_s_definition():
    """The generator's sampling log-probs and the trainer's agree wherever the target was
    sampleable (kept), the one definition `compute_sampling_keep_mask` being shared."""
    from engine.generation import compute_sampling_logprobs

    hidden, weight, ids = make(B=2, T=9, V=40, seed=5)
    weight = 4 * weight  # peaked distributions: top-p drops real mass
    best = (hidden[:, :-1] @ weight.T).argmax(-1)  # (B, T-1)
    ids[:, 1::2] = best[:, ::2]  # half the targets are the most likely token (always kept)
    for top_k, top_p in ((0, 0.85), (10, 0.7), (5, 1.0)):
        lp = compute_chunked_token_logprobs(hidden, weight, ids, 3, temperature=0.8, top_k=top_k, top_p=top_p)
        logits = hidden[:, :-1] @ weight.T  # (B, T-1, V)
        gen = compute_sampling_logprobs(logits.reshape(-1, 40), 0.8, top_k, top_p).view(2, 8, 40).double()
        at_target = gen.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        kept = torch.isfinite(at_target)
        assert kept.any() and (~kept).any()
        assert torch.allclose(lp[:, 1:][kept], at_target[kept], atol=1e-5)  # generator works in float32
