"""`trainer.gradient_checkpointing` on both back-ends: the gradients of one optimiser step
equal those without it to 1e-6 relative (fp32), for the losses of every stage kind: SFT
(`SFTLoss`), GRPO and mixed RL (`GRPOLoss`, clipped ratio, KL to a reference), OPD
(`OPDLoss`: the chunked KL through a teacher head, plus the clipped reward term).
Gradients are read by a post-accumulate hook on every parameter, the same on both
back-ends; the layers are checkpointed (transformers' flag on the compute model)."""

import pytest
import torch

from distill.heads import extract_head
from distill.opd_loss import OPDLoss
from engine.batching import Sample, build_step_batches
from engine.model import TinySpec, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer
from experts.grpo import GRPOLoss
from experts.grpo_settings import GRPOSettings
from experts.sft import SFTLoss

torch.set_num_threads(1)
SPEC = TinySpec(hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc")
    student = materialize_tiny(SPEC, root / "student", seed=0)
    teacher = materialize_tiny(SPEC, root / "teacher", seed=5)
    return student, str(extract_head(teacher, root / "head.safetensors"))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(6, 14, (4,), generator=g).tolist()
    s = [Sample(torch.randint(6, 90, (k,), generator=g).tolist(), [0, 0, 0] + [1] * (k - 3)) for k in lens]
    (mb,) = build_step_batches(s, micro_batch_size=4, pad_id=0)
    n = int(mb["loss_mask"].sum())
    mb["global_tokens"] = torch.tensor(float(n))
    mb["advantages"] = torch.randn(4, generator=g)
    return mb, g


def _losses(head):
    mb, g = _batch()
    grpo = dict(mb, global_seqs=torch.tensor(4.0), max_len=torch.tensor(16.0),
                old_logprobs=-torch.rand(mb["input_ids"].shape, generator=g) * 3,
                ref_logprobs=-torch.rand(mb["input_ids"].shape, generator=g) * 3)
    n = int(mb["loss_mask"][:, 1:].sum())
    opd = dict(mb, teacher_hidden=torch.randn(n, SPEC.hidden_size, generator=g), teacher_index=torch.tensor(0),
               opt_step=torch.tensor(0), rollout_logprobs=-torch.rand(mb["input_ids"].shape, generator=g) * 3)
    return {"sft": (SFTLoss(), mb),
            "grpo": (GRPOLoss(GRPOSettings(kl_beta=0.1)), grpo),
            "opd": (OPDLoss([head], [1.0], "reverse_kl", 8, 0.5, reward_weight=0.5), opd)}


class _Probe:
    """A trainer whose parameters' accumulated gradients are caught by hooks at each step."""

    def __init__(self, settings, model_dir):
        self.trainer = build_trainer(settings, model_dir)
        self.grads = {}
        for name, p in self.trainer.lm.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: self.grads.__setitem__(name, p.grad.detach().clone()))

    def step(self, loss_fn, batch):
        self.grads = {}
        loss = self.trainer.train_step([dict(batch)], loss_fn)["loss"]
        return self.grads, loss


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_checkpointed_gradients_equal_plain_ones(dirs, backend):
    """One trainer of each kind per back-end (a DeepSpeed engine is slow to build), then one
    step per loss: lr 1e-12 keeps the two trainers' weights equal to ~1e-12 between them."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    student, head = dirs
    kw = dict(backend=backend, lr=1e-12, grad_clip=0.0)
    plain, ckpt = _Probe(TrainerSettings(**kw), student), _Probe(TrainerSettings(gradient_checkpointing=True, **kw), student)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in plain.trainer.lm.model.layers)
    assert all(getattr(layer, "gradient_checkpointing", False) for layer in ckpt.trainer.lm.model.layers)
    for kind in ("sft", "grpo", "opd"):
        a, loss_a = plain.step(*_losses(head)[kind])  # fresh losses: the OPD head manager keeps per-step state
        b, loss_b = ckpt.step(*_losses(head)[kind])
        assert loss_a == pytest.approx(loss_b, rel=1e-6), kind
        assert set(a) == set(b) and a, kind
        worst = max(float((b[k] - a[k]).norm() / a[k].norm().clamp(min=1e-30)) for k in a)
        assert worst < 1e-6, (kind, worst)
