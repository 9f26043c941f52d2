"""The CUDA paths, on one GPU: the chunked full-vocabulary KL at a 128k vocabulary in bf16
against a float64 reference, the torch trainer in bf16 on CUDA against fp32 on the CPU,
DeepSpeed ZeRO-2 bf16 on CUDA against the torch backend, the torch trainer's bf16 updates at
lr 1e-6 against fp32's (fp32 master weights), and the HF generator on CUDA.

Skipped without CUDA (conftest); the DeepSpeed test also without `deepspeed`. Run with
`scripts/gpu_check.sh` (DS_ACCELERATOR=cuda). Sizes keep the whole file under a minute.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from stand_ins import tiny_spec
from stand_ins import trainer_settings as TrainerSettings  # pydantic-free where pydantic is absent
from distill.kl import compute_chunked_divergence
from engine.batching import Sample, build_step_batches
from engine.model import materialize_tiny
from engine.trainer import build_trainer
from engine.logprobs import compute_chunked_token_logprobs

pytestmark = pytest.mark.gpu
SPEC = tiny_spec(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256)
SETTINGS = dict(lr=1e-3, schedule="constant", grad_clip=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return materialize_tiny(SPEC, tmp_path_factory.mktemp("m") / "tiny", seed=0)


def sft_loss(hidden, weight, batch):
    lp = compute_chunked_token_logprobs(hidden, weight, batch["input_ids"], None)  # (B, T)
    return -(lp * batch["loss_mask"]).sum() / batch["global_tokens"], {}


def step_batches(step):
    g = torch.Generator().manual_seed(step)
    lens = torch.randint(8, 40, (8,), generator=g).tolist()
    s = [Sample(torch.randint(6, 90, (k,), generator=g).tolist(), [0, 0] + [1] * (k - 2)) for k in lens]
    return build_step_batches(s, micro_batch_size=4, pad_id=0)


def losses(trainer, steps=4):
    return [trainer.train_step(step_batches(i), sft_loss)["loss"] for i in range(steps)]


def test_chunked_kl_128k_vocab_bf16_matches_float64():
    torch.manual_seed(0)
    n, h, v = 4096, 256, 131072  # full fp32 logits would be 2 GiB; W's fp32 gradient is 128 MiB
    dev = "cuda"
    h_s = (torch.randn(n, h, device=dev) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device=dev) * 0.05).to(torch.bfloat16).requires_grad_()
    h_t = (torch.randn(n, h, device=dev) * 2).to(torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(h, device=dev)).to(torch.bfloat16)
    proj = (torch.randn(v, h, device=dev) * 0.05).to(torch.bfloat16)
    tw = torch.rand(n, device=dev) + 0.5
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, per_tok = compute_chunked_divergence(h_s, w, h_t, (norm_w, 1e-6, proj), tw, chunk_size=64)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    # float64 reference on the same bf16 inputs, full logits, autograd
    hs64, w64 = h_s.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ht64 = h_t.double()
    normed = ht64 * torch.rsqrt(ht64.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w.double()
    log_pt = F.log_softmax(normed @ proj.double().T, -1)
    log_ps = F.log_softmax(hs64 @ w64.T, -1)
    ref_tok = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    ref = (ref_tok * tw.double()).sum()
    ref.backward()
    print(f"\nKL 128k bf16: loss {float(loss.detach()):.6f} vs fp64 {float(ref):.6f}; peak extra memory {peak / 2**20:.0f} MiB "
          f"(full fp32 logits alone: {n * v * 4 / 2**20:.0f} MiB)")
    torch.testing.assert_close(per_tok.double(), ref_tok.detach(), rtol=2e-2, atol=2e-3)
    assert float(loss) == pytest.approx(float(ref), rel=1e-2)
    cos = F.cosine_similarity(h_s.grad.double().flatten(), hs64.grad.flatten(), dim=0)
    cos_w = F.cosine_similarity(w.grad.double().flatten(), w64.grad.flatten(), dim=0)
    assert cos > 0.999 and cos_w > 0.999, (float(cos), float(cos_w))
    # never one (tokens x vocab) tensor: what remains is W's gradient (fp32 accumulator + bf16
    # result) and a few (chunk x vocab) fp32 temporaries
    assert peak < n * v * 4 / 4, f"peak {peak / 2**20:.0f} MiB"



def test_torch_trainer_bf16_cuda_tracks_fp32_cpu(model_dir):
    cpu = losses(build_trainer(TrainerSettings(**SETTINGS), model_dir))
    gpu_tr = build_trainer(TrainerSettings(device="cuda", dtype="bf16", **SETTINGS), model_dir)
    gpu = losses(gpu_tr)
    print(f"\ntorch trainer losses cpu fp32 {cpu}\n                    cuda bf16 {gpu}")
    assert next(gpu_tr.lm.parameters()).is_cuda
    for a, b in zip(gpu, cpu):
        assert a == pytest.approx(b, rel=3e-2)
    assert gpu[-1] < gpu[0]


def weight_deltas(trainer, steps=3):
    before = {k: v.double() for k, v in trainer.state_dict().items()}
    for i in range(steps):
        trainer.train_step(step_batches(i), sft_loss)
    return torch.cat([(v.double() - before[k]).flatten() for k, v in trainer.state_dict().items()])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torch_trainer_bf16_cuda_updates_match_fp32_at_lr_1e6(model_dir, optimizer):
    """bf16 compute with fp32 master weights on CUDA: three steps at lr 1e-6 move the
    trained weights (`state_dict()`, the masters) as fp32 CUDA training does, up to bf16's
    compute error (tests/integration/test_trainer_torch.py does the same on the CPU).
    Stepping bf16 weights rounds ~98% of these updates away."""
    kw = dict(SETTINGS, lr=1e-6, optimizer=optimizer)
    ref = weight_deltas(build_trainer(TrainerSettings(device="cuda", dtype="fp32", **kw), model_dir))
    got = weight_deltas(build_trainer(TrainerSettings(device="cuda", dtype="bf16", **kw), model_dir))
    rel = float((got - ref).norm() / ref.norm())
    cos = float(got @ ref / (got.norm() * ref.norm()))
    moved, moved_ref = float((got != 0).double().mean()), float((ref != 0).double().mean())
    print(f"\n{optimizer} bf16 vs fp32 on CUDA at lr 1e-6: update rel err {rel:.3f}, cosine {cos:.4f}, "
          f"moved {moved:.3f} (fp32 {moved_ref:.3f})")
    assert moved > 0.99 * moved_ref
    assert rel < 0.2 and cos > 0.98


def test_deepspeed_zero2_bf16_cuda(model_dir):
    pytest.importorskip("deepspeed")
    pytest.importorskip("pydantic")
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        pytest.skip("DS_ACCELERATOR must be cuda (scripts/gpu_check.sh sets it)")
    ref = losses(build_trainer(TrainerSettings(device="cuda", dtype="fp32", **SETTINGS), model_dir))
    ds = build_trainer(TrainerSettings(backend="deepspeed", zero_stage=2, device="cuda", dtype="bf16", **SETTINGS),
                       model_dir)
    got = losses(ds)
    print(f"\nZeRO-2 bf16 losses {got}\ntorch fp32 cuda    {ref}")
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=3e-2)
    state = ds.state_dict()
    assert all(torch.isfinite(t.float()).all() for t in state.values())


def test_hf_generator_cuda_greedy_matches_cpu(model_dir):
    from engine.generation import HFGenerator, SamplingParams
    from engine.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    prompts = [tok.encode(t) for t in ("What is 12+30?", "hello there", "f(x)=x*x")]
    sp = SamplingParams(max_new_tokens=16, temperature=0.0, n=1, seed=0)
    cpu = HFGenerator(model_dir, tok, device="cpu").generate(prompts, sp)
    gpu = HFGenerator(model_dir, tok, device="cuda").generate(prompts, sp)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
