"""Padding-free batches on CUDA: a packed row's log-probs equal each sample's alone with
transformers' SDPA and, where `flash_attn` is installed, flash-attention-2 (whose varlen
kernel reads the position restarts: transformers turns them into cumulative sequence
lengths), in fp32 (SDPA) and bf16 (flash-attention needs half precision).

Skipped without CUDA (conftest). Run with `scripts/gpu_check.sh`."""

import importlib.util
import random

import pytest
import torch

from engine.batching import Sample, pack_row_tensors, pad_rows, plan_token_micro_batches
from engine.trainer_common import LogprobFn, run_loss

pytestmark = pytest.mark.gpu
IMPLS = [("sdpa", torch.float32, 1e-5),
         pytest.param("flash_attention_2", torch.bfloat16, 2e-2,
                      marks=pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                               reason="flash_attn is not installed"))]


@pytest.mark.parametrize("impl,dtype,tol", IMPLS)
def test_packed_log_probs_equal_each_sample_alone_on_cuda(impl, dtype, tol):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    config._attn_implementation = impl
    lm = Qwen2ForCausalLM(config).to("cuda", dtype).eval()
    rng = random.Random(0)
    seqs = [[rng.randrange(1, 128) for _ in range(n)] for n in (60, 5, 23, 41, 9, 2, 37)]
    (rows,) = plan_token_micro_batches([len(s) for s in seqs], 10_000)
    packed = {k: v.cuda() for k, v in pack_row_tensors(seqs, rows, max(map(len, seqs)), pad_id=0).items()}
    with torch.no_grad():
        got, _ = run_loss(lm, packed, LogprobFn())
        for k, i in enumerate([i for r in rows for i in r]):
            alone = {k2: v.cuda() for k2, v in pad_rows([Sample(seqs[i], [1.0] * len(seqs[i]))], 0).items()}
            want, _ = run_loss(lm, alone, LogprobFn())
            n = len(seqs[i])
            err = float((got[k, :n].float() - want[0, :n].float()).abs().max())
            assert err <= tol * max(float(want.float().abs().max()), 1.0), (impl, i, err)
