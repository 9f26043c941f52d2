"""Multi-teacher on-policy distillation (DeepSeek-V4 style) from cached hidden states.

For each round:
  1. rollout: the student samples answers to prompts of every domain (tool episodes are
     multi-turn; how many per route: distill.allocation); each sample is routed to its route's teacher: the domain's, or with
     reasoning modes the (domain, mode)'s (`TeacherRef.route`; prompts, domains and
     held-out rows are keyed by route). Saved to
     `round-r/rollouts.jsonl`.
  2. teach: each teacher in turn (one teacher model loaded at a time) prefills the
     rollouts routed to it and writes its pre-norm last-layer hidden states at the
     positions that predict response tokens to `round-r/cache/` (distill.cache).
  3. train: optimiser steps over teacher-mixed mini-batches whose micro-batches are in
     teacher order (distill.plan); the loss rebuilds teacher logits from the cached
     states through the teacher's extracted head (distill.heads) and takes a chunked
     full-vocabulary divergence (distill.kl); the HeadManager keeps at most one head
     resident and refuses micro-batches out of teacher order.
The loss is `sum_t w_teacher(sample) * D_t / (response tokens of the mini-batch)`.
With `reward_weight` α > 0 (MOPD) the round's samples are also scored by their route's
verifier (on a thread while the teachers prefill), each gets its reward z-scored within
its prompt's group as advantage A (kept in rollouts.jsonl, which is then written after
the teach phase), and the loss adds `-α · w_teacher · min(r A, clip(r) A)` on the same
tokens, r the token's probability now over the sampler's (`reward_ratio: clip`, default;
`none`: `-α · w_teacher · A · log p(token)`) (distill.opd_loss.compute_policy_gradient_term,
under the sampler's temperature).

Held-out KL (`heldout_prompts_per_domain` > 0): before round 0 and every `heldout_every`
rounds after, the student samples answers to the same held-out prompts with the same
seed, and each teacher's full-vocabulary divergence to it is measured on them (full
forwards of a student copy and of the teacher, no gradient). The per-round training KL
is a noisy figure (a few dozen fresh prompts per teacher, measured while the student
trains on them); this one compares students on fixed prompts.
Resume: rollouts, cache shards and the round-end checkpoint are each complete-or-absent,
so a killed stage restarts the unfinished part of the unfinished round. While a round's
rollouts are generated, each domain's finished batch goes to `round-r/rollouts.wal`
(engine.rollout_wal), so a stage killed mid-rollout regenerates only the batch in flight.
Disk: once a round's checkpoint is written, its cache (and rollout log) is deleted unless
it is among the `keep_caches` newest; `disk_peak_bytes` is the stage directory's largest
size, measured when each round ends (cache and new checkpoint both on disk).
Pipelined rounds (`pipelined: true`): round r+1's rollouts and teacher prefill run on a
background thread (the prefill itself in Ray tasks when the stage has a prefill pool)
while round r trains, so a round costs about max(rollout + prefill, train) instead of
their sum. Round r+1 is sampled from the weights round r started from (round 0 from the
initial weights), so at round r+1's k-th step its samples are S_r + k optimiser steps old
(S_r: round r's steps), at most S_r + S_{r+1} - 1; synchronous rounds' at most S_r - 1.
Each sample records its `policy_version` (rounds of training in the weights that sampled
it; r in synchronous rounds) in `rollouts.jsonl`; the history gets `version_steps`,
`staleness_steps_per_round` (and per step `staleness_steps`), and when pipelined
`policy_version_per_round`, `staleness_per_round` (rounds) and `time_per_round` (wall time).
The reward term corrects for the staleness with GRPO's clipped ratio to the sampler's
log-probs (`opd.reward_ratio`, distill.opd_loss.compute_policy_gradient_term).
The generator takes the new weights only after round r+1's rollouts are done, and a
round's checkpoint is written after the next round's rollouts and cache, so a resumed
stage finds them on disk (the checkpoint's prompt-stream positions are those through
round r). While both run, `disk_read_amplification` also counts the teacher loads of an
in-process prefill. An in-process teacher load beside training is safe only in fp32:
transformers sets torch's default dtype process-wide while it builds a model, so
`validate` asks for the Ray prefill pool when `model.dtype` is not fp32.
Reads: `cache_read_amplification` (per round, the largest over its epochs) is the bytes of
shards the reader mapped in an epoch over the cache's bytes (the shard LRU is sized from
the epoch's plan to keep it <= 1.1); mapped shards live in the page cache, so
`disk_read_amplification` adds what this process fetched from storage meanwhile
(/proc/self/io; ~0 while the page cache holds the round's cache, > 1 if it cannot).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import gc
import math
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.allocation import round_allocation
from distill.opd_loss import OPDLoss, loss_divisors  # noqa: F401  (OPDLoss re-exported: the loss the trainer runs)
from distill.opd_settings import OPDSettings
from distill.plan import plan_minibatches
from distill.teacher_ref import TeacherRef
from engine.disk import dir_bytes, storage_read_bytes
from engine.domain_spec import DomainSpec
from engine.episode import RolloutSample, roll_out
from engine.prompt_stream import PromptStream
from engine.samples import log_rollout_samples


# ------------------------------------------------------------------------------ phases


def rollout_round(settings: OPDSettings, streams: dict[str, PromptStream], domains: dict[str, DomainSpec],
                  teacher_of_domain: dict[str, int], *, generator, tokenizer, round_idx: int, wal=None,
                  counts: dict[str, int] | None = None) -> list[RolloutSample]:
    """The student's samples for one round, each routed to its domain's teacher (each
    domain's batch replayed from the rollout log `wal` when it is logged there); `counts`:
    prompts per route (distill.allocation; default prompts_per_domain each)."""
    samples = []
    for d in sorted(streams):
        n = settings.prompts_per_domain if counts is None else counts[d]
        samples += _domain_rollouts(settings, streams[d].take(n), d, domains[d],
                                    teacher_of_domain[d], generator=generator, tokenizer=tokenizer,
                                    n=settings.samples_per_prompt, seed=settings.seed * 1000 + round_idx,
                                    id_prefix=f"r{round_idx}", wal=wal)
    return samples


def _domain_rollouts(settings: OPDSettings, rows: list[dict], d: str, spec: DomainSpec, teacher_index: int, *,
                     generator, tokenizer, n: int, seed: int, id_prefix: str, wal=None) -> list[RolloutSample]:
    """Route `d`'s samples of `rows` (engine.episode), each named and routed to its teacher."""
    samples = roll_out(rows, d, spec, generator=generator, tokenizer=tokenizer, n=n, temperature=settings.temperature,
                       max_new_tokens=spec.max_new_tokens or settings.max_new_tokens, max_turns=settings.max_turns,
                       seed=seed, wal=wal, wal_key=f"{id_prefix}/{d}")
    for j, s in enumerate(samples):
        s.sample_id, s.teacher_index = f"{id_prefix}-{d}-{j}", teacher_index
    return samples


def heldout_seed(settings: OPDSettings) -> int:
    """The held-out rollouts' seed: the same at every measurement, apart from the rounds'."""
    return settings.seed * 1000 + 999_983


def measure_heldout_kl(settings: OPDSettings, heldout: dict[str, list[dict]], teachers: list["TeacherRef"],
                       domains: dict[str, DomainSpec], *, generator, tokenizer, student, load_teacher=None,
                       prefill=None, head_paths: list[str] | None = None, cache_dir: Path | None = None,
                       pad_id: int = 0) -> dict:
    """{teacher name: {"token_mean", "per_prompt": [...]}}: the divergence D(student || teacher)
    on the student's samples of the held-out prompts (one per prompt, a fixed seed, so every
    call sees the same prompts and the same sampling noise), as the mean over all response
    tokens and as each prompt's mean over its own tokens (in prompt order; a prompt with no
    response token gets 0). The token mean moves with the response length (later positions
    carry more KL); the per-prompt values compare two students prompt by prompt. `student`
    is a model holding the generator's current weights. Full-vocabulary, one sample at a
    time (no (tokens x vocabulary) tensor beyond one sample's).

    Teacher side: by default one teacher model at a time is loaded here (`load_teacher`).
    With `prefill` (the stage's prefill pool, `teach_round`), the teachers prefill the
    held-out samples elsewhere into `cache_dir` (deleted afterwards) and their logits are
    rebuilt here from the cached states through each teacher's head (`head_paths`), as in
    training: this process loads no teacher (equal to the full forward up to the cache
    dtype: exact in fp32, bf16-rounded states with `cache_dtype: bf16`)."""
    import shutil

    from distill.kl import get_divergence

    fn = get_divergence(settings.divergence)
    out = {}
    student.eval()
    samples_of = {}
    for t in teachers:
        rows = heldout.get(t.route) or []
        if rows:
            samples_of[t.index] = _domain_rollouts(settings, rows, t.route, domains[t.route], t.index,
                                                   generator=generator, tokenizer=tokenizer, n=1,
                                                   seed=heldout_seed(settings), id_prefix="heldout")
    reader = None
    if prefill is not None and samples_of:
        from distill.cache import CacheReader

        if head_paths is None or cache_dir is None:
            raise ValueError("measure_heldout_kl: a prefill pool needs head_paths and cache_dir")
        shutil.rmtree(cache_dir, ignore_errors=True)  # a measurement killed earlier: start afresh
        teach_round(settings, [s for v in samples_of.values() for s in v], teachers, Path(cache_dir),
                    load_teacher=None, pad_id=pad_id, prefill=prefill)
        reader = CacheReader(cache_dir)
    try:
        for t in teachers:
            if t.index not in samples_of:
                continue
            if reader is None:
                model = load_teacher(t.model_dir)
                model.eval()
                teacher_logits = lambda s, ids, mask: _logits(model, ids)[mask]  # noqa: E731
            else:
                from distill.heads import TeacherHead

                model = TeacherHead.load(head_paths[t.index])
                teacher_logits = lambda s, ids, mask: model(  # noqa: E731
                    reader.get(s.sample_id).to(model.proj_weight.dtype)).float()
            total, tokens, per_prompt = 0.0, 0, []
            with torch.inference_mode():
                for s in samples_of[t.index]:
                    ids = torch.tensor([s.input_ids])  # (1, T)
                    mask = torch.tensor(s.loss_mask[1:]) > 0  # targets t >= 1, predicted at t - 1
                    if not bool(mask.any()):
                        per_prompt.append(0.0)
                        continue
                    log_ps = torch.log_softmax(_logits(student, ids)[mask], -1)  # (n, V)
                    log_pt = torch.log_softmax(teacher_logits(s, ids, mask), -1)  # (n, V)
                    d, _ = fn(log_ps, log_pt, settings.jsd_beta, False)
                    total += float(d.sum())
                    tokens += int(d.numel())
                    per_prompt.append(float(d.mean()))
            del model, teacher_logits
            gc.collect()
            out[t.name] = {"token_mean": total / max(tokens, 1), "per_prompt": per_prompt}
    finally:
        if reader is not None:
            reader.close()
            shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(T-1, V) float32 next-token logits of one sequence (1, T), on the host."""
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev)).logits[0, :-1].float().cpu()


def prefill_teacher(settings: OPDSettings, teacher: TeacherRef, routed: list[RolloutSample], cache_dir: Path, *,
                    load_teacher, pad_id: int) -> dict:
    """One teacher prefills the samples routed to it into its own cache directory."""
    from distill.cache import write_teacher_cache

    model = load_teacher(teacher.model_dir)
    stats = write_teacher_cache(model, teacher.index, teacher.name, routed, cache_dir,
                                batch_size=settings.prefill_batch_size, max_tokens=settings.prefill_tokens,
                                dtype=settings.cache_dtype,
                                shard_tokens=settings.shard_tokens, pad_token_id=pad_id)
    del model
    gc.collect()
    return stats


def teach_round(settings: OPDSettings, samples: list[RolloutSample], teachers: list[TeacherRef], cache_dir: Path, *,
                load_teacher, pad_id: int, prefill=None) -> dict:
    """Each teacher prefills the samples routed to it: in turn in this process (one model
    resident), or, with `prefill(settings, [(teacher, routed), ...], cache_dir, pad_id) ->
    {name: stats}` (pipeline.actors.TeacherPrefillPool), elsewhere and side by side, each
    writing its own directory. Temporary directories of writes killed earlier
    (`.teacher-NNN.tmp-*`, `.old-*`) are removed first: the reader ignores them, but they
    would hold their disk space forever."""
    import shutil

    from distill.cache import teacher_cache_complete

    for stale in [*cache_dir.glob(".teacher-*.tmp-*"), *cache_dir.glob(".teacher-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    todo = []
    for t in teachers:
        if teacher_cache_complete(cache_dir, t.index):
            continue  # written before an interruption
        routed = [s for s in samples if s.teacher_index == t.index]
        if routed:
            todo.append((t, routed))
    if prefill is not None and todo:
        return prefill(settings, todo, cache_dir, pad_id)
    return {t.name: prefill_teacher(settings, t, routed, cache_dir, load_teacher=load_teacher, pad_id=pad_id)
            for t, routed in todo}


def _micro_batch(samples: list[RolloutSample], plan, reader, *, pad_id: int, global_tokens: float, step: int,
                 row_weights: bool = False, advantages: bool = False, rollout_logprobs: bool = False) -> dict:
    from engine.batching import Sample, pad_rows

    chosen = [samples[i] for i in plan.sample_indices]
    if plan.rows is not None:  # packed: every per-token tensor in row layout, samples row by row
        return _packed_micro_batch(samples, plan, reader, pad_id=pad_id, global_tokens=global_tokens, step=step,
                                   row_weights=row_weights, advantages=advantages, rollout_logprobs=rollout_logprobs)
    batch = _with_teacher_states(pad_rows([Sample(s.input_ids, s.loss_mask) for s in chosen], pad_id),
                                 samples, plan, reader, global_tokens=global_tokens, step=step)
    if row_weights:  # sample_mean: each row's targets weigh 1 / its response tokens
        batch["row_token_weights"] = torch.tensor([1.0 / max(response_tokens(s), 1) for s in chosen])
    if advantages:  # the reward term (OPDSettings.reward_weight): each row's group advantage
        batch["advantages"] = torch.tensor([s.advantage for s in chosen], dtype=torch.float32)
    if rollout_logprobs:  # the sampler's log-prob of each token (B, T), for the reward term's ratio
        lp = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for i, s in enumerate(chosen):
            lp[i, :len(s.rollout_logprobs)] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        batch["rollout_logprobs"] = lp
    return batch


def _with_teacher_states(batch: dict, samples: list[RolloutSample], plan, reader, *, global_tokens: float,
                         step: int) -> dict:
    """`batch` plus the cached teacher states of the plan's samples, in its order (N, Ht)
    row-major over (sample, position), the teacher, the step and the loss divisor."""
    ids = [samples[i].sample_id for i in plan.sample_indices]
    (tb,) = list(reader.iter_minibatch(ids))  # one teacher per micro-batch by construction
    if tb.teacher_index != plan.teacher_index:
        raise RuntimeError(f"cache routes {ids[0]} to teacher {tb.teacher_index}, plan says {plan.teacher_index}")
    batch["teacher_hidden"] = tb.cat()
    batch["teacher_index"] = torch.tensor(plan.teacher_index)
    batch["opt_step"] = torch.tensor(step)
    batch["global_tokens"] = torch.tensor(float(global_tokens))
    return batch


def _packed_micro_batch(samples: list[RolloutSample], plan, reader, *, pad_id: int, global_tokens: float, step: int,
                        row_weights: bool, advantages: bool, rollout_logprobs: bool) -> dict:
    """`_micro_batch` for a packed plan (`plan.rows`): the rows (R, T) with positions restarting
    per sample, `loss_mask` in row layout (0 at every sample's first token), and per token the
    row weights, advantages and rollout log-probs. The loss takes the targets row-major, which
    is the rows' samples in order, each position ascending: the cache's order for these ids."""
    from engine.batching import pack_row_tensors, pack_token_values

    rows = [list(r) for r in plan.rows]
    T = max(sum(len(samples[i].input_ids) for i in r) for r in rows)  # the fullest row
    values = lambda f: {i: f(samples[i]) for r in rows for i in r}  # noqa: E731
    pack = lambda vals: pack_token_values(vals, rows, T)  # noqa: E731
    batch = pack_row_tensors([s.input_ids for s in samples], rows, T, pad_id)
    del batch["unpack_index"]  # the OPD loss reads its targets row-major, not per sample
    batch["loss_mask"] = pack(values(lambda s: [float(m) for m in s.loss_mask]))
    batch["loss_mask"][batch["position_ids"] == 0] = 0.0  # a sample's first token has no context in its row
    batch = _with_teacher_states(batch, samples, plan, reader, global_tokens=global_tokens, step=step)
    if row_weights:  # sample_mean: 1 / the sample's response tokens, at each of its tokens (R, T)
        batch["row_token_weights"] = pack(values(lambda s: [1.0 / max(response_tokens(s), 1)] * len(s.input_ids)))
    if advantages:  # the sample's group advantage at each of its tokens (R, T)
        batch["advantages"] = pack(values(lambda s: [float(s.advantage)] * len(s.input_ids)))
    if rollout_logprobs:  # (R, T)
        batch["rollout_logprobs"] = pack(values(lambda s: [float(x) for x in s.rollout_logprobs]))
    return batch


def response_tokens(sample: RolloutSample) -> int:
    """The targets the OPD loss takes from `sample` (loss-mask positions after the first)."""
    return sum(sample.loss_mask[1:])


def set_reward_advantages(samples: list[RolloutSample], rewards: list[float], group_size: int) -> None:
    """Each sample's `reward`, and its `advantage`: the reward z-scored within its prompt's
    group (`experts.advantages`' `grpo` estimator; a group of equal rewards gets 0). A
    round's samples are its prompts' groups back to back (`roll_out`: `out[i * n + j]`)."""
    from experts.advantages import compute_advantages

    if len(rewards) != len(samples) or len(samples) % group_size:
        raise ValueError(f"OPD rewards: {len(rewards)} rewards for {len(samples)} samples in groups of {group_size}")
    groups = [list(range(g, g + group_size)) for g in range(0, len(samples), group_size)]
    for idx in groups:
        if len({(samples[i].route, str(samples[i].row_id)) for i in idx}) != 1:
            raise ValueError(f"OPD rewards: samples {[samples[i].sample_id for i in idx]} are not one prompt's group")
    advantages = compute_advantages([[rewards[i] for i in idx] for idx in groups], "grpo")
    for idx, adv in zip(groups, advantages):
        for i, a in zip(idx, adv):
            samples[i].reward, samples[i].advantage = float(rewards[i]), float(a)


PG_METRICS = ("pg_ratio_mean", "pg_clip_frac_low", "pg_clip_frac_high", "pg_approx_kl")


def train_round(settings: OPDSettings, samples: list[RolloutSample], cache_dir: Path, *, trainer, loss_fn, pad_id: int,
                round_idx: int, step0: int, logger=None, version_steps: list[int] | None = None) -> tuple[list[dict], int]:
    """One round's optimiser steps. `version_steps[v]`: the optimiser steps in the weights of
    policy version v (the steps before round v); with it each step's record has
    `staleness_steps`, the most optimiser steps between the weights that sampled one of its
    samples (`policy_version`, the round if unset) and the weights it trains."""
    from distill.cache import CacheReader

    reader = CacheReader(cache_dir)
    teacher_of = [s.teacher_index for s in samples]
    step = step0
    records = []
    try:
        for epoch in range(settings.epochs_per_round):
            plan = plan_minibatches(teacher_of, settings.mini_batch_size, settings.micro_batch_size,
                                    seed=settings.seed * 100_003 + round_idx * 101 + epoch,
                                    micro_batch_tokens=settings.micro_batch_tokens,
                                    lengths=[len(s.input_ids) for s in samples])
            # the shard LRU sized so that this epoch maps each shard about once (<= 1.1x)
            capacity = reader.plan(reader.access_sequence(
                [samples[i].sample_id for i in mp.sample_indices] for micro in plan for mp in micro))
            bytes0, disk0 = reader.bytes_read, storage_read_bytes()
            for micro_plans in plan:
                divisors = loss_divisors([sum(response_tokens(samples[i]) for i in mp.sample_indices)
                                          for mp in micro_plans], [mp.teacher_index for mp in micro_plans],
                                         settings.loss_aggregation, [len(mp.sample_indices) for mp in micro_plans])
                mbs = [_micro_batch(samples, mp, reader, pad_id=pad_id, global_tokens=d, step=step,
                                    row_weights=settings.loss_aggregation == "sample_mean",
                                    advantages=settings.reward_weight > 0,
                                    rollout_logprobs=settings.reward_weight > 0 and settings.reward_ratio == "clip")
                       for mp, d in zip(micro_plans, divisors)]
                m = trainer.train_step(mbs, loss_fn)
                n = m["num_micro_batches"]
                ranks = m.get("rank_metrics") or [m]  # one entry per data-parallel rank
                rec = {"round": round_idx, "epoch": epoch, "step": step + 1, "loss": m["loss"], "grad_norm": m["grad_norm"],
                       "lr": m["lr"], "tokens_per_s": m["tokens_per_s"],
                       "head_loads": round(m.get("head_load_events", 0.0) * n),
                       "teachers_in_step": len({mp.teacher_index for mp in micro_plans}),
                       "resident_heads": max(r.get("resident_heads", 0.0) for r in ranks)}
                if version_steps is not None:
                    oldest = min(round_idx if samples[i].policy_version is None else samples[i].policy_version
                                 for mp in micro_plans for i in mp.sample_indices)
                    rec["staleness_steps"] = step - version_steps[oldest]
                rec.update({k: m[k] for k in PG_METRICS if k in m})
                if "rank_metrics" in m:  # per rank: head loads, and the teachers its share held
                    rec["head_loads_per_rank"] = [round(r.get("head_load_events", 0.0) * r["num_micro_batches"])
                                                  for r in ranks]
                    rec["teachers_per_rank"] = [sum(1 for k in r if k.startswith("kl_tokens/")) for r in ranks]
                for k, v in m.items():
                    if k.startswith("kl_sum/"):
                        t = k.split("/", 1)[1]
                        rec[f"kl/{t}"] = v / max(m.get(f"kl_tokens/{t}", 0.0), 1e-12)
                records.append(rec)
                if logger is not None:
                    logger.log({k: v for k, v in rec.items() if k != "step" and not isinstance(v, list)}, step=step + 1)
                step += 1
            if records:  # bytes of shards mapped this epoch / the cache's bytes
                records[-1]["cache_read_amplification"] = (reader.bytes_read - bytes0) / max(reader.total_bytes, 1)
                disk1 = storage_read_bytes()
                if disk0 is not None and disk1 is not None:  # what the page cache did not hold
                    records[-1]["disk_read_amplification"] = (disk1 - disk0) / max(reader.total_bytes, 1)
                records[-1]["cache_lru_shards"] = capacity
    finally:
        reader.close()
    return records, step


def route_teachers(teachers: list[TeacherRef]) -> dict[str, int]:
    """Route (domain, or domain@mode) -> teacher index; two teachers for one route is an
    error, never a silent overwrite (`pipeline.config` rejects such a config up front)."""
    out: dict[str, int] = {}
    for t in teachers:
        if t.route in out:
            raise ValueError(f"OPD: teachers {out[t.route]} and {t.index} both claim route {t.route!r}; "
                             "each route takes one teacher")
        out[t.route] = t.index
    return out


def remove_old_caches(out_dir: Path, upto_round: int, keep: int) -> None:
    """Delete the caches of rounds <= upto_round - keep and the rollout logs of rounds <=
    upto_round (their checkpoints exist; their rollouts are in rollouts.jsonl)."""
    import shutil

    for d in out_dir.glob("round-*"):
        try:
            r = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        if r <= upto_round - keep:
            shutil.rmtree(d / "cache", ignore_errors=True)
        if r <= upto_round:
            (d / "rollouts.wal").unlink(missing_ok=True)


def read_rollouts(path: Path) -> list[RolloutSample]:
    """A round's rollouts.jsonl (`RolloutSample.to_opd_record` per line)."""
    return [RolloutSample.from_opd_record(json.loads(line), f"{path}:{i + 1}")
            for i, line in enumerate(path.read_text().splitlines()) if line.strip()]


def run_opd(settings: OPDSettings, *, trainer, generator, tokenizer, prompts: dict[str, list[dict]],
            teachers: list[TeacherRef], domains: dict[str, DomainSpec], out_dir: str | Path, head_paths: list[str],
            load_teacher, checkpoints=None, logger=None, evaluate_student=None,
            heldout: dict[str, list[dict]] | None = None, load_student=None, prefill=None, score_rollouts=None) -> dict:
    """All rounds; resumes after the last completed round. Returns the stage metrics.

    With `heldout` (domain -> held-out prompt rows) and `load_student` (() -> a model of
    the student's architecture), the held-out KL is measured before round 0 and after
    every `settings.heldout_every`-th round and the last (`kl_heldout_per_teacher`).
    `prefill`: where the teach phase runs (`teach_round`); None = in this process.
    `score_rollouts` (samples -> verifier scores) is needed with `settings.reward_weight`:
    each round's samples are scored when drawn, and their rewards and advantages kept in
    its rollouts.jsonl."""
    from engine.atomic import atomic_write_jsonl

    out_dir = Path(out_dir)
    teacher_of_domain = route_teachers(teachers)
    streams = {d: PromptStream(rows, seed=settings.seed + i) for i, (d, rows) in enumerate(sorted(prompts.items()))}
    history: dict = {"kl_per_teacher": [], "kl_heldout_per_teacher": [], "student_scores": [], "head_loads_per_step": [],
                     "teachers_per_step": [], "max_resident_heads": 0, "cache_bytes_per_token": None,
                     "time": {"rollout": 0.0, "teach": 0.0, "train": 0.0}}
    start_round, step = 0, 0
    resume = checkpoints.latest() if checkpoints is not None else None  # verified (checksums)
    if resume is not None:
        extra = trainer.load_checkpoint(resume)
        start_round, step, history = extra["round"], extra["step"], extra["history"]
        for d, st in extra["streams"].items():
            streams[d].load_state_dict(st)
        generator.load_weights(trainer.state_dict())
    if settings.reward_weight > 0 and score_rollouts is None:
        raise ValueError("run_opd: opd.reward_weight > 0 needs score_rollouts (the routes' verifiers)")
    loss_fn = OPDLoss(head_paths, [t.weight for t in teachers], settings.divergence, settings.chunk_size,
                      settings.jsd_beta, reward_weight=settings.reward_weight,
                      reward_temperature=settings.temperature if settings.temperature > 0 else 1.0,
                      reward_ratio=settings.reward_ratio, reward_clip_low=settings.reward_clip_low,
                      reward_clip_high=settings.reward_clip_high)
    pad_id = tokenizer.pad_token_id
    from engine import weight_sync_check

    probe = weight_sync_check.probe_ids(tokenizer) if weight_sync_check.enabled() else None
    if probe is not None:  # the engine's start (or resume) weights, before any push
        history["weight_sync_gap_before"] = weight_sync_check.weight_sync_gap(generator, trainer, probe, pad_id=pad_id)
    measure = bool(heldout) and load_student is not None

    def heldout_kl(after_round: int) -> None:
        t = time.time()
        student = load_student()
        student.load_state_dict(trainer.state_dict())
        kl = measure_heldout_kl(settings, heldout, teachers, domains, generator=generator, tokenizer=tokenizer,
                                student=student, load_teacher=load_teacher, prefill=prefill,
                                head_paths=head_paths, cache_dir=out_dir / "heldout-cache", pad_id=pad_id)
        # manifest: both means per teacher; the per-prompt values (for paired comparisons
        # between measurements) in heldout_kl.jsonl, rewritten whole each time
        history.setdefault("kl_heldout_per_teacher", []).append(
            {"after_round": after_round, **{n: v["token_mean"] for n, v in kl.items()}})
        history.setdefault("kl_heldout_per_prompt_mean", []).append(
            {"after_round": after_round, **{n: sum(v["per_prompt"]) / max(len(v["per_prompt"]), 1)
                                            for n, v in kl.items()}})
        history.setdefault("heldout_per_prompt", []).append({"after_round": after_round,
                                                             **{n: v["per_prompt"] for n, v in kl.items()}})
        atomic_write_jsonl(out_dir / "heldout_kl.jsonl", history["heldout_per_prompt"])
        history["time"]["heldout"] = history["time"].get("heldout", 0.0) + time.time() - t
        if logger is not None:
            logger.log({f"heldout_kl/{k}": v["token_mean"] for k, v in kl.items()}, step=step)

    from engine.rollout_wal import RolloutWAL

    remove_old_caches(out_dir, start_round - 1, settings.keep_caches)  # killed after a checkpoint, before this
    if measure and start_round == 0 and not history.get("kl_heldout_per_teacher"):
        heldout_kl(0)  # before any training (kept in the round-0 checkpoint's history)
    version = {"generator": start_round}  # rounds of training in the generator's weights

    def prepare(r: int) -> _PreparedRound:
        """Round r's rollouts (from the generator's current weights) and teacher cache."""
        rdir = out_dir / f"round-{r}"
        t0 = time.time()
        rollouts_path = rdir / "rollouts.jsonl"
        wal = RolloutWAL(rdir / "rollouts.wal")  # finished domain batches, replayed after a kill
        counts = round_allocation(settings, teachers, history, r)  # from the rounds finished before r's rule
        if rollouts_path.is_file():
            samples, fresh = read_rollouts(rollouts_path), False
            for d in streams:  # the streams advanced when these rollouts were drawn
                streams[d].take(counts[d])
        else:
            samples, fresh = rollout_round(settings, streams, domains, teacher_of_domain, generator=generator,
                                           tokenizer=tokenizer, round_idx=r, wal=wal, counts=counts), True
            for s in samples:  # which weights sampled them (rounds of training in them; r unless pipelined)
                s.policy_version = version["generator"]
        wal_counts = wal.counts()
        wal.close()
        t1 = time.time()
        with ThreadPoolExecutor(1, thread_name_prefix="opd-score") as pool:
            # the verifiers (mostly sandboxed processes) score while the teachers prefill
            scoring = pool.submit(score_rollouts, samples) if fresh and settings.reward_weight > 0 else None
            teach_stats = teach_round(settings, samples, teachers, rdir / "cache", load_teacher=load_teacher,
                                      pad_id=pad_id, prefill=prefill)
            if scoring is not None:
                set_reward_advantages(samples, scoring.result(), settings.samples_per_prompt)
        if fresh:  # with the rewards: a resumed stage trains on the same advantages
            atomic_write_jsonl(rollouts_path, [s.to_opd_record(with_rewards=settings.reward_weight > 0)
                                               for s in samples])
        return _PreparedRound(samples, wal_counts, teach_stats, t1 - t0, time.time() - t1, counts)

    ahead: _Background | None = None  # pipelined: round r + 1's preparation, running during round r's training
    # while both run, the training thread and the preparing one each take half of torch's
    # intra-op threads (a per-thread setting with OpenMP), so they do not oversubscribe the cores
    threads = torch.get_num_threads()
    ahead_threads = threads // 2
    for r in range(start_round, settings.rounds):
        rdir = out_dir / f"round-{r}"
        t_wall = time.time()
        prep = ahead.result() if ahead is not None else prepare(r)
        samples, wal_counts, teach_stats = prep.samples, prep.wal_counts, prep.teach_stats
        # the checkpoint's stream positions: through this round's prompts (a resumed stage
        # re-takes the next round's when it finds that round's rollouts on disk)
        stream_state = {d: st.state_dict() for d, st in streams.items()}
        ahead = _Background(prepare, r + 1, threads=ahead_threads) \
            if settings.pipelined and r + 1 < settings.rounds else None
        if ahead is not None:
            torch.set_num_threads(threads - ahead_threads)
        t2 = time.time()
        version_steps = history.setdefault("version_steps", [])  # [v]: optimiser steps before round v
        del version_steps[r:]
        if len(version_steps) == r:  # else a checkpoint written before this was kept: no step staleness
            version_steps.append(step)
        try:
            records, step = train_round(settings, samples, rdir / "cache", trainer=trainer, loss_fn=loss_fn,
                                        pad_id=pad_id, round_idx=r, step0=step, logger=logger,
                                        version_steps=version_steps if len(version_steps) == r + 1 else None)
            log_rollout_samples(logger, samples, tokenizer, step, reward=settings.reward_weight > 0)
        finally:
            if ahead is not None:
                torch.set_num_threads(threads)
        t3 = time.time()
        if ahead is not None:
            ahead.wait()  # round r + 1 sampled from these weights: update the generator only after
        if settings.pipelined:
            versions = sorted({r if s.policy_version is None else s.policy_version for s in samples})
            history.setdefault("policy_version_per_round", []).append(versions)
            history.setdefault("staleness_per_round", []).append(r - min(versions))
            history.setdefault("time_per_round", []).append(time.time() - t_wall)
        if records and "staleness_steps" in records[-1]:  # the most optimiser steps a sample was old when trained
            history.setdefault("staleness_steps_per_round", []).append(max(rec["staleness_steps"] for rec in records))
        version["generator"] = r + 1
        generator.load_weights(trainer.state_dict())
        if probe is not None:  # POLYMATH_CHECK_WEIGHT_SYNC: the engine serves what the trainer holds
            history.setdefault("weight_sync_gap_per_round", []).append(
                weight_sync_check.weight_sync_gap(generator, trainer, probe, pad_id=pad_id))
            if logger is not None:
                logger.log({"weight_sync/logprob_gap": history["weight_sync_gap_per_round"][-1]}, step=step)
        _update_history(history, records, teachers, teach_stats, samples, (prep.rollout_s, prep.teach_s, t3 - t2))
        history.setdefault("prompts_per_round", []).append(prep.counts)
        if settings.reward_weight > 0:  # the student's mean training reward per route this round
            by_route: dict[str, list[float]] = {}
            for smp in samples:
                by_route.setdefault(smp.route, []).append(smp.reward)
            history.setdefault("reward_per_round", []).append({d: sum(v) / len(v) for d, v in sorted(by_route.items())})
        if evaluate_student is not None:
            history["student_scores"].append(evaluate_student(generator))
        if logger is not None:
            logger.log({f"round_kl/{k}": v for k, v in history["kl_per_teacher"][-1].items()}, step=step)
        if measure and ((r + 1) % settings.heldout_every == 0 or r + 1 == settings.rounds):
            heldout_kl(r + 1)
        tally = history.setdefault("rollout_wal", {})
        for k, v in wal_counts.items():
            tally[k] = tally.get(k, 0) + v
        amp = [rec["cache_read_amplification"] for rec in records if "cache_read_amplification" in rec]
        history.setdefault("cache_read_amplification", []).append(max(amp) if amp else None)
        disk = [rec["disk_read_amplification"] for rec in records if "disk_read_amplification" in rec]
        history.setdefault("disk_read_amplification", []).append(max(disk) if disk else None)
        history.setdefault("cache_bytes", []).append(dir_bytes(rdir / "cache"))
        if checkpoints is not None:
            checkpoints.save(trainer, step, {"round": r + 1, "step": step, "history": history,
                                             "streams": stream_state})
        # the largest the stage directory gets: the round's cache and its new checkpoint both there
        # (recorded in the next checkpoint and the returned metrics)
        history["disk_peak_bytes"] = max(history.get("disk_peak_bytes", 0), dir_bytes(out_dir))
        if checkpoints is not None:
            remove_old_caches(out_dir, r, settings.keep_caches)
    return {k: v for k, v in history.items() if k != "heldout_per_prompt"}  # those are in heldout_kl.jsonl


@dataclass
class _PreparedRound:
    samples: list[RolloutSample]
    wal_counts: dict
    teach_stats: dict
    rollout_s: float
    teach_s: float
    counts: dict[str, int]  # prompts per route (distill.allocation)


class _Background:
    """`fn(*args)` on a daemon thread (a failing stage exits without waiting for it), with
    `threads` intra-op threads (0: torch's default); `result()` joins and re-raises its
    error in the caller."""

    def __init__(self, fn, *args, threads: int = 0):
        import threading

        self._box: dict = {}

        def target():
            try:
                if threads:  # torch's intra-op threads, for this thread only
                    torch.set_num_threads(threads)
                self._box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 -- re-raised by result()
                self._box["error"] = exc

        self._thread = threading.Thread(target=target, name=f"opd-{getattr(fn, '__name__', 'task')}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()
        if "error" in self._box:
            raise RuntimeError(f"pipelined OPD: preparing the next round failed: "
                               f"{type(self._box['error']).__name__}: {self._box['error']}") from self._box["error"]

    def result(self):
        self.wait()
        return self._box["value"]


def _update_history(history, records, teachers, teach_stats, samples, times) -> None:
    names = {f"teacher{t.index}": t.name for t in teachers}
    kl: dict[str, list[float]] = {}
    # the round's KL is its first pass over fresh rollouts (on-policy); a later epoch
    # re-reads samples the student was just trained on, which would flatter the figure
    for rec in (r for r in records if r.get("epoch", 0) == 0):
        for k, v in rec.items():
            if k.startswith("kl/"):
                kl.setdefault(names.get(k[3:], k[3:]), []).append(v)
    history["kl_per_teacher"].append({n: sum(v) / len(v) for n, v in kl.items()})
    history["head_loads_per_step"] += [rec["head_loads"] for rec in records]
    history["teachers_per_step"] += [rec["teachers_in_step"] for rec in records]
    if records and "head_loads_per_rank" in records[0]:  # data-parallel ranks: [step][rank]
        history.setdefault("head_loads_per_rank", []).extend(rec["head_loads_per_rank"] for rec in records)
        history.setdefault("teachers_per_rank", []).extend(rec["teachers_per_rank"] for rec in records)
    history["max_resident_heads"] = int(math.ceil(max([history["max_resident_heads"]] +
                                                      [rec["resident_heads"] for rec in records])))
    bpt = [s["bytes_per_token"] for s in teach_stats.values()]
    if bpt:
        history["cache_bytes_per_token"] = sum(bpt) / len(bpt)
    for key, secs in zip(("rollout", "teach", "train"), times):
        history["time"][key] += secs
    history.setdefault("samples_per_round", []).append(len(samples))
    for key in PG_METRICS:  # the reward term's ratio to the sampler: the round's mean over its steps
        vals = [rec[key] for rec in records if key in rec]
        if vals:
            history.setdefault(f"{key}_per_round", []).append(sum(vals) / len(vals))
