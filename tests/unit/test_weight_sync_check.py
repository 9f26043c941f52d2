"""engine/weight_sync_check.py: the gap between a generator's greedy log-probs and the
trainer's is float noise when the generator holds the trainer's weights, and large when it
holds other weights (the check can fail), before and after a push."""

import torch

from engine.generation import HFGenerator
from engine.model import TinySpec, load_model, load_tokenizer, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer
from engine.weight_sync_check import probe_ids, weight_sync_gap

SPEC = TinySpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128)


def test_gap_is_noise_with_the_trainers_weights_and_large_without(tmp_path):
    torch.manual_seed(0)
    a, b = materialize_tiny(SPEC, tmp_path / "a", seed=0), materialize_tiny(SPEC, tmp_path / "b", seed=1)
    tok = load_tokenizer(a)
    trainer = build_trainer(TrainerSettings(lr=1e-2, seed=0), a)
    generator = HFGenerator(load_model(b), tok)
    probe = probe_ids(tok)
    assert weight_sync_gap(generator, trainer, probe, max_new_tokens=8, pad_id=tok.pad_token_id) > 0.1
    generator.load_weights(trainer.state_dict())  # the push
    assert weight_sync_gap(generator, trainer, probe, max_new_tokens=8, pad_id=tok.pad_token_id) < 1e-4
