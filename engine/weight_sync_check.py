"""The weight-push check: does the generator serve the trainer's weights?

With `POLYMATH_CHECK_WEIGHT_SYNC=1` the GRPO and OPD drivers call `weight_sync_gap` after
every push of the trainer's weights to the generator (and once before the first step) and
log the result as `weight_sync/logprob_gap`. The generator decodes a fixed chat prompt
greedily; the trainer's model then scores that sequence teacher-forced, and the gap is the
largest absolute difference between the two per-token log-probs. An engine that kept old
weights (or loaded them wrongly) gives a gap of order 0.1-1; one that serves the trainer's
weights gives float noise (about 1e-6 in fp32). It costs one short greedy generation and one
forward of ~30 tokens per push, so it is off by default."""

from __future__ import annotations

import os

import torch

from engine.batching import Sample, pad_rows
from engine.generator_api import SamplingParams

ENV = "POLYMATH_CHECK_WEIGHT_SYNC"
PROBE = [{"role": "user", "content": "What is 2 + 3?"}]


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def probe_ids(tokenizer) -> list[int]:
    from engine.chat import render_prompt

    return render_prompt(PROBE, tokenizer)


def weight_sync_gap(generator, trainer, prompt_ids: list[int], *, max_new_tokens: int = 8, pad_id: int = 0) -> float:
    """max |log p_generator - log p_trainer| over the generator's greedy continuation of `prompt_ids`."""
    c = generator.generate([list(prompt_ids)], SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))[0]
    if not c.token_ids:
        raise RuntimeError("weight_sync_gap: the generator returned no tokens for the probe")
    ids = list(prompt_ids) + list(c.token_ids)
    batch = pad_rows([Sample(ids, [1.0] * len(ids))], pad_id)
    lp = trainer.forward_logprobs(batch)[0, len(prompt_ids):len(ids)].double()  # lp[t] = log p(ids[t] | ids[:t])
    return float((lp - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max())
