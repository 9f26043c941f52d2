"""`trainer.lora` (peft LoRA) on the torch trainer, over the toy Qwen3-shaped model:
only adapter weights train and sit in the optimiser; the weights that leave the trainer
(generator syncs, checkpoints' HF weights, final/) equal peft's own `merge_and_unload`;
resume is exact; the settings leave the stage hashes alone (DeepSpeed: test_lora_deepspeed.py)."""

from __future__ import annotations

import copy

import pytest
import torch


from engine.checkpoint import CheckpointManager  # noqa: E402


def _loss(hidden, weight, batch):
    from engine.logprobs import compute_chunked_token_logprobs

    lp = compute_chunked_token_logprobs(hidden, weight, batch["input_ids"], None)
    return -(lp * batch["loss_mask"]).sum() / batch["global_tokens"], {}


def _batches(seed):
    from engine.batching import Sample, build_step_batches

    g = torch.Generator().manual_seed(seed)
    s = [Sample(torch.randint(6, 300, (n,), generator=g).tolist(), [0, 0] + [1] * (n - 2)) for n in (6, 9, 5)]
    return build_step_batches(s, micro_batch_size=2, pad_id=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf

    return materialize_toy_hf(ToyHFSpec(), tmp_path_factory.mktemp("toy") / "m", seed=0)


def _settings(**kw):
    from engine.trainer import TrainerSettings

    base = dict(lr=5e-3, schedule="cosine", warmup_steps=1, total_steps=6,
                lora={"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    return TrainerSettings(**{**base, **kw})


@pytest.mark.parametrize("optimizer,dtype", [("adamw", "fp32"), ("muon", "bf16")])
def test_lora_trains_only_the_adapter_and_resumes_exactly(tmp_path, toy, optimizer, dtype):
    from transformers import AutoModelForCausalLM

    from engine.model import load_model
    from engine.trainer import build_trainer

    s = _settings(optimizer=optimizer, dtype=dtype)
    a = build_trainer(s, toy)
    base = {k: v.clone() for k, v in load_model(str(toy), dtype="fp32").state_dict().items()}
    trainable = {n for n, p in a.lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    in_optimiser = {id(p) for g in a.optimizer.param_groups for p in g["params"]}
    assert in_optimiser == {id(p) for p in a.lm.parameters() if p.requires_grad}
    for i in range(2):
        a.train_step(_batches(i), _loss)
    cm = CheckpointManager(tmp_path / "ck")
    path = cm.save(a, 2, {"step": 2})
    # the optimiser state covers the adapter only
    opt_state = torch.load(path / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    n_adapter = sum(p.numel() for p in a.lm.parameters() if p.requires_grad)
    assert sum(t.numel() for st in opt_state.values() for t in st.values() if torch.is_tensor(t) and t.dim()) \
        <= 2 * n_adapter
    for i in range(2, 4):
        a.train_step(_batches(i), _loss)
    b = build_trainer(s, toy)
    assert b.load_checkpoint(cm.latest()) == {"step": 2}
    for i in range(2, 4):
        b.train_step(_batches(i), _loss)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == base.keys()  # plain HF names: no lora_*, no base_layer
    for k, v in sa.items():
        torch.testing.assert_close(v, sb[k], atol=0, rtol=0, msg=k)
    # the base weights did not move; the adapted ones did
    changed = {k for k in base if not torch.equal(base[k], sa[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed)
    # the merged weights are peft's own merge, and load with no peft
    reference = copy.deepcopy(a.peft).merge_and_unload().state_dict()
    for k, v in sa.items():
        torch.testing.assert_close(v, reference[k].cpu(), atol=1e-6, rtol=1e-6, msg=k)
    lm = AutoModelForCausalLM.from_pretrained(str(path))  # the checkpoint is still an HF directory
    assert not any("lora" in k for k in lm.state_dict())
    assert (path / "adapter" / "adapter_model.safetensors").is_file()


def test_merged_weights_give_the_trainers_logits_and_sync_the_hf_generator(tmp_path, toy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.generation import HFGenerator
    from engine.trainer import build_trainer

    t = build_trainer(_settings(lora={"r": 4, "alpha": 16.0}), toy)  # every default target, no dropout
    for i in range(3):
        t.train_step(_batches(i), _loss)
    t.save_hf(tmp_path / "out")
    ids = torch.tensor([[5, 17, 40, 99, 250, 7, 8]])
    t.lm.eval()
    with torch.no_grad():
        want = t.lm(input_ids=ids).logits  # the adapted model the trainer trains
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # no peft involved
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(str(toy))
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-3  # training moved it
        # the adapter alone, in peft's format, over the base
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))
        torch.testing.assert_close(adapted(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    gen = HFGenerator(str(toy), device="cpu", dtype="fp32")
    gen.load_weights(t.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gen.model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_lora_settings_validate_and_keep_hashes():
    from engine.trainer import TrainerSettings
    from pipeline.graph import _dump

    assert TrainerSettings(backend="deepspeed", zero_stage=3, lora={}).lora.r == 8  # tests/integration/test_lora_deepspeed.py
    with pytest.raises(ValueError, match="r"):
        TrainerSettings(lora={"r": 0})
    assert "lora" not in _dump(TrainerSettings())
    assert _dump(TrainerSettings(lora={}))["lora"]["r"] == 8


NO_DROPOUT = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}  # the same on any split


def _lora_rank(rank: int, port: int, model_dir: str, out_file: str) -> None:
    """One of two data-parallel ranks: rank r trains on micro-batches r, r+2, ... of each step."""
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from engine.trainer import build_trainer

    t = build_trainer(_settings(lora=NO_DROPOUT), model_dir, rank=rank, world_size=2)
    for i in range(3):
        t.train_step(_batches(i)[rank::2], _loss)
    if rank == 0:
        torch.save(t.state_dict(), out_file)


def test_two_ranks_train_the_adapter_like_one(tmp_path, toy):
    """2 ranks (gloo, two local processes; each gets half of every step's micro-batches) end
    with the merged weights of 1 rank over all of them (fp32; a different summation order)."""
    from engine.trainer import build_trainer
    from spawn_ranks import run_ranks

    out = tmp_path / "two.pt"
    run_ranks(_lora_rank, str(toy), str(out), timeout=300)
    one = build_trainer(_settings(lora=NO_DROPOUT), toy)
    for i in range(3):
        assert len(_batches(i)) >= 2  # both ranks get micro-batches
        one.train_step(_batches(i), _loss)
    two, ref = torch.load(out), one.state_dict()
    assert two.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(two[k], v, atol=1e-6, rtol=1e-5, msg=k)
    start = build_trainer(_settings(lora=NO_DROPOUT), toy).state_dict()
    assert sum(not torch.equal(start[k], v) for k, v in ref.items()) == 6  # q, v, down in 2 layers


def test_lora_with_gradient_checkpointing_steps_like_without(toy):
    from engine.trainer import build_trainer

    a = build_trainer(_settings(lora=NO_DROPOUT), toy)
    b = build_trainer(_settings(lora=NO_DROPOUT, gradient_checkpointing=True), toy)
    for i in range(2):
        ma, mb = a.train_step(_batches(i), _loss), b.train_step(_batches(i), _loss)
        assert ma["grad_norm"] > 0 and abs(ma["grad_norm"] - mb["grad_norm"]) <= 1e-6 * ma["grad_norm"]
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, atol=1e-6, rtol=1e-6, msg=k)
