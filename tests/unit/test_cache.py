"""Teacher hidden-state cache: exactness through the extracted head, order, corruption."""

import json
from pathlib import Path

import pytest
import torch

from distill.cache import (CacheError, CacheReader, compute_predicting_positions, teacher_cache_complete,
                           write_teacher_cache)
from distill.heads import HeadManager, TeacherHead, extract_head
from distill.kl import compute_chunked_divergence

torch.set_num_threads(1)
VOCAB = 89


def tiny_teacher(path: Path, seed: int):
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(20)  # logits of order 1, so the bf16 test has something to round
    model.save_pretrained(path)
    return model


def make_samples(prefix: str, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = 2 + i % 4, 1 + (3 * i) % 7
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        mask = [0] * p + [1] * r
        if r > 3:
            mask[p + 1] = 0  # a masked-out tool-output token inside the response
        out.append({"sample_id": f"{prefix}{i}", "input_ids": ids, "loss_mask": mask})
    out.append({"sample_id": f"{prefix}-empty", "input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]})
    out.append({"sample_id": f"{prefix}-start", "input_ids": [5, 6, 7, 8], "response_start": 2})
    return out


def own_forward(model, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's own full forward (unpadded, alone): (pre-norm states, logits) at the
    predicting positions, the states captured on the final norm's input."""
    ids = torch.tensor([sample["input_ids"]])
    seen = []
    hook = model.model.norm.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V)
    hook.remove()
    rows = compute_predicting_positions(sample)
    return seen[0][0][rows], logits[rows]


def own_logits(model, sample) -> torch.Tensor:
    return own_forward(model, sample)[1]


def test_predicting_positions_hand_worked():
    # mask [0,0,1,1,0,1]: targets t = 2, 3, 5, predicted from positions 1, 2, 4
    assert compute_predicting_positions({"input_ids": [9] * 6, "response_mask": [0, 0, 1, 1, 0, 1]}) == [1, 2, 4]
    # response_start 3 of 5 tokens: targets 3, 4 -> positions 2, 3
    assert compute_predicting_positions({"input_ids": [9] * 5, "response_start": 3}) == [2, 3]
    # a target at t = 0 has no predicting position
    assert compute_predicting_positions({"input_ids": [9] * 3, "loss_mask": [1, 1, 0]}) == [0]
    with pytest.raises(ValueError, match="'x'.*mask length"):
        compute_predicting_positions({"sample_id": "x", "input_ids": [1, 2], "loss_mask": [1]})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    model = tiny_teacher(root / "t0", seed=0)
    head = TeacherHead.load(extract_head(root / "t0", root / "t0" / "head.safetensors"))
    return model, head


def test_cache_exact_in_fp32_unpadded(teacher, tmp_path):
    model, head = teacher
    samples = make_samples("a", 9, seed=0)
    summary = write_teacher_cache(model, 0, "math", samples, tmp_path, batch_size=1, dtype="fp32",
                                  shard_tokens=10)
    reader = CacheReader(tmp_path)
    assert len(reader.manifests[0]["shards"]) > 2  # several shards
    assert summary["bytes_per_token"] > 64 * 4  # fp32 rows plus the safetensors header
    worst = 0.0
    for s in samples:
        cached = reader.get(s["sample_id"])  # (L, H)
        want_states, want_logits = own_forward(model, s)
        assert torch.equal(cached, want_states), s["sample_id"]  # the states, bit for bit
        rebuilt = head(cached)  # (L, V)
        with torch.no_grad():  # the head is the model's own norm + lm_head, bit for bit
            assert torch.equal(rebuilt, model.lm_head(model.model.norm(cached)))
        # vs the logits of the full forward: CPU sgemm rounding depends on the number of
        # rows (L rows here, T rows there), so equal to a few ulps, not bit for bit
        torch.testing.assert_close(rebuilt, want_logits, rtol=1e-6, atol=1e-5)
        worst = max([worst, *(rebuilt - want_logits).abs().flatten().tolist()])
    print(f"\nfp32 cache: max |rebuilt - own logits| = {worst:.2e}")
    assert reader.get("a-empty").shape == (0, 64)


def test_cache_padded_batches_match_to_float_tolerance(teacher, tmp_path):
    model, head = teacher
    samples = make_samples("b", 9, seed=1)
    write_teacher_cache(model, 0, "math", samples, tmp_path, batch_size=4, dtype="fp32", shard_tokens=16)
    reader = CacheReader(tmp_path)
    for s in samples:
        # right padding leaves the causal context of real tokens unchanged; only the
        # batched kernels' rounding differs
        torch.testing.assert_close(head(reader.get(s["sample_id"])), own_logits(model, s), rtol=1e-5, atol=1e-5)


def test_cache_bf16_to_tolerance(teacher, tmp_path):
    model, head = teacher
    samples = make_samples("c", 6, seed=2)
    summary = write_teacher_cache(model, 0, "math", samples, tmp_path, batch_size=3, dtype="bf16")
    reader = CacheReader(tmp_path)
    assert reader.get("c1").dtype == torch.bfloat16
    assert summary["bytes_per_token"] < 64 * 4  # half the fp32 size, plus the header
    for s in samples[:-2]:
        want = own_logits(model, s)
        got = head(reader.get(s["sample_id"]))
        assert (got - want).norm() / want.norm() < 1e-2


def test_multi_teacher_minibatch_order_and_self_kl_zero(tmp_path):
    models, paths, samples = [], [], {}
    for t in range(2):
        models.append(tiny_teacher(tmp_path / f"t{t}", seed=10 + t))
        paths.append(str(extract_head(tmp_path / f"t{t}", tmp_path / f"t{t}" / "head.safetensors")))
        samples[t] = make_samples(f"t{t}-", 5, seed=t)
        write_teacher_cache(models[t], t, f"dom{t}", samples[t], tmp_path / "cache", batch_size=2, dtype="fp32",
                            shard_tokens=8)
    reader = CacheReader(tmp_path / "cache")
    assert reader.teacher_indices == [0, 1] and teacher_cache_complete(tmp_path / "cache", 1)
    ids = ["t1-3", "t0-2", "t1-0", "t0-4", "t0-0"]
    batches = list(reader.iter_minibatch(ids))
    assert [(b.teacher_index, b.teacher_name, b.sample_ids) for b in batches] == [
        (0, "dom0", ["t0-2", "t0-4", "t0-0"]), (1, "dom1", ["t1-3", "t1-0"])]
    mgr = HeadManager(paths)
    mgr.begin_step()
    by_id = {s["sample_id"]: s for t in samples for s in samples[t]}
    for b in batches:
        h_t = b.cat()  # (N, H)
        assert torch.equal(h_t, torch.cat([reader.get(s) for s in b.sample_ids]))
        # the teacher as its own student: post-norm states and lm_head give KL = 0
        model = models[b.teacher_index]
        h_s = model.model.norm(h_t).detach()
        w = model.lm_head.weight.detach()
        _, kl = compute_chunked_divergence(h_s, w, h_t, mgr.activate(b.teacher_index), torch.ones(len(h_t)),
                                           chunk_size=5)
        assert kl.abs().max() < 1e-6
        assert len(h_t) == sum(len(compute_predicting_positions(by_id[s])) for s in b.sample_ids)
    assert mgr.end_step() == 2 and mgr.max_resident_heads == 1
    streamed = [(t, s) for t, s, _ in reader.iter_samples()]
    assert [t for t, _ in streamed] == sorted(t for t, _ in streamed) and len(streamed) == 14
    unfetched = CacheReader(tmp_path / "cache", prefetch=False)
    for (t, s, h) in reader.iter_samples():
        assert torch.equal(h, unfetched.get(s))
    assert reader.shard_loads > 0


@pytest.fixture
def cache_dir(teacher, tmp_path):
    model, _ = teacher
    write_teacher_cache(model, 0, "math", make_samples("d", 8, seed=3), tmp_path, batch_size=4, dtype="bf16",
                        shard_tokens=12)
    return tmp_path


def _all(reader):
    return [h for _, _, h in reader.iter_samples()]


def test_corrupt_shard_named(cache_dir):
    shard = cache_dir / "teacher-000" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the payload
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"corrupt shard .*teacher-000/shard-00001\.safetensors"):
        _all(CacheReader(cache_dir))


def test_truncated_shard_named(cache_dir):
    shard = cache_dir / "teacher-000" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CacheError, match=r"truncated shard .*teacher-000/shard-00000\.safetensors"):
        _all(CacheReader(cache_dir))


def test_missing_shard_named(cache_dir):
    (cache_dir / "teacher-000" / "shard-00002.safetensors").unlink()
    with pytest.raises(CacheError, match=r"missing shard .*shard-00002\.safetensors"):
        _all(CacheReader(cache_dir, prefetch=False))


def test_bad_index_named(cache_dir):
    d = cache_dir / "teacher-000"
    index = json.loads((d / "index.json").read_text())
    index["d1"]["offset"] = 10_000
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"corrupt index .*teacher-000/index\.json"):
        CacheReader(cache_dir)
    # an index that passes its checksum but does not fit the shards
    import hashlib

    manifest = json.loads((d / "manifest.json").read_text())
    manifest["index_sha256"] = hashlib.sha256((d / "index.json").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"bad index .*index\.json: entry 'd1'"):
        CacheReader(cache_dir)
    with pytest.raises(CacheError, match="no teacher-"):
        CacheReader(cache_dir / "nowhere")


