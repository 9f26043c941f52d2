"""The teacher hidden-state cache: bytes per token, and read throughput of `CacheReader`.

    python -m bench.bench_cache [--quick] [--repeats N] [--mib N]

1. Bytes per cached token for real model shapes: the hidden state (hidden x dtype bytes),
   full logits (vocab x dtype bytes) and top-k=64 logits (64 values + 64 int32 indices),
   computed; plus the bytes per token measured on a cache written by `CacheWriter`
   (safetensors headers included, index/manifest excluded).
2. Read throughput over the same shard files (bf16, hidden 4096, `--mib` MiB in all):
   `CacheReader.iter_samples()` (map, checksum once per reader, prefetch thread), each
   sample copied once into a reused buffer as the trainer's batch assembly does (so every
   byte is touched: a view alone would measure nothing), vs a plain sequential read in
   1 MiB blocks (`readinto`) vs `dd bs=1M`. Cold = a fresh reader (a new round: it maps and
   verifies every shard) on files evicted before each run with `posix_fadvise(DONTNEED)`
   per file (no root needed, touches no other process's pages), checked with `fincore`
   when it is installed; warm = a further epoch through the same reader (shards verified,
   files in the page cache), and for readinto/dd a read of files in the page cache. The
   methods are interleaved round by round (the virtual disk's rate drifts by 2x over
   seconds), and the ratios are given both from the medians and as the median of each
   round's ratio.
3. Read amplification of one OPD epoch: bytes of shards the reader maps during an epoch of
   `distill.plan` mini-batches (random, teacher-mixed, as OPD trains) over the same cache,
   divided by the cache's bytes, with the LRU sized from the plan (`CacheReader.plan`) and,
   for comparison, with the fixed two-shard LRU the reader had before.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import MIB, fmt, print_table, set_threads, summarize, write_results

SHAPES = {  # name: (hidden, vocab), from the models' config.json
    "Qwen3-8B": (4096, 151936), "Qwen3-1.7B": (2048, 151936), "Llama-3.1-8B": (4096, 128256),
    "Qwen2.5-0.5B": (896, 151936), "polymath tiny": (128, 120)}
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
TOPK = 64


def compute_bytes_per_token(hidden: int, vocab: int, dtype_bytes: int, topk: int = TOPK) -> dict:
    """hidden: H*b; full logits: V*b; top-k: k*(b + 4) (values + int32 indices)."""
    return {"hidden_bytes": hidden * dtype_bytes, "full_logits_bytes": vocab * dtype_bytes,
            "topk_bytes": topk * (dtype_bytes + 4)}


def write_cache(root: Path, total_mib: int, hidden: int = 4096, sample_len: int = 128) -> dict:
    """A bf16 cache of random states, `total_mib` MiB, shards of 1/4 of it."""
    import torch

    from distill.cache import CacheWriter

    per_token = hidden * 2
    tokens = total_mib * MIB // per_token
    n_samples = max(4, tokens // sample_len)
    shard_tokens = max(sample_len, (n_samples // 4) * sample_len)
    w = CacheWriter(root, 0, "t0", hidden_size=hidden, dtype="bf16", shard_tokens=shard_tokens)
    g = torch.Generator().manual_seed(0)
    for i in range(n_samples):
        w.add(f"s{i:06d}", torch.randn(sample_len, hidden, generator=g))
    m = w.close()
    files = [root / "teacher-000" / s["file"] for s in m["shards"]]
    total = sum(f.stat().st_size for f in files)
    return {"files": files, "bytes": total, "tokens": m["num_tokens"], "bytes_per_token": total / m["num_tokens"],
            "hidden": hidden, "samples": n_samples}


def evict(files: list[Path]) -> str:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(files)


def resident_fraction(files: list[Path]) -> str:
    """Share of the files' pages in the page cache, from `fincore` ('?' without it)."""
    if shutil.which("fincore") is None:
        return "?"
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, files)],
                         capture_output=True, text=True)
    try:
        pairs = [tuple(map(int, ln.split())) for ln in out.stdout.splitlines() if ln.strip()]
        return f"{sum(r for r, _ in pairs) / max(sum(s for _, s in pairs), 1):.2f}"
    except ValueError:
        return "?"


