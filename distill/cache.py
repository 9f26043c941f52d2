"""The teacher hidden-state cache: one round's teacher states on disk, streamed to training.

Layout (docs/DESIGN.md section 5): `<cache_dir>/teacher-XXX/` per teacher, holding
`shard-NNNNN.safetensors` (one tensor `hidden`, [tokens, hidden], bf16 or fp32),
`index.json` (sample id -> teacher, shard, offset, length) and `manifest.json` (per-shard
bytes, sha256 and xxh3-128, the index's sha256, dtype, hidden size, teacher name and index). The
manifest is the completion marker: a teacher directory is built under a temporary name and
renamed into place whole, so it is complete or absent.

What is stored: the teacher's PRE-final-norm last-layer hidden state at each position that
predicts a response token. For a target token at position t (mask[t] = 1, t >= 1), the
logits come from position t - 1; a target at t = 0 has no predicting position and is not
stored. Rows follow the sample's targets in ascending t, the same row-major order as
`hidden[:, :-1][loss_mask[:, 1:] > 0]` on the student side. The pre-norm state is taken by
a forward pre-hook on the final norm module: in transformers 5.24 `hidden_states[-1]` is
the POST-norm state (`capture_outputs(tie_last_hidden_states=True)` overwrites the last
layer's output with `last_hidden_state`), so it cannot be used. The writer runs only the
base model (no lm_head, no (B, T, V) logits), in right-padded batches with an attention
mask and positions 0..L-1, which leave every real position's causal context unchanged.

The reader memory-maps each shard (no decode, no per-sample copy: a sample's states are a
view of the mapping) and verifies its size and checksum the first time the reader maps it
(once per reader, i.e. once per OPD round, not on every load): xxh3-128 where the manifest
has it (about 8 GB/s, so a cold read runs at the disk's speed; sha256 runs at ~1.3 GB/s per
core, slower than an NVMe disk), sha256 for caches written before it. It fails with a
`CacheError` naming the file on a missing, truncated or corrupt shard or a bad index.
Mapped shards sit in an LRU whose capacity the caller sizes from its access plan
(`size_shard_cache`), so a shard is mapped (read) about once per epoch. The shard being
waited for and the plan's next `prefetch_depth` shards are verified and mapped on a pool of
`prefetch_depth` threads, so the disk keeps `prefetch_depth` reads in flight however long the
consumer takes over the current shard (with one read ahead started only when the consumer
moved on, a cold epoch ran at 0.67-0.71 of `dd`; see BENCHMARKS.md section 3).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import xxhash
from safetensors.torch import save as safetensors_save

from distill.heads import get_head_spec
from engine.atomic import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}  # safetensors header dtype -> torch
_HASH_BLOCK = 16 * 1024 * 1024


class CacheError(RuntimeError):
    """A missing, truncated or corrupt cache file, or an inconsistent index."""


def teacher_dir_name(teacher_index: int) -> str:
    return f"teacher-{int(teacher_index):03d}"


def _field(sample, name: str, default=None):
    return sample.get(name, default) if isinstance(sample, dict) else getattr(sample, name, default)


def compute_predicting_positions(sample) -> list[int]:
    """Positions whose hidden state predicts a response token: t - 1 for each target t >= 1.

    Targets come from `response_mask` (or `loss_mask`, 1 = trained target, aligned with
    `input_ids`) or else `response_start` (targets are positions >= response_start).
    """
    n = len(_field(sample, "input_ids"))
    mask = _field(sample, "response_mask")
    mask = _field(sample, "loss_mask") if mask is None else mask
    if mask is None:
        start = _field(sample, "response_start")
        if start is None:
            raise ValueError(f"sample {_field(sample, 'sample_id')!r}: needs response_mask, loss_mask "
                             "or response_start")
        mask = [0] * int(start) + [1] * (n - int(start))
    if len(mask) != n:
        raise ValueError(f"sample {_field(sample, 'sample_id')!r}: mask length {len(mask)} != {n} input_ids")
    return [t - 1 for t in range(1, n) if mask[t]]


def forward_prenorm_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           position_ids: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states before the final norm, (B, T, H), from the base model only."""
    spec = get_head_spec(model.config.model_type)
    norm = model.get_submodule(spec.norm_module)
    base = model.get_submodule(spec.norm_module.rsplit(".", 1)[0]) if "." in spec.norm_module else model
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"final norm {spec.norm_module} ran {len(captured)} times in one forward")
    return captured[0]


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)  # (B, T)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
    pos = torch.arange(t).unsqueeze(0).expand(len(seqs), t).contiguous()  # (B, T)
    return ids, attn, pos