def test_failed_write_leaves_nothing_and_rewrite_replaces(teacher, tmp_path):
    model, _ = teacher
    bad = make_samples("e", 4, seed=4) + [{"sample_id": "oops", "input_ids": [1, 2, 3], "loss_mask": [1]}]
    with pytest.raises(ValueError, match="oops"):
        write_teacher_cache(model, 0, "math", bad, tmp_path, batch_size=2, dtype="fp32")
    assert list(tmp_path.iterdir()) == []  # complete or absent: no teacher dir, no temp dir
    write_teacher_cache(model, 0, "math", bad[:2], tmp_path, dtype="fp32")
    write_teacher_cache(model, 0, "math", bad[2:4], tmp_path, dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher-000"]
    assert CacheReader(tmp_path).sample_ids() == ["e2", "e3"]


def test_size_shard_cache_is_the_smallest_lru_within_the_bound():
    from distill.cache import lru_shard_loads, size_shard_cache

    rng = __import__("random").Random(0)
    for _ in range(200):
        seq = [rng.randrange(rng.randrange(1, 9)) for _ in range(rng.randrange(1, 40))]
        distinct = len(set(seq))
        cap = size_shard_cache(seq, 1.1)
        # brute force: the first capacity that meets the bound
        want = next(c for c in range(1, distinct + 1) if lru_shard_loads(seq, c) <= 1.1 * distinct)
        assert cap == want
    assert lru_shard_loads([0, 1, 2, 0, 1, 2], 2) == 6 and lru_shard_loads([0, 1, 2, 0, 1, 2], 3) == 3


def test_reader_maps_views_verifies_once_and_a_planned_epoch_reads_each_shard_once(cache_dir):
    from distill.plan import plan_minibatches

    reader = CacheReader(cache_dir)
    ids = reader.sample_ids()
    first = {s: h.clone() for _, s, h in reader.iter_samples()}
    assert reader.verified_bytes == reader.total_bytes  # every shard checked once ...
    a, b = reader.get(ids[1]), reader.get(ids[1])
    assert a.data_ptr() == b.data_ptr()  # a view of the mapped shard, no per-sample copy
    steps = plan_minibatches([0] * len(ids), 4, 2, seed=1)
    batches = [[ids[i] for i in mp.sample_indices] for step in steps for mp in step]
    seq = reader.access_sequence(batches)
    assert len(set(seq)) == len(reader.manifests[0]["shards"]) and len(seq) > len(set(seq))
    from distill.cache import lru_shard_loads

    assert lru_shard_loads(seq, 1) > 1.1 * len(set(seq))  # a one-shard cache would re-read shards
    reader.close()
    reader = CacheReader(cache_dir)  # a new round: nothing mapped yet
    reader.plan(seq)
    before = reader.bytes_read
    for batch in batches:
        for tb in reader.iter_minibatch(batch):
            for s, h in zip(tb.sample_ids, tb.hidden):
                assert torch.equal(h, first[s])
    assert (reader.bytes_read - before) / reader.total_bytes <= 1.1
    assert reader.verified_bytes == reader.total_bytes  # ... and never again by this reader
    reader.close()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetch_keeps_depth_reads_in_flight_in_plan_order_and_changes_no_state(teacher, tmp_path, depth, monkeypatch):
    """The pool reads the next `prefetch_depth` shards of the plan while the consumer works
    (so the disk never waits for it), never more at once, in the plan's first-touch order;
    the states equal an unprefetched reader's and each shard is verified once."""
    import threading
    import time

    from distill.plan import plan_minibatches

    cache_dir = tmp_path
    write_teacher_cache(teacher[0], 0, "math", make_samples("d", 8, seed=3), cache_dir, batch_size=4, shard_tokens=5)
    plain = CacheReader(cache_dir, prefetch=False)
    ids = plain.sample_ids()
    steps = plan_minibatches([0] * len(ids), 4, 2, seed=2)
    batches = [[ids[i] for i in mp.sample_indices] for step in steps for mp in step]
    want = {s: plain.get(s).clone() for s in ids}
    reader = CacheReader(cache_dir, prefetch_depth=depth)
    seq = reader.access_sequence(batches)
    reader.plan(seq)
    assert len(set(seq)) >= 5
    lock, state, started = threading.Lock(), {"now": 0, "max": 0}, []
    orig = CacheReader._map_shard

    def slow_map(self, t, shard):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            started.append((t, shard))
        time.sleep(0.02)  # a disk read: long enough for the others to start if they may
        try:
            return orig(self, t, shard)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(CacheReader, "_map_shard", slow_map)
    for batch in batches:
        for tb in reader.iter_minibatch(batch):
            for s, h in zip(tb.sample_ids, tb.hidden):
                assert torch.equal(h, want[s])
    assert state["max"] == min(depth, len(set(seq)))  # parallel reads, bounded by the depth
    assert started[:len(set(seq))] == list(dict.fromkeys(seq))  # in the order training needs them
    assert reader.verified_bytes == reader.total_bytes
    reader.close()
    with pytest.raises(ValueError, match="prefetch_depth"):
        CacheReader(cache_dir, prefetch_depth=0)
