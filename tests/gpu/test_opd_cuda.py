"""OPD on CUDA, one GPU: the teacher heads are built on the trainer's device, one resident
at a time (measured), and the loss and gradients match a float64 CPU reference; a whole
bf16 OPD optimiser step of the torch trainer runs on the GPU. Run with
`bash scripts/gpu_check.sh`; needs only torch, transformers and safetensors."""

import pytest
import torch

from stand_ins import trainer_settings

pytestmark = pytest.mark.gpu
HIDDEN, VOCAB = 128, 512


def _settings(**kw):
    return trainer_settings(device="cuda", deterministic=False, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 (hidden 128, vocabulary 512) saved as safetensors."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = tmp_path_factory.mktemp("gpu") / "tiny"
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=256, max_position_embeddings=128,
                      tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    return out


def _batch(B=4, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[:, T // 3:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
            "position_ids": torch.arange(T).expand(B, T).clone(), "loss_mask": mask}


def _heads(tmp_path, n, seed=0):
    """`n` teacher head files (norm + projection), as `distill.heads.extract_head` writes them."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from distill.heads import extract_head

    paths = []
    for i in range(n):
        d = tmp_path / f"teacher{i}"
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
        torch.manual_seed(seed + 10 + i)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            m.model.norm.weight.uniform_(0.5, 1.5)
        m.save_pretrained(d)
        paths.append(str(extract_head(d, tmp_path / f"head{i}.safetensors")))
    return paths


def _reference_opd(hidden, weight, batches, head_paths, teacher_weights):
    """float64 CPU reference of the summed OPD loss (reverse KL) and its gradients."""
    from safetensors.torch import load_file

    h = hidden.detach().double().cpu().requires_grad_(True)
    w = weight.detach().double().cpu().requires_grad_(True)
    total = 0.0
    for b in batches:
        t = int(b["teacher_index"])
        head = load_file(head_paths[t])
        mask = b["loss_mask"][:, 1:].cpu() > 0
        hs = h[:, :-1][mask]  # (N, H)
        ht = b["teacher_hidden"].double().cpu()  # (N, H)
        eps = 1e-6
        zt = (head["norm.weight"].double() * ht * torch.rsqrt(ht.pow(2).mean(-1, keepdim=True) + eps)) \
            @ head["proj.weight"].double().T  # (N, V)
        lps, lpt = torch.log_softmax(hs @ w.T, -1), torch.log_softmax(zt, -1)
        kl = (lps.exp() * (lps - lpt)).sum(-1)  # (N,)
        total = total + teacher_weights[t] * kl.sum() / float(b["global_tokens"])
    total.backward()
    return float(total), h.grad, w.grad


def test_opd_step_with_heads_on_cuda(tmp_path):
    """`OPDLoss` on CUDA tensors: the heads are loaded on the GPU, one resident at a time
    (measured), and the loss and gradients of two micro-batches (teachers 0, 1) match a
    float64 CPU reference: loss within 1e-5 relative, gradients within 1e-5 absolute
    (fp32 GEMMs with TF32 off)."""
    from distill.opd_loss import OPDLoss

    torch.backends.cuda.matmul.allow_tf32 = False
    paths = _heads(tmp_path, 2)
    g = torch.Generator().manual_seed(3)
    B, T = 2, 16
    hidden = torch.randn(B, T, HIDDEN, generator=g).cuda().requires_grad_(True)  # (B, T, H)
    weight = (0.05 * torch.randn(VOCAB, HIDDEN, generator=g)).cuda().requires_grad_(True)  # (V, H)
    batches = []
    for t in (0, 1):
        b = _batch(B, T, seed=t)
        n = int(b["loss_mask"][:, 1:].sum())
        b.update(teacher_hidden=torch.randn(n, HIDDEN, generator=g), teacher_index=torch.tensor(t),
                 opt_step=torch.tensor(0), global_tokens=torch.tensor(2.0 * n))
        batches.append({k: v.cuda() for k, v in b.items()})
    loss_fn = OPDLoss(paths, [1.0, 0.5], "reverse_kl", chunk_size=7, jsd_beta=0.5)
    total = 0.0
    for b in batches:
        loss, metrics = loss_fn(hidden, weight, b)
        assert loss.is_cuda
        loss.backward()  # before the next teacher is activated, as in gradient accumulation
        total += float(loss.detach())
        assert loss_fn.heads._resident.proj_weight.is_cuda
    assert loss_fn.heads.device.type == "cuda"
    stats = loss_fn.finish()
    assert stats["head_loads_per_step"] == [2] and stats["max_resident_heads"] == 1
    ref, gh, gw = _reference_opd(hidden, weight, batches, paths, [1.0, 0.5])
    assert total == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(hidden.grad.double().cpu(), gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double().cpu(), gw, atol=1e-5, rtol=1e-4)


def test_opd_train_step_bf16_on_cuda(model_dir, tmp_path):
    """A whole OPD optimiser step of the bf16 CUDA trainer (two teachers' micro-batches):
    finite loss, two head loads, one head resident at a time."""
    from distill.opd_loss import OPDLoss
    from engine.trainer_torch import TorchTrainer

    paths = _heads(tmp_path, 2)
    trainer = TorchTrainer(_settings(dtype="bf16"), str(model_dir))
    loss_fn = OPDLoss(paths, [1.0, 1.0], "reverse_kl", chunk_size=16, jsd_beta=0.5)
    mbs = []
    for t in (0, 1):
        b = _batch(2, 16, seed=t)
        n = int(b["loss_mask"][:, 1:].sum())
        b.update(teacher_hidden=torch.randn(n, HIDDEN), teacher_index=torch.tensor(t), opt_step=torch.tensor(0),
                 global_tokens=torch.tensor(2.0 * n))
        mbs.append(b)
    m = trainer.train_step(mbs, loss_fn)
    assert torch.isfinite(torch.tensor([m["loss"], m["grad_norm"]])).all() and m["loss"] > 0
    assert loss_fn.finish() == {"head_loads_per_step": [2], "max_resident_heads": 1}
