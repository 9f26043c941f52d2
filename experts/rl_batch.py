"""RL samples (`engine.episode.RolloutSample`) and their packing into trainer batches
with global loss denominators.

A mini-batch (one optimiser step) is split into micro-batches; every micro-batch carries
the mini-batch's *global* denominators (`global_tokens`, `global_seqs`, `max_len`), so
the per-micro-batch losses sum to the loss of the whole mini-batch however it is split
across micro-batches and data-parallel ranks (see `experts.losses.aggregate_loss`).
Dr. GRPO's constant `max_len` is per sequence (B,) when every sample knows its domain's
maximum response length (`RolloutSample.max_response_tokens`), so a single-turn domain
is never divided by a multi-turn budget. Micro-batches also carry the sampling
distribution (`temperature`, `top_k`, `top_p`, 0-d) their log-probs are taken under.
"""

from __future__ import annotations

import random

import torch

from engine.episode import RolloutSample


def collate_samples(samples: list[RolloutSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of RL samples (B, T)."""
    T = max(len(s.input_ids) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.float32)
    rollout_lp = torch.zeros(B, T, dtype=torch.float32)
    adv = torch.zeros(B, dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
        rollout_lp[i, :n] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        adv[i] = s.advantage
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "loss_mask": mask,
            "rollout_logprobs": rollout_lp, "advantages": adv}


def collate_packed(samples: list[RolloutSample], rows: list[list[int]], row_length: int,
                   pad_id: int) -> tuple[dict[str, torch.Tensor], list[RolloutSample]]:
    """A packed micro-batch of `samples` laid out as `rows` (`engine.batching`): the model's
    inputs in row layout (R, row_length), `unpack_index` (S, L), and the samples' own
    tensors (`collate_samples`' loss_mask, rollout_logprobs, advantages) in sample layout,
    samples in row order; returns the batch and the samples in that order."""
    from engine.batching import pack_row_tensors, row_order

    ordered = [samples[i] for i in row_order(rows)]
    batch = pack_row_tensors([s.input_ids for s in samples], rows, row_length, pad_id)
    per_sample = collate_samples(ordered, pad_id)
    for k in ("loss_mask", "rollout_logprobs", "advantages"):
        batch[k] = per_sample[k]
    return batch, ordered


def build_minibatches(samples: list[RolloutSample], num_minibatches: int, micro_batch_size: int, *,
                      pad_id: int, seed: int, max_len: int | None = None,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      micro_batch_tokens: int | None = None) -> list[list[dict]]:
    """Shuffle, split into mini-batches, then micro-batches that carry global denominators
    and the sampling distribution (old/reference log-probs are taken under it). Within a
    mini-batch the micro-batches take its samples shortest first: the step's loss is a sum
    over samples, so the grouping changes only the padding (a short single-turn answer is
    not padded to a three-turn episode's length).
    `max_len` (Dr. GRPO's constant): per sample from `max_response_tokens` when every
    sample has one, else this value, else the mini-batch's longest response.
    `micro_batch_tokens` (padding-free): the mini-batch's samples packed into rows as long
    as its longest sample, micro-batches of at most that many tokens
    (`engine.batching.plan_token_micro_batches`, `collate_packed`); `micro_batch_size`
    is then unused. The loss sees the same (S, L) tensors and global denominators."""
    if not samples:
        raise ValueError("build_minibatches: no samples (a step with nothing to train is skipped by the driver)")
    per_sample = all(s.max_response_tokens for s in samples)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    shuffled = [samples[i] for i in order]
    size = -(-len(shuffled) // num_minibatches)
    out = []
    for m in range(0, len(shuffled), size):
        mini = sorted(shuffled[m:m + size], key=lambda s: len(s.input_ids))  # stable: ties keep the shuffle
        global_tokens = max(sum(s.num_model_tokens for s in mini), 1)
        mlen = max_len or max(max(s.num_model_tokens for s in mini), 1)
        micro = []
        if micro_batch_tokens:
            from engine.batching import plan_token_micro_batches

            row_length = max(len(s.input_ids) for s in mini)
            parts = [collate_packed(mini, rows, row_length, pad_id) for rows in
                     plan_token_micro_batches([len(s.input_ids) for s in mini], micro_batch_tokens, row_length)]
        else:
            parts = [(collate_samples(mini[k:k + micro_batch_size], pad_id), mini[k:k + micro_batch_size])
                     for k in range(0, len(mini), micro_batch_size)]
        for b, part in parts:
            b["global_tokens"] = torch.tensor(float(global_tokens))
            b["global_seqs"] = torch.tensor(float(len(mini)))
            b["max_len"] = (torch.tensor([float(s.max_response_tokens) for s in part]) if per_sample
                            else torch.tensor(float(mlen)))  # (B,) or 0-d
            # float64: the trainer must filter with exactly the sampler's values (0.9, not 0.8999999762)
            b["temperature"] = torch.tensor(float(temperature), dtype=torch.float64)
            b["top_k"] = torch.tensor(int(top_k))
            b["top_p"] = torch.tensor(float(top_p), dtype=torch.float64)
            micro.append(b)
        out.append(micro)
    return out
