"""Padding-free batches on the main model families' real transformers implementations: a
packed row's log-probs equal each sample's alone (right-padded), so attention never crosses
a sample boundary, including sliding-window layers (Mistral, Gemma 2/3) whose window is
shorter than the samples, and Gemma's logit soft-capping. Random tiny configs, built offline."""

import random

import pytest
import torch

from engine.batching import Sample, pack_row_tensors, pad_rows, plan_token_micro_batches, unpack_to_samples
from engine.trainer_common import LogprobFn, run_loss

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)


def _families():
    import transformers as tf

    out = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 8}),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 12}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 8}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 8, "sliding_window": 12,
                                                           "final_logit_softcapping": 30.0,
                                                           "attn_logit_softcapping": 50.0}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    }
    if hasattr(tf, "Gemma3ForCausalLM"):
        out["gemma3"] = (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 8, "sliding_window": 12})
    return out


FAMILIES = _families()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_log_probs_equal_each_sample_alone(family):
    torch.set_num_threads(1)
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**SMALL, **extra)
    config._attn_implementation = "sdpa"
    lm = model_cls(config).eval()
    rng = random.Random(1)
    seqs = [[rng.randrange(1, 96) for _ in range(n)] for n in (40, 3, 17, 29, 8, 1, 33)]
    (rows,) = plan_token_micro_batches([len(s) for s in seqs], 10_000)  # one micro-batch, several per row
    assert any(len(r) > 1 for r in rows)
    packed = pack_row_tensors(seqs, rows, max(map(len, seqs)), pad_id=0)
    with torch.no_grad():
        got, _ = run_loss(lm, packed, LogprobFn())  # (S, L), samples in row order
        order = [i for r in rows for i in r]
        for k, i in enumerate(order):
            alone = pad_rows([Sample(seqs[i], [1.0] * len(seqs[i]))], pad_id=0)
            want, _ = run_loss(lm, alone, LogprobFn())  # (1, n)
            n = len(seqs[i])
            err = float((got[k, :n] - want[0, :n]).abs().max())
            assert err <= 1e-5 * max(float(want.abs().max()), 1.0), (family, i, err)
    ids = unpack_to_samples(packed["input_ids"], packed)
    assert all(ids[k, :len(seqs[i])].tolist() == seqs[i] for k, i in enumerate(order))