def read_plain(files: list[Path]) -> int:
    buf = bytearray(MIB)
    view, n = memoryview(buf), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while (k := fh.readinto(view)) > 0:
                n += k
    return n


def read_dd(files: list[Path]) -> int:
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    return sum(f.stat().st_size for f in files)


def consume(reader) -> int:
    """One pass of `reader.iter_samples()`, each sample copied into a reused buffer."""
    import torch

    buf, n = None, 0
    for _t, _sid, hidden in reader.iter_samples():
        if buf is None or buf.shape[0] < hidden.shape[0]:
            buf = torch.empty(max(hidden.shape[0], 1024), hidden.shape[1], dtype=hidden.dtype)
        buf[:hidden.shape[0]].copy_(hidden)
        n += hidden.numel() * hidden.element_size()
    return n


def measure_reads(cache: dict, cache_dir: Path, repeats: int) -> list[dict]:
    from distill.cache import CacheReader

    files, rows = cache["files"], []
    warm_reader = CacheReader(cache_dir)
    consume(warm_reader)  # its first epoch: maps and verifies; the timed ones are later epochs
    methods = {"CacheReader.iter_samples": {"cold": lambda: _fresh_epoch(cache_dir), "warm": lambda: consume(warm_reader)},
               "plain readinto 1 MiB": {"cold": lambda: read_plain(files), "warm": lambda: read_plain(files)}}
    if shutil.which("dd"):
        methods["dd bs=1M"] = {"cold": lambda: read_dd(files), "warm": lambda: read_dd(files)}
    for state in ("warm", "cold"):  # warm first: the warm reader is closed before any eviction
        rates: dict[str, list[float]] = {name: [] for name in methods}
        resident: dict[str, list[str]] = {name: [] for name in methods}
        for _ in range(repeats):  # methods interleaved in each round: the disk's rate drifts over seconds
            for name, fns in methods.items():
                resident[name].append(evict(files) if state == "cold" else (read_plain(files) and resident_fraction(files)))
                t0 = time.perf_counter()
                fns[state]()
                rates[name].append(cache["bytes"] / MIB / (time.perf_counter() - t0))
        if state == "warm":
            warm_reader.close()  # a mapped page cannot be evicted: unmap before the cold runs
        rows += [{"state": state, "method": name, "mib_per_s": summarize(rates[name]), "rates": rates[name],
                  "resident_fraction_before": resident[name]} for name in methods]
    return rows


def paired_ratio(reads: list[dict], state: str, method: str, base: str) -> float | None:
    """Median over rounds of method's rate / base's rate in the same round (None if base is absent)."""
    rates = {r["method"]: r["rates"] for r in reads if r["state"] == state}
    if base not in rates:
        return None
    return statistics.median(a / b for a, b in zip(rates[method], rates[base]))


def _fresh_epoch(cache_dir: Path) -> int:
    from distill.cache import CacheReader

    reader = CacheReader(cache_dir)
    try:
        return consume(reader)
    finally:
        reader.close()