# ----------------------------------------------------------------------------- writer

class CacheWriter:
    """Collects one teacher's per-sample states into shards; `close()` publishes the directory."""

    def __init__(self, out_dir: str | Path, teacher_index: int, teacher_name: str, *, hidden_size: int,
                 dtype: str = "bf16", shard_tokens: int = 65536):
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype {dtype!r}; known: {sorted(CACHE_DTYPES)}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir, self.teacher_index, self.teacher_name = Path(out_dir), int(teacher_index), teacher_name
        self.hidden_size, self.dtype, self.shard_tokens = int(hidden_size), dtype, int(shard_tokens)
        self.final_dir = self.out_dir / teacher_dir_name(teacher_index)
        self.tmp_dir = self.out_dir / f".{self.final_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp_dir.mkdir(parents=True)
        self._buf: list[torch.Tensor] = []
        self._buf_rows = 0
        self._index: dict[str, dict] = {}
        self._shards: list[dict] = []

    def _shard_name(self) -> str:
        return f"shard-{len(self._shards):05d}.safetensors"

    def add(self, sample_id: str, hidden: torch.Tensor) -> None:
        """Append one sample's states, (L, H); a sample never spans two shards."""
        if sample_id in self._index:
            raise ValueError(f"sample id {sample_id!r} added twice to teacher {self.teacher_index}")
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"sample {sample_id!r}: hidden {tuple(hidden.shape)}, expected (L, {self.hidden_size})")
        n = hidden.shape[0]
        if self._buf_rows and self._buf_rows + n > self.shard_tokens:
            self._flush()
        entry = {"teacher_index": self.teacher_index, "teacher": self.teacher_name, "length": n,
                 "shard": self._shard_name() if n else None, "offset": self._buf_rows if n else 0}
        self._index[sample_id] = entry
        if n:
            self._buf.append(hidden.detach().to("cpu", CACHE_DTYPES[self.dtype]))
            self._buf_rows += n

    def _flush(self) -> None:
        if not self._buf_rows:
            return
        data = safetensors_save({"hidden": torch.cat(self._buf).contiguous()})  # (tokens, H)
        name = self._shard_name()
        atomic_write_bytes(self.tmp_dir / name, data)
        self._shards.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                             "xxh3_128": xxhash.xxh3_128_hexdigest(data), "tokens": self._buf_rows})
        self._buf, self._buf_rows = [], 0

    def close(self) -> dict:
        """Write the last shard, index and manifest; rename the directory into place."""
        self._flush()
        index_bytes = (json.dumps(self._index, indent=1, sort_keys=True) + "\n").encode()
        atomic_write_bytes(self.tmp_dir / "index.json", index_bytes)
        manifest = {"format_version": FORMAT_VERSION, "teacher_index": self.teacher_index,
                    "teacher_name": self.teacher_name, "dtype": self.dtype, "hidden_size": self.hidden_size,
                    "num_samples": len(self._index), "num_tokens": sum(s["tokens"] for s in self._shards),
                    "shard_tokens": self.shard_tokens, "shards": self._shards,
                    "index_sha256": hashlib.sha256(index_bytes).hexdigest()}
        atomic_write_json(self.tmp_dir / "manifest.json", manifest)
        old = self.out_dir / f".{self.final_dir.name}.old-{uuid.uuid4().hex[:8]}"
        if self.final_dir.exists():
            os.replace(self.final_dir, old)
        os.replace(self.tmp_dir, self.final_dir)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def prefill_chunks(lengths: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """The samples of each prefill forward, in order: `batch_size` at a time, or with
    `max_tokens` as many as fit in that many tokens (at least one)."""
    if max_tokens is None:
        return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]
    chunks, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return chunks + ([cur] if cur else [])


def _prefill_packed(model, seqs: list[list[int]], pad_token_id: int) -> list[torch.Tensor]:
    """Pre-norm hidden states (n_i, H) of each sequence, from one forward over them packed
    into rows as long as the longest (`engine.batching`: positions restart per sample and
    attention stays within each; `attention_mask=None` lets transformers build that mask)."""
    from engine.batching import pack_row_tensors, plan_packing, unpack_to_samples

    T = max(len(q) for q in seqs)
    rows = plan_packing([len(q) for q in seqs], T)
    b = pack_row_tensors(seqs, rows, T, pad_token_id)
    dev = next(model.parameters()).device
    hidden = forward_prenorm_hidden(model, b["input_ids"].to(dev), None, b["position_ids"].to(dev))  # (R, T, H)
    per = unpack_to_samples(hidden, b)  # (S, L, H), samples in row order
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for k, i in enumerate(r for row in rows for r in row):
        out[i] = per[k, :len(seqs[i])]
    return out  # type: ignore[return-value]


