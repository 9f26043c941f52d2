"""`trainer.lora` (peft LoRA) on the DeepSpeed backend, over the toy Qwen3-shaped model:
ZeRO 0, 2 and 3 take the torch backend's steps (an SFT loss, then GRPO's clipped loss
with a KL to a reference), train and hold in the optimiser the adapter only, save the
merged weights and `adapter/`, leave the frozen base out of DeepSpeed's checkpoint and
resume exactly; 2 gloo ranks end where 1 rank does.

Tolerances: ZeRO 0 and 2 (one rank) compute the same fp32 sums in the same order as the
torch backend here and are compared to 1e-7; ZeRO-3 keeps the adapter in flat fp32
partitions and reduces through reduce-scatter, so its grad norm and steps differ in the
last bits (measured: 1.7e-8 on weights of ~0.1 after 3 steps); 1e-6 absolute is about
ten fp32 ulps of the weights and far below one step (lr 5e-3). Two ranks sum each
gradient in a different order than one rank: 1e-6 absolute, 1e-5 relative, as the torch
backend's 2-rank LoRA test."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("deepspeed")

torch.set_num_threads(1)
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
TARGETS = ("q_proj.weight", "v_proj.weight", "down_proj.weight")
KW = dict(lr=5e-3, schedule="cosine", warmup_steps=1, total_steps=8, grad_clip=0.5, lora=LORA)


def _sft_batches(seed):
    from engine.batching import Sample, build_step_batches

    g = torch.Generator().manual_seed(seed)
    s = [Sample(torch.randint(6, 300, (n,), generator=g).tolist(), [0, 0] + [1] * (n - 2)) for n in (6, 9, 5, 8)]
    return build_step_batches(s, micro_batch_size=2, pad_id=0)  # 2 micro-batches: one per rank on 2 ranks


def _grpo_batches(seed):
    """GRPO micro-batches: advantages, old (behaviour) and reference log-probs per token."""
    mbs = _sft_batches(100 + seed)
    g = torch.Generator().manual_seed(200 + seed)
    out = []
    for mb in mbs:
        shape = mb["input_ids"].shape
        out.append(dict(mb, advantages=torch.randn(shape[0], generator=g), global_seqs=torch.tensor(4.0),
                        max_len=torch.tensor(16.0), old_logprobs=-torch.rand(shape, generator=g) * 3 - 4,
                        ref_logprobs=-torch.rand(shape, generator=g) * 3 - 4))
    return out


def _losses():
    from experts.grpo import GRPOLoss
    from experts.grpo_settings import GRPOSettings
    from experts.sft import SFTLoss

    return SFTLoss(), GRPOLoss(GRPOSettings(kl_beta=0.1))


def _steps(trainer, first=0, last=4, batches=None):
    """Steps `first..last-1`: SFT for 0-1, GRPO for 2-3 (the same on every rank: `batches`
    picks this rank's share)."""
    sft, grpo = _losses()
    pick = batches or (lambda mbs: mbs)
    return [trainer.train_step(pick(_sft_batches(i) if i < 2 else _grpo_batches(i)), sft if i < 2 else grpo)
            for i in range(first, last)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf

    return materialize_toy_hf(ToyHFSpec(), tmp_path_factory.mktemp("toy") / "m", seed=0)


@pytest.fixture(scope="module")
def torch_reference(toy):
    from engine.trainer import TrainerSettings, build_trainer

    t = build_trainer(TrainerSettings(**KW), toy)
    return _steps(t), t.state_dict()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_lora_steps_like_the_torch_backend(tmp_path, toy, torch_reference, stage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.model import load_model
    from engine.trainer import TrainerSettings, build_trainer

    ref_metrics, ref_state = torch_reference
    tol = 1e-6 if stage == 3 else 1e-7
    s = TrainerSettings(backend="deepspeed", zero_stage=stage, **KW)
    ds = build_trainer(s, toy)
    trainable = {n for n, p in ds.lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    in_optimiser = {id(p) for g in ds.engine.optimizer.param_groups for p in g["params"]} \
        if stage == 0 else None
    if in_optimiser is not None:  # ZeRO 2/3 hold flat copies; their size is checked below
        assert in_optimiser == {id(p) for p in ds.lm.parameters() if p.requires_grad}
    metrics = _steps(ds)
    for i, (m, r) in enumerate(zip(metrics, ref_metrics)):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-7), i
        assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5), i
        assert m["grad_norm"] > 0, i
    assert metrics[2].keys() == ref_metrics[2].keys() and len(metrics[2]) > len(metrics[0])  # GRPO's own metrics
    for k in set(metrics[2]) - {"seconds", "tokens_per_s"}:
        assert metrics[3][k] == pytest.approx(ref_metrics[3][k], rel=1e-5, abs=1e-7), k
    state = ds.state_dict()  # merged, plain HF names (gathered under ZeRO-3)
    assert state.keys() == ref_state.keys()
    for k, v in state.items():
        torch.testing.assert_close(v, ref_state[k], atol=tol, rtol=0, msg=k)
    base = load_model(str(toy), dtype="fp32").state_dict()
    changed = {k for k in base if not torch.equal(base[k], state[k])}
    assert changed and all(k.endswith(TARGETS) for k in changed), changed

    ds.save_checkpoint(tmp_path / "ck", {"step": 4})
    # DeepSpeed's own files hold the adapter, not the frozen base
    files = list((tmp_path / "ck" / "deepspeed").rglob("*model_states.pt"))
    assert files
    module = torch.load(files[0], weights_only=False)["module"] or {}
    assert not any(k.endswith(("embed_tokens.weight", "base_layer.weight")) for k in module)
    # the checkpoint's HF weights are the merged model (no peft), adapter/ over the base reproduces it
    ids = torch.tensor([[5, 17, 40, 99, 250, 7, 8]])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"))
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(toy)),
                                            str(tmp_path / "ck" / "adapter"))
        torch.testing.assert_close(adapted(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    # resume: a fresh engine from model_dir + the checkpoint takes the same next steps exactly
    after = _steps(ds, 4, 6)
    fresh = build_trainer(s, toy)
    assert fresh.load_checkpoint(tmp_path / "ck") == {"step": 4}
    again = _steps(fresh, 4, 6)
    assert [m["loss"] for m in again] == [m["loss"] for m in after]
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ds.state_dict()[k], atol=0, rtol=0, msg=k)


def _rank(rank: int, port: int, model_dir: str, out_file: str) -> None:
    """One of two data-parallel DeepSpeed ranks (ZeRO 2, then ZeRO 3): rank r trains on
    micro-batch r of each step."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    from engine.trainer import TrainerSettings, build_trainer

    out = {}
    for stage in (2, 3):
        t = build_trainer(TrainerSettings(backend="deepspeed", zero_stage=stage, **KW), model_dir, rank=rank,
                          world_size=2)
        metrics = _steps(t, batches=lambda mbs: mbs[rank::2])
        state = t.state_dict()  # collective under ZeRO-3
        out[stage] = ([m["grad_norm"] for m in metrics], state)
    if rank == 0:
        torch.save(out, out_file)


def test_two_deepspeed_ranks_train_the_adapter_like_one(tmp_path, toy, torch_reference):
    from spawn_ranks import run_ranks

    out = tmp_path / "two.pt"
    run_ranks(_rank, str(toy), str(out), timeout=600)
    ref_metrics, ref_state = torch_reference  # 1 rank (torch backend == 1-rank DeepSpeed, above)
    for stage, (norms, state) in torch.load(out, weights_only=False).items():
        assert norms == pytest.approx([m["grad_norm"] for m in ref_metrics], rel=1e-5), stage
        assert state.keys() == ref_state.keys()
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-5, msg=f"zero {stage}: {k}")


@pytest.mark.parametrize("kw", [dict(zero_stage=2, dtype="bf16"), dict(zero_stage=3, dtype="bf16"),
                                dict(zero_stage=0, optimizer="muon")], ids=["bf16-zero2", "bf16-zero3", "muon"])
def test_deepspeed_lora_trains_in_bf16_and_with_muon(toy, kw):
    """DeepSpeed's bf16 casts the whole module (the frozen base too) and keeps fp32 masters for
    the adapter; Muon (ZeRO 0, fp32) steps the adapter's 2-D matrices. Both lower the loss
    on a repeated batch and move only the targeted projections."""
    from engine.model import load_model
    from engine.trainer import TrainerSettings, build_trainer

    ds = build_trainer(TrainerSettings(backend="deepspeed", lr=1e-2, lora=LORA, **kw), toy)
    losses = [ds.train_step(_sft_batches(0), _losses()[0])["loss"] for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.99 * losses[0], losses
    base = load_model(str(toy), dtype=kw.get("dtype", "fp32")).state_dict()  # the base as DeepSpeed holds it
    state = ds.state_dict()  # float32 (merged in fp32 over the bf16 base)
    assert all(v.dtype == torch.float32 for v in state.values())
    changed = {k for k in base if not torch.equal(base[k].float(), state[k])}
    assert changed and all(k.endswith(TARGETS) for k in changed), changed


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_lora_merge_keeps_rl_sized_steps(toy, stage):
    """Under DeepSpeed's bf16 the frozen base is bf16; one step at lr 1e-5 gives a delta of
    ~1e-5, below a bf16 weight's resolution (~1e-4 at 0.02). The merged weights (generator
    sync, save_hf) are float32, so the step survives; rounded to bf16 most of it is lost."""
    from engine.model import load_model
    from engine.trainer import TrainerSettings, build_trainer

    ds = build_trainer(TrainerSettings(backend="deepspeed", zero_stage=stage, dtype="bf16", lr=1e-5, lora=LORA), toy)
    ds.train_step(_sft_batches(0), _losses()[0])
    state = ds.state_dict()
    base = load_model(str(toy), dtype="bf16").state_dict()  # the base as DeepSpeed holds it
    assert all(v.dtype == torch.float32 for v in state.values())
    targeted = [k for k in state if k.endswith(TARGETS)]
    assert len(targeted) == 6
    for k in targeted:
        moved = (state[k] != base[k].float()).float().mean()
        assert moved > 0.9, (k, float(moved))
        survives_bf16 = (state[k].bfloat16() != base[k]).float().mean()
        assert survives_bf16 < 0.5 * moved, (k, float(survives_bf16))  # why the merge is fp32
    for k in set(state) - set(targeted):
        assert torch.equal(state[k], base[k].float()), k
