"""Child process for test_kill_resume_rl.py: one GRPO or OPD stage on tiny models, resuming
from `<out>/checkpoints` if a checkpoint is there; at the end the final weights go to
`<out>/final.safetensors` (temporary name + rename), so only a finished run has one.

    python tests/reliability/rl_child.py grpo MODELS_DIR OUT_DIR
    python tests/reliability/rl_child.py opd MODELS_DIR OUT_DIR

`POLYMATH_SLOW_CACHE_S` makes each cache shard write sleep that long first,
`POLYMATH_SLOW_STEP_S` each optimiser step and `POLYMATH_SLOW_GEN_S` each generation call
(no effect on the numbers), so the test can SIGKILL the stage inside a teacher cache write,
inside a round's training or inside rollout generation. `POLYMATH_SAVE_EVERY` sets GRPO's
checkpoint interval (default 1). A finished run also writes the stage's returned metrics
to `<out>/result.json`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from engine.checkpoint import CheckpointManager  # noqa: E402
from engine.model import TinySpec, load_model, load_tokenizer, materialize_tiny  # noqa: E402
from engine.trainer import TrainerSettings, build_trainer  # noqa: E402

SPEC = TinySpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
GRPO_STEPS = 4
OPD_ROUNDS = 3


def make_models(root: Path) -> None:
    """Student/base and two teachers with their extracted heads (built once by the test)."""
    from distill.heads import extract_head

    materialize_tiny(SPEC, root / "base", seed=0)
    for i in range(2):
        t = materialize_tiny(SPEC, root / f"teacher{i}", seed=10 + i)
        extract_head(t, root / f"heads/t{i}/head.safetensors")


def _rows(domain: str, n: int) -> list[dict]:
    return [{"id": f"{domain}-{i}", "domain": domain, "messages": [{"role": "user", "content": f"say {domain} {i}"}],
             "reference": {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}} for i in range(n)]


def run_grpo_child(models: Path, out: Path, checkpoints: CheckpointManager):
    from experts.grpo import DomainSpec, run_grpo
    from experts.grpo_settings import GRPOSettings
    from rewards import ScorerPool

    base = models / "base"
    s = GRPOSettings(steps=GRPO_STEPS, prompts_per_step=4, group_size=4, max_new_tokens=16, micro_batch_size=8,
                     mini_batches_per_step=2, lr=1e-3, save_every=int(os.environ.get("POLYMATH_SAVE_EVERY", "1")),
                     keep_last=2, seed=0)
    trainer = Slow(build_trainer(TrainerSettings(lr=s.lr, seed=0), base),
                   float(os.environ.get("POLYMATH_SLOW_STEP_S", "0")))
    tok = load_tokenizer(base)
    with ScorerPool(num_workers=1) as scorer:
        result = run_grpo(s, trainer=trainer, generator=_generator(base, tok), scorer=scorer, tokenizer=tok,
                          train_rows=_rows("nocomma", 32), domains={"nocomma": DomainSpec("ifeval", None)},
                          out_dir=out, checkpoints=checkpoints)
    return trainer, result


def run_opd_child(models: Path, out: Path, checkpoints: CheckpointManager):
    from distill.opd import DomainSpec, TeacherRef, run_opd
    from distill.opd_settings import OPDSettings

    base = models / "base"
    settings = OPDSettings(rounds=OPD_ROUNDS, prompts_per_domain=6, samples_per_prompt=2, max_new_tokens=10,
                           mini_batch_size=12, micro_batch_size=4, lr=3e-3, chunk_size=16, shard_tokens=24,
                           cache_dtype="fp32", seed=0)
    trainer = Slow(build_trainer(TrainerSettings(lr=settings.lr, seed=0), base),
                   float(os.environ.get("POLYMATH_SLOW_STEP_S", "0")))
    tok = load_tokenizer(base)
    refs = [TeacherRef(i, f"grpo:{d}", d, str(models / f"teacher{i}"), 1.0) for i, d in enumerate("ab")]
    heads = [str(models / f"heads/t{i}/head.safetensors") for i in range(2)]
    result = run_opd(settings, trainer=trainer, generator=_generator(base, tok), tokenizer=tok,
            prompts={d: _rows(d, 30) for d in "ab"}, teachers=refs, domains={d: DomainSpec("ifeval") for d in "ab"},
            out_dir=out, head_paths=heads, load_teacher=lambda p: load_model(p), checkpoints=checkpoints)
    return trainer, result


def _generator(base: Path, tok):
    from engine.generation import HFGenerator

    gen = HFGenerator(base, tok)
    seconds = float(os.environ.get("POLYMATH_SLOW_GEN_S", "0"))
    if seconds:
        real = gen.generate

        def slow_generate(prompt_ids, sampling):
            time.sleep(seconds)
            return real(prompt_ids, sampling)

        gen.generate = slow_generate
    return gen


class Slow:
    """The trainer, with a pause after each optimiser step."""

    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train_step(self, micro_batches, loss_fn):
        out = self.inner.train_step(micro_batches, loss_fn)
        time.sleep(self.seconds)
        return out


def _slow_cache(seconds: float) -> None:
    import distill.cache as cache

    real = cache.CacheWriter._flush

    def slow_flush(self):
        if self._buf_rows:
            time.sleep(seconds)
        real(self)

    cache.CacheWriter._flush = slow_flush


def main(kind: str, models: str, out: str) -> None:
    from safetensors.torch import save_file

    models_dir, out_dir = Path(models), Path(out)
    if kind == "make_models":
        make_models(models_dir)
        return
    if os.environ.get("POLYMATH_SLOW_CACHE_S"):
        _slow_cache(float(os.environ["POLYMATH_SLOW_CACHE_S"]))
    checkpoints = CheckpointManager(out_dir / "checkpoints", keep_last=2)
    print(f"resume-from: {checkpoints.latest().name if checkpoints.latest() else None}", flush=True)
    trainer, result = {"grpo": run_grpo_child, "opd": run_opd_child}[kind](models_dir, out_dir, checkpoints)
    from engine.atomic import atomic_write_json

    atomic_write_json(out_dir / "result.json", {k: v for k, v in result.items() if k.startswith("rollout_wal")})
    tmp = out_dir / ".final.safetensors.tmp"
    save_file(trainer.state_dict(), str(tmp))
    os.replace(tmp, out_dir / "final.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:4])