def write_teacher_cache(model, teacher_index: int, teacher_name: str, samples: Iterable, out_dir: str | Path, *,
                        batch_size: int = 32, dtype: str = "bf16", shard_tokens: int = 65536,
                        pad_token_id: int = 0, max_tokens: int | None = None) -> dict:
    """Prefill `samples` through `model` and cache the states that predict their response tokens.

    Each sample (dict or object) has `sample_id`, `input_ids` (prompt + response) and
    `response_mask` / `loss_mask` / `response_start`. Forwards take `batch_size` samples,
    right-padded; with `max_tokens` (padding-free) as many samples as fit in that many
    tokens, packed (`_prefill_packed`). Either way the samples are written in the order
    given, so the shards hold the same samples. Returns a summary: the teacher directory,
    samples, tokens, bytes, bytes_per_token and seconds.
    """
    t0 = time.perf_counter()
    samples = list(samples)
    writer = CacheWriter(out_dir, teacher_index, teacher_name, hidden_size=model.config.hidden_size,
                         dtype=dtype, shard_tokens=shard_tokens)
    try:
        model.eval()
        with torch.inference_mode():
            dev = next(model.parameters()).device
            for chunk in prefill_chunks([len(_field(s, "input_ids")) for s in samples], batch_size, max_tokens):
                batch = [samples[i] for i in chunk]
                seqs = [list(_field(s, "input_ids")) for s in batch]
                if max_tokens is None:
                    ids, attn, pos = _right_pad(seqs, pad_token_id)
                    hidden = forward_prenorm_hidden(model, ids.to(dev), attn.to(dev), pos.to(dev))  # (B, T, H)
                else:
                    hidden = _prefill_packed(model, seqs, pad_token_id)  # [(n_i, H)]
                for i, s in enumerate(batch):
                    rows = torch.tensor(compute_predicting_positions(s), dtype=torch.long, device=dev)
                    writer.add(str(_field(s, "sample_id")), hidden[i].index_select(0, rows))  # (L, H)
        manifest = writer.close()
    except BaseException:
        writer.abort()
        raise
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    return {"dir": str(writer.final_dir), "samples": manifest["num_samples"], "tokens": manifest["num_tokens"],
            "bytes": total_bytes, "bytes_per_token": total_bytes / max(manifest["num_tokens"], 1),
            "seconds": time.perf_counter() - t0}


def teacher_cache_complete(cache_dir: str | Path, teacher_index: int) -> bool:
    """Whether the teacher's directory was published (its manifest exists); for resume."""
    return (Path(cache_dir) / teacher_dir_name(teacher_index) / "manifest.json").is_file()


# ----------------------------------------------------------------------------- reader

@dataclass
class TeacherBatch:
    """One teacher's samples of a mini-batch, with their cached states (each (L_i, H))."""

    teacher_index: int
    teacher_name: str
    sample_ids: list[str]
    hidden: list[torch.Tensor]

    def cat(self) -> torch.Tensor:
        return torch.cat(self.hidden) if self.hidden else torch.zeros(0, 0)  # (sum L_i, H)


def _load_json(path: Path, what: str) -> tuple[dict, bytes]:
    if not path.is_file():
        raise CacheError(f"missing {what} {path}")
    try:
        data = path.read_bytes()
        return json.loads(data), data
    except ValueError as e:
        raise CacheError(f"unreadable {what} {path}: {e}") from e


