"""LR schedules (hand-worked values), the Muon/AdamW parameter split, and MuonAdamW
against the two torch optimisers stepped separately."""

import math

import pytest
import torch
from torch import nn

from engine.optim import MuonAdamW, build_optimizer, build_scheduler, compute_lr_factor, is_muon_param

torch.set_num_threads(1)


def test_lr_factor_hand_worked():
    f = lambda s, **kw: compute_lr_factor(s, **{"warmup_steps": 4, "total_steps": 12, "min_lr_ratio": 0.1, **kw})
    # warmup (s+1)/4
    assert [f(s, schedule="constant") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(11, schedule="constant") == 1.0
    # linear over steps 4..12: at s=8 progress 0.5 -> 0.1 + 0.9*0.5 = 0.55; at/after 12 -> 0.1
    assert f(8, schedule="linear") == pytest.approx(0.55)
    assert f(12, schedule="linear") == pytest.approx(0.1) and f(50, schedule="linear") == pytest.approx(0.1)
    # cosine at progress 0.5 -> 0.1 + 0.9*0.5*(1+cos(pi/2)) = 0.55; progress 0.25 -> 0.1+0.45*(1+cos(pi/4))
    assert f(8, schedule="cosine") == pytest.approx(0.55)
    assert f(6, schedule="cosine") == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(KeyError, match="known: \\['constant', 'linear', 'cosine'\\]"):
        f(0, schedule="step")


def test_scheduler_drives_optimizer_lr():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.2)
    sched = build_scheduler(opt, schedule="linear", warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # factors: .5, 1, then 1 - (s-2)/4 for s = 2..6: 1, .75, .5, .25, 0
    torch.testing.assert_close(torch.tensor(seen), 0.2 * torch.tensor([0.5, 1, 1, 0.75, 0.5, 0.25, 0.0]))


def _tiny_qwen():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=24)
    return Qwen2ForCausalLM(cfg)


def test_muon_split_on_a_qwen2():
    lm = _tiny_qwen()
    muon = {n for n, p in lm.named_parameters() if is_muon_param(n, p)}
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.layers.0.mlp.down_proj.weight" in muon
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight"):
        assert n not in muon, n


def _loss(lm, seed):
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(seed))
    return lm(input_ids=ids, labels=ids).loss


def test_muon_adamw_equals_separate_optimizers():
    a, b = _tiny_qwen(), _tiny_qwen()
    opt = build_optimizer(a, "muon", lr=0.01, weight_decay=0.1)
    assert isinstance(opt, MuonAdamW)
    named = list(b.named_parameters())
    ref_muon = torch.optim.Muon([p for n, p in named if is_muon_param(n, p)], lr=0.01, weight_decay=0.1,
                                adjust_lr_fn="match_rms_adamw")
    decay = [p for n, p in named if not is_muon_param(n, p) and p.ndim == 2]
    no_decay = [p for n, p in named if not is_muon_param(n, p) and p.ndim < 2]
    ref_adam = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        _loss(a, step).backward()
        opt.step()
        opt.zero_grad()
        _loss(b, step).backward()
        ref_muon.step()
        ref_adam.step()
        ref_muon.zero_grad()
        ref_adam.zero_grad()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0, msg=n)


def test_muon_adamw_state_dict_resumes_exactly():
    a, b = _tiny_qwen(), _tiny_qwen()
    oa = build_optimizer(a, "muon", lr=0.01, weight_decay=0.0)
    ob = build_optimizer(b, "muon", lr=0.01, weight_decay=0.0)
    for step in range(2):
        for lm, o in ((a, oa), (b, ob)):
            _loss(lm, step).backward()
            o.step()
            o.zero_grad()
    ob2 = build_optimizer(b, "muon", lr=0.01, weight_decay=0.0)
    ob2.load_state_dict(ob.state_dict())
    _loss(a, 9).backward()
    oa.step()
    _loss(b, 9).backward()
    ob2.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)


def test_unknown_optimizer_lists_known():
    with pytest.raises(KeyError, match="known: \\['adamw', 'muon'\\]"):
        build_optimizer(_tiny_qwen(), "sgd", lr=0.1, weight_decay=0.0)
