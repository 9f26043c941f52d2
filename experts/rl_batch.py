"""RL samples and their packing into trainer batches with global loss denominators.

A mini-batch (one optimiser step) is split into micro-batches; every micro-batch carries
the mini-batch's *global* denominators (`global_tokens`, `global_seqs`, `max_len`), so
the per-micro-batch losses sum to the loss of the whole mini-batch however it is split
across micro-batches and data-parallel ranks (see `experts.losses.aggregate_loss`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class RLSample:
    input_ids: list[int]  # prompt + response
    loss_mask: list[int]  # 1 on model-generated response tokens
    rollout_logprobs: list[float]  # aligned with input_ids, 0 where not generated
    reward: float
    domain: str
    finish_reason: str
    advantage: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)


def samples_from_trajectories(trajs, rewards: list[float], rows: list[dict], group_size: int) -> list[RLSample]:
    out = []
    for i, (t, r) in enumerate(zip(trajs, rewards)):
        row = rows[i // group_size]
        p = len(t.prompt_ids)
        out.append(RLSample(
            input_ids=list(t.prompt_ids) + list(t.response_ids),
            loss_mask=[0] * p + list(t.response_mask),
            rollout_logprobs=[0.0] * p + list(t.rollout_logprobs),
            reward=float(r), domain=row["domain"], finish_reason=t.finish_reason,
            info={"row_id": row.get("id")},
        ))
    return out


def collate_samples(samples: list[RLSample], pad_id: int) -> dict[str, torch.Tensor]:
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


def build_minibatches(samples: list[RLSample], num_minibatches: int, micro_batch_size: int, *,
                      pad_id: int, seed: int, max_len: int | None = None,
                      temperature: float = 1.0) -> list[list[dict]]:
    """Shuffle, split into mini-batches, then micro-batches that carry global denominators
    and the sampling temperature (old/reference log-probs are taken at it)."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    shuffled = [samples[i] for i in order]
    size = -(-len(shuffled) // num_minibatches)
    out = []
    for m in range(0, len(shuffled), size):
        mini = shuffled[m:m + size]
        global_tokens = max(sum(s.num_model_tokens for s in mini), 1)
        mlen = max_len or max(max(s.num_model_tokens for s in mini), 1)
        micro = []
        for k in range(0, len(mini), micro_batch_size):
            b = collate_samples(mini[k:k + micro_batch_size], pad_id)
            b["global_tokens"] = torch.tensor(float(global_tokens))
            b["global_seqs"] = torch.tensor(float(len(mini)))
            b["max_len"] = torch.tensor(float(mlen))
            b["temperature"] = torch.tensor(float(temperature))
            micro.append(b)
        out.append(micro)
    return out