def measure_amplification(cache_dir: Path, mini_batch_size: int = 64, micro_batch_size: int = 16) -> dict:
    """Shard bytes mapped in one epoch of OPD mini-batches / cache bytes (planned LRU and
    the former fixed two-shard LRU, the latter by simulation of the same accesses)."""
    from distill.cache import CacheReader, lru_shard_loads
    from distill.plan import plan_minibatches

    reader = CacheReader(cache_dir)
    try:
        ids = reader.sample_ids()
        steps = plan_minibatches([reader.teacher_of(s) for s in ids], mini_batch_size, micro_batch_size, seed=0)
        batches = [[ids[i] for i in mp.sample_indices] for step in steps for mp in step]
        seq = reader.access_sequence(batches)
        capacity = reader.plan(seq)
        for b in batches:
            for tb in reader.iter_minibatch(b):
                tb.cat()
        shard_bytes = reader.total_bytes / max(len(set(seq)), 1)
        return {"shards": len(set(seq)), "mini_batches": len(steps), "planned_capacity": capacity,
                "planned_amplification": reader.bytes_read / reader.total_bytes,
                "two_shard_lru_amplification": lru_shard_loads(seq, 2) * shard_bytes / reader.total_bytes}
    finally:
        reader.close()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--mib", type=int, default=None, help="cache size to read")
    p.add_argument("--out", default=None)
    p.add_argument("--inprocess", action="store_true", help="accepted for symmetry; this benchmark has no children")
    opts = p.parse_args(argv)
    set_threads(1)
    repeats = opts.repeats or (1 if opts.quick else 5)
    mib = opts.mib or (8 if opts.quick else 256)
    shapes = [{"model": name, "hidden_size": h, "vocab": v, "dtype": d, **compute_bytes_per_token(h, v, b)}
              for name, (h, v) in SHAPES.items() for d, b in DTYPE_BYTES.items()]
    for s in shapes:
        s["full_over_hidden"] = s["full_logits_bytes"] / s["hidden_bytes"]
        s["topk_over_hidden"] = s["topk_bytes"] / s["hidden_bytes"]
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        cache_dir = Path(tmp) / "cache"
        cache = write_cache(cache_dir, mib, hidden=256 if opts.quick else 4096)
        reads = measure_reads(cache, cache_dir, repeats)
        amp = measure_amplification(cache_dir)
    res = {"quick": opts.quick, "repeats": repeats, "topk": TOPK, "shapes": shapes,
           "measured_cache": {"hidden": cache["hidden"], "dtype": "bf16", "tokens": cache["tokens"],
                              "bytes": cache["bytes"], "bytes_per_token": cache["bytes_per_token"],
                              "files": len(cache["files"])},
           "reads": reads, "amplification": amp,
           "ratios": {"cold_reader_over_dd": paired_ratio(reads, "cold", "CacheReader.iter_samples", "dd bs=1M"),
                      "warm_reader_over_readinto": paired_ratio(reads, "warm", "CacheReader.iter_samples",
                                                                "plain readinto 1 MiB")}, "eviction": "posix_fadvise(POSIX_FADV_DONTNEED) per shard file"}
    write_results("cache", res, opts.out)
    print_table("Bytes per cached token", ["model", "H", "V", "dtype", "hidden", "full logits", "top-64", "full/hidden",
                                           "top64/hidden"],
                [[s["model"], s["hidden_size"], s["vocab"], s["dtype"], s["hidden_bytes"], s["full_logits_bytes"],
                  s["topk_bytes"], f"{s['full_over_hidden']:.1f}x", f"{s['topk_over_hidden']:.2f}x"]
                 for s in shapes])
    print(f"  measured: {cache['bytes_per_token']:.2f} bytes/token for hidden {cache['hidden']} bf16 "
          f"({cache['hidden'] * 2} payload + safetensors header)")
    print_table(f"Read throughput, {cache['bytes'] / MIB:.0f} MiB in {len(cache['files'])} shards (MiB/s median [min-max])",
                ["cache", "method", "MiB/s", "resident before"],
                [[r["state"], r["method"], fmt(r["mib_per_s"]), ",".join(map(str, r["resident_fraction_before"]))]
                 for r in reads])
    rate = {(r["state"], r["method"]): r["mib_per_s"]["median"] for r in reads}
    if ("cold", "dd bs=1M") in rate:
        print(f"  cold reader / dd: {rate['cold', 'CacheReader.iter_samples'] / rate['cold', 'dd bs=1M']:.2f} "
              f"(medians), {res['ratios']['cold_reader_over_dd']:.2f} (median of the rounds' ratios)")
    print(f"  warm reader / readinto: {rate['warm', 'CacheReader.iter_samples'] / rate['warm', 'plain readinto 1 MiB']:.2f} "
          f"(medians), {res['ratios']['warm_reader_over_readinto']:.2f} (median of the rounds' ratios)")
    print(f"  one OPD epoch ({amp['mini_batches']} random mini-batches, {amp['shards']} shards): bytes mapped / cache "
          f"bytes = {amp['planned_amplification']:.2f} with the planned LRU ({amp['planned_capacity']} shards), "
          f"{amp['two_shard_lru_amplification']:.2f} with a two-shard LRU")
    return res


if __name__ == "__main__":
    main()