def lru_shard_loads(sequence: list, capacity: int) -> int:
    """How many times an LRU of `capacity` entries loads a key when `sequence` is accessed in order."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    lru: OrderedDict = OrderedDict()
    loads = 0
    for key in sequence:
        if key in lru:
            lru.move_to_end(key)
            continue
        loads += 1
        lru[key] = None
        if len(lru) > capacity:
            lru.popitem(last=False)
    return loads


def size_shard_cache(sequence: list, max_amplification: float = 1.1) -> int:
    """The smallest LRU capacity (in shards) under which accessing `sequence` loads at most
    `max_amplification` times the distinct shards' count. LRU is a stack algorithm (a larger
    cache never loads more), so a binary search finds it; the number of distinct shards
    always qualifies (each is loaded once)."""
    distinct = len(set(sequence))
    if distinct == 0:
        return 1
    lo, hi = 1, distinct
    while lo < hi:
        mid = (lo + hi) // 2
        if lru_shard_loads(sequence, mid) <= max_amplification * distinct:
            hi = mid
        else:
            lo = mid + 1
    return lo


class CacheReader:
    """Reads a round's cache directory: memory-mapped shards, each verified once per reader.

    `max_cached_shards` bounds the LRU of mapped shards (`size_shard_cache` sizes it from
    an access plan); `shard_loads` / `bytes_read` count the maps (each maps the whole shard,
    so `bytes_read` is the shard bytes brought in), `verified_bytes` the bytes checksummed.
    A mapped shard costs address space, not memory: its pages are the kernel's page cache.
    """

    def __init__(self, cache_dir: str | Path, *, prefetch: bool = True, max_cached_shards: int = 2,
                 prefetch_depth: int = 2):
        self.cache_dir = Path(cache_dir)
        self.manifests: dict[int, dict] = {}
        self._where: dict[str, tuple[int, str | None, int, int]] = {}  # id -> (teacher, shard, offset, length)
        dirs = sorted(p for p in self.cache_dir.glob("teacher-*") if p.is_dir())
        if not dirs:
            raise CacheError(f"no teacher-* directories in cache {self.cache_dir}")
        for d in dirs:
            self._load_teacher(d)
        self._meta = {(t, s["file"]): s for t, m in self.manifests.items() for s in m["shards"]}
        self._cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._max_cached = max(1, max_cached_shards)
        self._verified: set[tuple[int, str]] = set()
        if prefetch_depth < 1:
            raise ValueError(f"CacheReader: prefetch_depth must be >= 1, got {prefetch_depth}")
        self._depth = prefetch_depth
        self._pool = (ThreadPoolExecutor(max_workers=prefetch_depth, thread_name_prefix="shard-prefetch")
                      if prefetch else None)
        self._pending: OrderedDict[tuple[int, str], Future] = OrderedDict()  # mapping now, in need order
        self._order: list[tuple[int, str]] = []  # first-touch order of the planned accesses (prefetch)
        self._order_pos: dict[tuple[int, str], int] = {}
        self.shard_loads = 0
        self.bytes_read = 0
        self.verified_bytes = 0

    def _load_teacher(self, d: Path) -> None:
        manifest, _ = _load_json(d / "manifest.json", "manifest")
        missing = {"teacher_index", "teacher_name", "dtype", "hidden_size", "num_tokens", "shards",
                   "index_sha256"} - set(manifest)
        if missing or manifest["dtype"] not in CACHE_DTYPES:
            raise CacheError(f"bad manifest {d / 'manifest.json'}: missing {sorted(missing)} or unknown dtype")
        t = int(manifest["teacher_index"])
        if d.name != teacher_dir_name(t):
            raise CacheError(f"manifest {d / 'manifest.json'} says teacher {t}, directory is {d.name}")
        index, raw = _load_json(d / "index.json", "index")
        if hashlib.sha256(raw).hexdigest() != manifest.get("index_sha256"):
            raise CacheError(f"corrupt index {d / 'index.json'}: sha256 differs from {d / 'manifest.json'}")
        shards = {s["file"]: s for s in manifest["shards"]}
        for sid, e in index.items():
            e = e if isinstance(e, dict) else {}
            shard, off, n = e.get("shard"), e.get("offset"), e.get("length")
            ok = (e.get("teacher_index") == t and isinstance(off, int) and isinstance(n, int) and off >= 0
                  and n >= 0 and ((n == 0 and shard is None) or (shard in shards and off + n <= shards[shard]["tokens"])))
            if not ok:
                raise CacheError(f"bad index {d / 'index.json'}: entry {sid!r} = {e} does not fit {d / 'manifest.json'}")
            if sid in self._where:
                raise CacheError(f"bad index {d / 'index.json'}: sample {sid!r} also cached for teacher "
                                 f"{self._where[sid][0]}")
            self._where[sid] = (t, shard, off, n)
        if sum(e["length"] for e in index.values()) != manifest["num_tokens"]:  # entries checked above
            raise CacheError(f"bad index {d / 'index.json'}: lengths do not sum to the manifest's num_tokens")
        self.manifests[t] = manifest

    # -- metadata
    @property
    def teacher_indices(self) -> list[int]:
        return sorted(self.manifests)

    @property
    def total_bytes(self) -> int:
        """Bytes of all shards of the cache."""
        return sum(int(s["bytes"]) for s in self._meta.values())

    def teacher_of(self, sample_id: str) -> int:
        return self._entry(sample_id)[0]

    def shard_of(self, sample_id: str) -> tuple[int, str] | None:
        """(teacher, shard file) holding the sample's states; None for a sample with none."""
        t, shard, _, _ = self._entry(sample_id)
        return None if shard is None else (t, shard)

    def sample_ids(self, teacher_index: int | None = None) -> list[str]:
        """Sample ids in teacher order, then storage order."""
        keys = sorted(self._where, key=lambda s: (self._where[s][0], self._where[s][1] or "", self._where[s][2]))
        return [s for s in keys if teacher_index is None or self._where[s][0] == teacher_index]

    def _entry(self, sample_id: str):
        try:
            return self._where[sample_id]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} is not in cache {self.cache_dir}") from None

    def access_sequence(self, minibatches: Iterable[Iterable[str]]) -> list[tuple[int, str]]:
        """The shards `iter_minibatch` maps, in order, when called once per id list."""
        seq: list[tuple[int, str]] = []
        for ids in minibatches:
            keys = {self.shard_of(s) for s in ids} - {None}
            seq += sorted(keys)
        return seq

    def plan(self, sequence: list[tuple[int, str]], max_amplification: float = 1.1) -> int:
        """Size the shard LRU for `sequence` (see `size_shard_cache`) and prefetch in its
        first-touch order; returns the capacity."""
        self._max_cached = size_shard_cache(sequence, max_amplification)
        self._order = list(dict.fromkeys(sequence))
        self._order_pos = {k: i for i, k in enumerate(self._order)}
        return self._max_cached

    # -- shards
    def _shard_path(self, t: int, shard: str) -> Path:
        return self.cache_dir / teacher_dir_name(t) / shard

    def _map_shard(self, t: int, shard: str) -> tuple[torch.Tensor, int]:
        """Map a shard (verifying its checksum the first time); returns (hidden (tokens, H)
        viewing the mapping, bytes checksummed now)."""
        path, meta, m = self._shard_path(t, shard), self._meta[(t, shard)], self.manifests[t]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CacheError(f"missing shard {path}") from None
        try:
            size = os.fstat(fd).st_size
            if size != meta["bytes"]:
                raise CacheError(f"truncated shard {path}: {size} bytes, manifest says {meta['bytes']}")
            if size == 0:
                raise CacheError(f"unreadable shard {path}: empty")
            if hasattr(os, "posix_fadvise"):  # start the kernel's read-ahead of the whole file
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # private: a write never reaches the file
        finally:
            os.close(fd)
        checked = 0
        if (t, shard) not in self._verified:
            view = memoryview(mm)
            fast = "xxh3_128" in meta
            h = xxhash.xxh3_128() if fast else hashlib.sha256()
            for start in range(0, size, _HASH_BLOCK):
                h.update(view[start:start + _HASH_BLOCK])
            view.release()
            if h.hexdigest() != (meta["xxh3_128"] if fast else meta["sha256"]):
                raise CacheError(f"corrupt shard {path}: {'xxh3_128' if fast else 'sha256'} differs from the manifest")
            checked = size
        try:
            n = int.from_bytes(mm[:8], "little")
            header = json.loads(mm[8:8 + n])
            entry = header["hidden"]
            dtype, shape, (begin, end) = _ST_DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
            raise CacheError(f"unreadable shard {path}: bad safetensors header ({e})") from e
        want = (meta["tokens"], m["hidden_size"])
        if shape != want or dtype != CACHE_DTYPES[m["dtype"]] or end - begin != want[0] * want[1] * dtype.itemsize \
                or 8 + n + end > size:
            raise CacheError(f"shard {path}: {shape} {dtype} does not match the manifest")
        hidden = torch.frombuffer(mm, dtype=dtype, count=want[0] * want[1], offset=8 + n + begin).view(want)
        return hidden, checked

    def _shard(self, key: tuple[int, str], upcoming: list[tuple[int, str]] = ()) -> torch.Tensor:
        """The verified shard (tokens, H). Keeps the next `prefetch_depth` shards to be needed
        (the plan's first touches after `key` where the reader has a plan, else `upcoming`)
        mapping and verifying on the pool's threads, so the disk never waits on the consumer."""
        if key in self._order_pos:  # planned: the plan's next shards not yet mapped
            upcoming = self._order[self._order_pos[key] + 1:]
        if key in self._cache:
            self._cache.move_to_end(key)
            hidden = self._cache[key]
            self._prefetch(upcoming)
        else:
            self._prefetch([key, *upcoming])  # before waiting: the next shards' reads start now
            pending = self._pending.pop(key, None)
            hidden, checked = pending.result() if pending is not None else self._map_shard(*key)
            self._verified.add(key)
            self.verified_bytes += checked
            self.shard_loads += 1
            self.bytes_read += int(self._meta[key]["bytes"])
            self._cache[key] = hidden
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return hidden

    def _prefetch(self, upcoming: Iterable[tuple[int, str]]) -> None:
        """Map the next `prefetch_depth` not-yet-mapped shards of `upcoming` in the background;
        cancels prefetches no longer among them."""
        if self._pool is None:
            return
        want: list[tuple[int, str]] = []
        for k in upcoming:
            if len(want) == self._depth + 1:  # the needed shard and `depth` more: one queued behind the pool
                break
            if k not in self._cache and k not in want:
                want.append(k)
        for k in [k for k in self._pending if k not in want]:
            self._pending.pop(k).cancel()  # a running one finishes and is dropped
        for k in want:
            if k not in self._pending:
                self._pending[k] = self._pool.submit(self._map_shard, *k)

    def get(self, sample_id: str) -> torch.Tensor:
        """One sample's states, (L, H): a view of the mapped shard (copy it before writing)."""
        t, shard, off, n = self._entry(sample_id)
        if shard is None:
            return self._empty(t)
        return self._shard((t, shard))[off:off + n]

    def _empty(self, t: int) -> torch.Tensor:
        m = self.manifests[t]
        return torch.zeros(0, m["hidden_size"], dtype=CACHE_DTYPES[m["dtype"]])

    def _stream(self, ids: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(sample_id, states) for `ids`, shard by shard in (teacher, shard) order, prefetching."""
        by_shard: dict[tuple[int, str | None], list[str]] = {}
        for sid in ids:
            t, shard, _, _ = self._entry(sid)
            by_shard.setdefault((t, shard), []).append(sid)
        plan = sorted(by_shard, key=lambda k: (k[0], k[1] or ""))
        loaded = [k for k in plan if k[1] is not None]
        after = {k: loaded[i + 1:i + 1 + self._depth] for i, k in enumerate(loaded)}
        for key in plan:
            if key[1] is None:
                yield from ((sid, self._empty(key[0])) for sid in by_shard[key])
                continue
            hidden = self._shard(key, after[key])  # (tokens, H), a view of the mapping
            for sid in by_shard[key]:
                _, _, off, n = self._where[sid]
                yield sid, hidden[off:off + n]

    # -- streaming
    def iter_minibatch(self, sample_ids: Iterable[str]) -> Iterator[TeacherBatch]:
        """One TeacherBatch per teacher present, in ascending teacher order.

        Inside a teacher the caller's order is kept. Shards are visited in order, the next
        ones mapped on the prefetch pool while the current one is sliced; the states are
        views of the mapped shards (`TeacherBatch.cat` makes the one copy).
        """
        ids = list(sample_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("iter_minibatch: duplicate sample ids")
        by_teacher: dict[int, list[str]] = {}
        for sid in ids:
            by_teacher.setdefault(self._entry(sid)[0], []).append(sid)
        got: dict[str, torch.Tensor] = {}
        stream = self._stream(ids)  # teacher-major: a teacher's states are complete before the next's
        for t in sorted(by_teacher):
            while len(got) < len(by_teacher[t]):
                sid, hidden = next(stream)
                got[sid] = hidden
            yield TeacherBatch(t, self.manifests[t]["teacher_name"], by_teacher[t], [got.pop(s) for s in by_teacher[t]])

    def iter_samples(self) -> Iterator[tuple[int, str, torch.Tensor]]:
        """(teacher_index, sample_id, hidden (L, H) view) for every sample, teacher by
        teacher, streamed one shard at a time."""
        for sid, hidden in self._stream(self.sample_ids()):
            yield self._where[sid][0], sid, hidden

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self._cache.clear()
