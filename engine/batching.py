"""Rendered samples -> trainer batches (docs/CONTRACTS.md "Batches for trainers").

- `pad_rows`: one sample per row, right padding; `position_ids` count 0.. across the row.
- `pack_rows`: short samples concatenated into rows of `row_length` tokens (best-fit
  decreasing, `plan_packing`: the step's loss is a sum over its samples, so which row a
  sample lands in changes nothing but the padding);
  `position_ids` restart at 0 for every sample, which is what defines the attention
  boundaries: the trainers call the model with `attention_mask=None` and
  `use_cache=False`, and transformers (5.x, `masking_utils.find_packed_sequence_indices`)
  then builds a block-diagonal causal mask from the position restarts, so no token
  attends across a sample boundary (`tests/unit/test_batching.py` checks a packed row's
  log-probs against each sample alone). The first token of every sample is never a
  target (it has no context in its own segment).
- `EpochCursor`: the deterministic, seeded order in which a stage reads its rows; its
  `(seed, epoch, index)` state goes into every checkpoint so a resumed stage neither
  repeats nor skips a sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    """A rendered sequence: token ids and a 0/1 target mask of the same length."""

    input_ids: list[int]
    loss_mask: list[float]  # 0/1 targets, or per-token weights (`weight_groups_equally`)
    group: str = ""  # the domain it came from (`weight_groups_equally`)


def _check(samples, where: str) -> None:
    if not samples:
        raise ValueError(f"{where}: no samples")
    for i, s in enumerate(samples):
        if len(s.input_ids) != len(s.loss_mask):
            raise ValueError(f"{where}: sample {i} has {len(s.input_ids)} ids but {len(s.loss_mask)} mask entries")
        if not s.input_ids:
            raise ValueError(f"{where}: sample {i} is empty")


def _empty(B: int, T: int, pad_id: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "position_ids": torch.arange(T).repeat(B, 1),
        "loss_mask": torch.zeros(B, T, dtype=torch.float32),
    }


def pad_rows(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest: all tensors (B, T)."""
    _check(samples, "pad_rows")
    T = max(len(s.input_ids) for s in samples)
    batch = _empty(len(samples), T, pad_id)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        batch["input_ids"][i, :n] = torch.tensor(s.input_ids)
        batch["attention_mask"][i, :n] = 1
        batch["loss_mask"][i, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
    batch["loss_mask"][:, 0] = 0.0
    return batch


def plan_packing(lengths: list[int], row_length: int) -> list[list[int]]:
    """Indices of the samples in each row, best-fit decreasing: longest first, each into the
    row it leaves the least room in (ties: the earliest row), else a new row. Deterministic;
    rows list their samples longest first, ties in input order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        if n > row_length:
            raise ValueError(f"pack_rows: sample {i} has {n} tokens, more than row_length={row_length}")
        fits = [r for r in range(len(rows)) if room[r] >= n]
        if fits:
            r = min(fits, key=lambda k: (room[k], k))
            rows[r].append(i)
            room[r] -= n
        else:
            rows.append([i])
            room.append(row_length - n)
    return rows


def weight_groups_equally(samples: list[Sample], shares: dict[str, float] | None = None) -> list[Sample]:
    """The same samples with target weights that give every group (domain) the same share of
    the step's loss: a target of group g weighs N / (G * n_g), where N is the step's target
    count, n_g group g's and G the number of groups. The weights sum to N, so the trainers'
    `global_tokens` divisor turns the token mean into the mean of the groups' token means
    (a short-answer domain is not drowned by long ones). With `shares` (group -> a positive
    weight, 1 for a group not named) group g's share is w_g / (sum of the step's groups' w)
    instead of 1 / G: a target weighs N w_g / (n_g sum w), the weights still sum to N."""
    counts: dict[str, float] = {}
    for s in samples:
        counts[s.group] = counts.get(s.group, 0.0) + float(sum(s.loss_mask[1:]))  # a first token is never a target
    total = sum(counts.values())
    w = {g: float((shares or {}).get(g, 1.0)) for g in counts}
    norm = sum(w[g] for g, n in counts.items() if n > 0) or 1.0
    scale = {g: total * w[g] / (norm * n) if n > 0 else 0.0 for g, n in counts.items()}
    return [Sample(s.input_ids, [m * scale[s.group] for m in s.loss_mask], s.group) for s in samples]


def pack_rows(samples: list[Sample], row_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Samples packed into rows of exactly `row_length` tokens: all tensors (R, row_length)."""
    _check(samples, "pack_rows")
    plan = plan_packing([len(s.input_ids) for s in samples], row_length)
    batch = _empty(len(plan), row_length, pad_id)
    for r, members in enumerate(plan):
        start = 0
        for i in members:
            s = samples[i]
            n = len(s.input_ids)
            batch["input_ids"][r, start:start + n] = torch.tensor(s.input_ids)
            batch["attention_mask"][r, start:start + n] = 1
            batch["position_ids"][r, start:start + n] = torch.arange(n)
            batch["loss_mask"][r, start:start + n] = torch.tensor(s.loss_mask, dtype=torch.float32)
            batch["loss_mask"][r, start] = 0.0  # no context for a segment's first token
            start += n
        # the padded tail continues the last segment's positions: causal attention keeps
        # the real tokens from seeing it, and it carries no target
        batch["position_ids"][r, start:] = torch.arange(row_length - start) + (
            batch["position_ids"][r, start - 1] + 1)
    return batch


def split_into_micro_batches(batch: dict[str, torch.Tensor],
                             micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """(B, ...) tensors cut into micro-batches of at most `micro_batch_size` rows; 0-d
    tensors (a step's global denominators, the log-prob temperature) go to every part."""
    if micro_batch_size < 1:
        raise ValueError(f"split_into_micro_batches: micro_batch_size must be >= 1, got {micro_batch_size}")
    B = batch["input_ids"].shape[0]
    return [{k: v if v.dim() == 0 else v[i:i + micro_batch_size] for k, v in batch.items()}
            for i in range(0, B, micro_batch_size)]


def with_global_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Attach the step's total target count (`global_tokens`, a 0-d tensor) to each micro-batch."""
    total = sum(float(mb["loss_mask"].sum()) for mb in micro_batches)
    return [{**mb, "global_tokens": torch.tensor(max(total, 1.0))} for mb in micro_batches]


def build_step_batches(samples: list[Sample], *, micro_batch_size: int, pad_id: int,
                       pack_length: int | None = None, balance_groups: bool = False,
                       group_shares: dict[str, float] | None = None) -> list[dict[str, torch.Tensor]]:
    """One optimiser step's micro-batches (packed when `pack_length` is set, else padded);
    `balance_groups`: every group the same share of the loss, or shares in proportion to
    `group_shares` (`weight_groups_equally`)."""
    if balance_groups:
        samples = weight_groups_equally(samples, group_shares)
    if pack_length:
        rows = pack_rows(samples, pack_length, pad_id)
        return with_global_tokens(split_into_micro_batches(rows, micro_batch_size))
    chunks = [samples[i:i + micro_batch_size] for i in range(0, len(samples), micro_batch_size)]
    return with_global_tokens([pad_rows(c, pad_id) for c in chunks])


class EpochCursor:
    """Deterministic sample order: epoch e visits a permutation seeded by `(seed, e)`."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"EpochCursor: num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_samples))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        """The next `n` sample indices, crossing into the next epoch when one ends."""
        out = []
        while len(out) < n:
            if self.index == self.num_samples:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(out), self.num_samples - self.index)
            out.extend(self._order[self.index:self.index + k])
            self.index += k
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index,
                "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(f"EpochCursor: checkpoint was taken over {state['num_samples']} samples with seed "
                             f"{state['seed']}, this run has {self.num_samples} with seed {self.seed}")
        self.shuffle, self.epoch, self.index = state["shuffle"], state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------- packed RL micro-batches
# RL and OPD micro-batches by tokens (`micro_batch_tokens`): the step's samples are packed
# best-fit decreasing into rows as long as its longest sample (`plan_packing`), and
# consecutive rows form micro-batches of at most `micro_batch_tokens` tokens (rows x row
# length, at least one row). Within a micro-batch the samples are listed row by row, each
# row's members in their order along the row ("row order"); tensors of one value per token
# of the packed rows are (R, T) ("row layout"), tensors per sample (S, L) padded to the
# longest sample ("sample layout"). `unpack_index` (S, L) maps sample layout into the
# flattened rows, so a per-token result of the model (log-probs) is brought back to the
# samples by one gather (`unpack_to_samples`), and every loss and normaliser downstream
# sees exactly the padded batch's (S, L) tensors.

ROW_KEYS = ("input_ids", "attention_mask", "position_ids")  # the model's inputs, row layout


def plan_token_micro_batches(lengths: list[int], micro_batch_tokens: int,
                             row_length: int | None = None) -> list[list[list[int]]]:
    """Micro-batches, each a list of rows, each a list of sample indices (`lengths[i]`
    tokens): rows of `row_length` tokens (default: the longest sample) packed best-fit
    decreasing, then cut into micro-batches of `micro_batch_tokens // row_length` rows (at
    least one). Deterministic; every index appears once."""
    if not lengths:
        raise ValueError("plan_token_micro_batches: no samples")
    if micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
    row_length = row_length or max(lengths)
    rows = plan_packing(list(lengths), row_length)
    per = max(micro_batch_tokens // row_length, 1)
    return [rows[i:i + per] for i in range(0, len(rows), per)]


def row_order(rows: list[list[int]]) -> list[int]:
    """The sample indices of a micro-batch's rows, row by row: the packed batch's sample order."""
    return [i for r in rows for i in r]


def pack_row_tensors(seqs: list[list[int]], rows: list[list[int]], row_length: int,
                     pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `position_ids` (R, row_length) of `seqs` laid out as
    `rows` (indices into `seqs`), positions restarting at 0 for every sample (the trainers'
    block-diagonal attention, `engine.trainer_common`), and `unpack_index` (S, L): for
    sample k of `row_order(rows)` and its token t, the index of that token in the flattened
    rows (past the sample's end, where sample-layout masks are 0, its first token's)."""
    order = row_order(rows)
    R, S = len(rows), len(order)
    L = max(len(seqs[i]) for i in order)
    out = _empty(R, row_length, pad_id)
    del out["loss_mask"]
    index = torch.zeros(S, L, dtype=torch.long)
    k = 0
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = len(seqs[i])
            if start + n > row_length:
                raise ValueError(f"pack_row_tensors: row {r} overflows {row_length} tokens")
            out["input_ids"][r, start:start + n] = torch.tensor(seqs[i], dtype=torch.long)
            out["attention_mask"][r, start:start + n] = 1
            out["position_ids"][r, start:start + n] = torch.arange(n)
            index[k, :n] = r * row_length + start + torch.arange(n)
            index[k, n:] = r * row_length + start
            start += n
            k += 1
        if 0 < start < row_length:  # the padded tail continues the last segment (causal: unseen)
            out["position_ids"][r, start:] = torch.arange(row_length - start) + out["position_ids"][r, start - 1] + 1
    out["unpack_index"] = index
    return out


def pack_token_values(values: list[list[float]], rows: list[list[int]], row_length: int,
                      dtype=torch.float32) -> torch.Tensor:
    """Per-token values of the samples (`values[i]`, as long as sample i) in row layout (R, T), 0 on padding."""
    out = torch.zeros(len(rows), row_length, dtype=dtype)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = len(values[i])
            out[r, start:start + n] = torch.tensor(values[i], dtype=dtype)
            start += n
    return out


def unpack_to_samples(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """A row-layout result (R, T, ...) in sample layout (S, L, ...) when `batch` is packed
    (`unpack_index`), else `x` itself. Differentiable (a gather)."""
    index = batch.get("unpack_index")
    if index is None:
        return x
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return flat[index.to(x.device)]


def split_packed_rows(batch: dict, world_size: int) -> tuple[list[dict], list[int]]:
    """A packed batch (`unpack_index`) cut into `world_size` parts of contiguous rows, each
    with its own samples (the rows' members, contiguous in row order) and its `unpack_index`
    rebased; (parts, samples per part). A part with no row gets the first row as a stand-in
    whose result is dropped (count 0). Row-layout keys are `ROW_KEYS`; any other tensor
    with a batch dimension is per sample; 0-d tensors and non-tensors go to every part."""
    index = batch["unpack_index"]
    T = batch["input_ids"].shape[1]
    R = batch["input_ids"].shape[0]
    sample_row = index[:, 0] // T  # (S,) every sample starts in its row
    bounds = [R * r // world_size for r in range(world_size + 1)]
    parts, counts = [], []
    for r in range(world_size):
        lo, hi = bounds[r], bounds[r + 1]
        stand_in = hi <= lo
        if stand_in:
            lo, hi = 0, 1
        keep = ((sample_row >= lo) & (sample_row < hi)).nonzero().flatten()
        s0, s1 = int(keep[0]), int(keep[-1]) + 1
        part = {}
        for k, v in batch.items():
            if not isinstance(v, torch.Tensor) or v.ndim == 0:
                part[k] = v
            elif k in ROW_KEYS:
                part[k] = v[lo:hi]
            elif k == "unpack_index":
                part[k] = v[s0:s1] - lo * T
            else:
                part[k] = v[s0:s1]
        parts.append(part)
        counts.append(0 if stand_in else s1 - s0)
    return parts, counts
