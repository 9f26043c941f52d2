"""What every benchmark shares: robust timing statistics, one measurement per fresh
subprocess (so peak RSS belongs to that measurement alone), the results file, the table,
and random Qwen2-shaped models of a given size saved as ordinary HF checkpoints.

A "child" is `python -m bench.<module> --child '<json args>'`: it runs one measurement
and prints one line `BENCH_RESULT {json}` on stdout; the parent parses it. With
`inprocess=True` (the smoke test) the same function runs in the calling process instead:
timings stay valid, peak RSS then means nothing and is reported as such.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
RESULT_TAG = "BENCH_RESULT "
MIB = 1024 ** 2


# ----------------------------------------------------------------------------- statistics

def summarize(values: list[float]) -> dict:
    """Median, min, max and count of a list of measurements (rounded for the JSON)."""
    if not values:
        raise ValueError("summarize: no measurements")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def num(x: float) -> str:
    """A compact number: 3126, 12.35, 0.0283."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def fmt(stat: dict) -> str:
    """`median [min-max]` of a summary."""
    return f"{num(stat['median'])} [{num(stat['min'])}-{num(stat['max'])}]"


def time_repeats(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn()` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- memory

def peak_rss_bytes() -> int:
    """High-water resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- children

def run_child(module: str, args: dict, *, inprocess: bool, child_fn: Callable[[dict], dict],
              timeout_s: float = 900) -> dict:
    """One measurement: `child_fn(args)` in a fresh `python -m <module> --child` process
    (default) or in this process. Returns the child's result dict."""
    if inprocess:
        return {**child_fn(args), "inprocess": True}
    cmd = [sys.executable, "-m", module, "--child", json.dumps(args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "inprocess": False}
    raise RuntimeError(f"benchmark child {module} {args} exited {proc.returncode} without a result:\n"
                       f"{proc.stderr[-3000:]}")


def child_main(argv: list[str], child_fn: Callable[[dict], dict]) -> bool:
    """If argv is `--child JSON`, run the child, print its result, return True."""
    if len(argv) >= 2 and argv[0] == "--child":
        result = child_fn(json.loads(argv[1]))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return True
    return False


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


# ----------------------------------------------------------------------------- results

def machine_info() -> dict:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 1024 ** 3, 1),
            "load_avg_1_5_15": load, "torch": torch.__version__, "python": platform.python_version(),
            "parent_torch_threads": torch.get_num_threads(),
            # a 1-minute load average above the core count means the cores were shared
            "busy": None if load is None else load[0] > (os.cpu_count() or 1)}


def write_results(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    """Atomically write `<out_dir>/<name>.json` with the machine description added."""
    from engine.atomic import atomic_write_json

    path = Path(out_dir or RESULTS_DIR) / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "machine": machine_info(),
                             "written_at": time.strftime("%Y-%m-%d %H:%M:%S"), **payload})
    return path


def emit_json(out: dict, path: str | Path | None) -> None:
    """Print `out` as JSON and, where `path` is given (a bench's `--out`), write it there too."""
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------- models

def qwen2_config(vocab: int, hidden: int, layers: int, intermediate: int, head_dim: int = 64):
    """A Qwen2 config (GQA 2:1 when there are >= 2 heads, untied head) from a few sizes."""
    from transformers import Qwen2Config

    heads = max(1, hidden // head_dim)
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       intermediate_size=intermediate, max_position_embeddings=4096,
                       tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                       rope_theta=10000.0)


def save_random_model(config, out_dir: str | Path, seed: int) -> dict:
    """Random-weight model + the project's offline tokenizer, saved in HF layout.

    The tokenizer only supplies pad/eos ids: benchmark sequences are random token ids over
    the model's own vocabulary. Returns {"dir", "params", "param_bytes"}.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from engine.tokenizer import build_tiny_tokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    build_tiny_tokenizer().save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return {"dir": str(out), "params": n, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
