"""Teacher-cache faults beyond tests/unit/test_cache.py: a damaged or missing manifest or
index is refused with a `CacheError` naming the file, and a disk-full error in the middle
of a shard write publishes no teacher directory (complete or absent) while a rerun does.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

import distill.cache as cache_mod
from distill.cache import CacheError, CacheReader, teacher_cache_complete, write_teacher_cache

torch.set_num_threads(1)
VOCAB, HIDDEN = 64, 32


@pytest.fixture(scope="module")
def teacher():
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def samples(n: int = 8, prefix: str = "s") -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"sample_id": f"{prefix}{i}", "input_ids": torch.randint(1, VOCAB, (6 + i,), generator=g).tolist(),
             "response_start": 3} for i in range(n)]


@pytest.fixture
def cache_dir(teacher, tmp_path):
    write_teacher_cache(teacher, 0, "math", samples(), tmp_path, batch_size=4, dtype="fp32", shard_tokens=10)
    write_teacher_cache(teacher, 1, "code", samples(3, "c"), tmp_path, batch_size=4, dtype="fp32", shard_tokens=10)
    return tmp_path


def _read_all(cache: Path) -> list:
    reader = CacheReader(cache, prefetch=False)
    try:
        return [h for _, _, h in reader.iter_samples()]
    finally:
        reader.close()


def _edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


MANIFEST_DAMAGE = {
    "truncated": (lambda d: (d / "manifest.json").write_bytes((d / "manifest.json").read_bytes()[:50]),
                  r"unreadable manifest .*teacher-001/manifest\.json"),
    "missing": (lambda d: (d / "manifest.json").unlink(), r"missing manifest .*teacher-001/manifest\.json"),
    "field_dropped": (lambda d: _edit_manifest(d, lambda m: m.pop("shards")), r"bad manifest .*teacher-001/manifest"),
    "unknown_dtype": (lambda d: _edit_manifest(d, lambda m: m.update(dtype="fp8")), r"bad manifest .*teacher-001"),
    "wrong_teacher": (lambda d: _edit_manifest(d, lambda m: m.update(teacher_index=0)),
                      r"manifest .*teacher-001/manifest\.json says teacher 0"),
    "shard_checksum": (lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(xxh3_128="0" * 32)),
                       r"corrupt shard .*teacher-001/shard-00000\.safetensors"),
    "shard_sha256_old_format": (lambda d: _edit_manifest(d, lambda m: (m["shards"][0].pop("xxh3_128"),
                                                                      m["shards"][0].update(sha256="0" * 64))),
                       r"corrupt shard .*teacher-001/shard-00000\.safetensors"),
    "shard_bytes": (lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(bytes=m["shards"][0]["bytes"] + 1)),
                    r"truncated shard .*teacher-001/shard-00000\.safetensors"),
    "index_checksum": (lambda d: _edit_manifest(d, lambda m: m.update(index_sha256="f" * 64)),
                       r"corrupt index .*teacher-001/index\.json"),
    "index_missing": (lambda d: (d / "index.json").unlink(), r"missing index .*teacher-001/index\.json"),
    "index_truncated": (lambda d: (d / "index.json").write_bytes((d / "index.json").read_bytes()[:30]),
                        r"(unreadable|corrupt) index .*teacher-001/index\.json"),
    "shard_missing": (lambda d: (d / "shard-00000.safetensors").unlink(),
                      r"missing shard .*teacher-001/shard-00000\.safetensors"),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest_index_or_shard_refused_naming_the_file(damage, cache_dir, fault_log):
    assert len(_read_all(cache_dir)) == 11  # intact first
    fn, pattern = MANIFEST_DAMAGE[damage]
    fn(cache_dir / "teacher-001")
    with pytest.raises(CacheError, match=pattern):
        _read_all(cache_dir)
    fault_log(f"cache: {damage.replace('_', ' ')}", "detected")


def test_disk_full_mid_shard_publishes_nothing_and_a_rerun_publishes(teacher, tmp_path, monkeypatch, fault_log):
    real = cache_mod.atomic_write_bytes
    calls = []

    def fail_on_second_shard(path, data):
        calls.append(Path(path).name)
        if len(calls) == 2:  # half of the second shard reaches the disk, then ENOSPC
            Path(str(path) + ".partial").write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    with monkeypatch.context() as mp:
        mp.setattr(cache_mod, "atomic_write_bytes", fail_on_second_shard)
        with pytest.raises(OSError) as info:
            write_teacher_cache(teacher, 0, "math", samples(), tmp_path, batch_size=4, dtype="fp32", shard_tokens=10)
    assert info.value.errno == errno.ENOSPC and calls[1].startswith("shard-")
    assert not teacher_cache_complete(tmp_path, 0)
    assert list(tmp_path.iterdir()) == []  # no teacher dir and no temporary dir left behind
    with pytest.raises(CacheError, match="no teacher-"):
        CacheReader(tmp_path)  # OPD training cannot start on it
    summary = write_teacher_cache(teacher, 0, "math", samples(), tmp_path, batch_size=4, dtype="fp32",
                                  shard_tokens=10)
    assert teacher_cache_complete(tmp_path, 0) and summary["samples"] == 8
    assert len(_read_all(tmp_path)) == 8
    fault_log("disk full mid cache shard write", "recovered")


def test_teach_round_removes_the_partial_writes_of_a_killed_run(teacher, tmp_path, fault_log):
    """A SIGKILL inside a cache write leaves `.teacher-NNN.tmp-*` (the reader ignores it); the
    next `teach_round` on that cache dir frees it (README Findings 9)."""
    from distill.opd import TeacherRef, teach_round
    from distill.opd_settings import OPDSettings

    stale = tmp_path / ".teacher-001.tmp-deadbeef"
    stale.mkdir()
    (stale / "shard-00000.safetensors").write_bytes(b"\0" * 4096)
    from engine.episode import RolloutSample

    rows = [RolloutSample(input_ids=s["input_ids"], loss_mask=[0] * 3 + [1] * (len(s["input_ids"]) - 3),
                          rollout_logprobs=[0.0] * len(s["input_ids"]), finish_reason="stop", text="",
                          reference=None, route="math", sample_id=s["sample_id"], teacher_index=0)
            for s in samples(4)]
    stats = teach_round(OPDSettings(cache_dtype="fp32"), rows, [TeacherRef(0, "math", "math", "unused", 1.0)],
                        tmp_path, load_teacher=lambda _dir: teacher, pad_id=0)
    assert not stale.exists() and not list(tmp_path.glob(".teacher-*"))
    assert teacher_cache_complete(tmp_path, 0) and stats["math"]["samples"] == 4
    fault_log("partial teacher cache dir left by a killed write", "recovered")
