"""Teacher heads: extraction from a checkpoint, and one-at-a-time residency during training.

A teacher's "head" is what turns its cached last-layer hidden state into logits: the final
RMSNorm and the vocabulary projection (docs/DESIGN.md section 5). `extract_head` reads only
those tensors from the checkpoint's safetensors files (sharded or not; tied input/output
embeddings handled) and writes them to `head.safetensors`, so that training never reads a
teacher's full weights. A small registry (`HEAD_SPECS`, keyed by config.json's
`model_type`) names the tensors that form the head.

`HeadManager` enforces residency rather than hoping for it: it holds at most one head on
the compute device, releases it (and invalidates the released object, so a stale
reference fails loudly instead of keeping memory alive) before loading the next, may
prefetch the next head into host memory on a background thread, counts loads per
optimiser step, and refuses a teacher index that goes backwards within a step.
Residency is measured, not counted: every activated head's tensor storages are tracked by
weak references, and `max_resident_heads` / `max_resident_bytes` are the most heads (and
bytes) whose memory was still alive when a head was activated, so a head kept alive by a
stray reference (to a weight or a view of it) counts.
Only RMSNorm heads of the Qwen2/Llama form `w * x / rms(x)` are supported (not Gemma's
`(1 + w)`, not LayerNorm with bias).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.multiprocessing.reductions import StorageWeakRef
from safetensors.torch import save as safetensors_save

from distill.kl import compute_rmsnorm_logits
from engine.atomic import atomic_write_bytes
from engine.registry import Registry


class VocabMismatchError(ValueError):
    """Student and teacher do not share the vocabulary: an OPD configuration error."""


class TeacherOrderError(RuntimeError):
    """A micro-batch asked for a teacher whose index is below the current one in this step."""


@dataclass(frozen=True)
class HeadSpec:
    norm: str  # final norm weight, e.g. model.norm.weight
    lm_head: str  # vocabulary projection, e.g. lm_head.weight
    embed: str  # input embedding, used when embeddings are tied
    eps_key: str = "rms_norm_eps"  # config.json key of the norm epsilon

    @property
    def norm_module(self) -> str:
        """Module path of the final norm (its weight name without `.weight`)."""
        return self.norm.rsplit(".", 1)[0]


HEAD_SPECS: Registry[HeadSpec] = Registry("head spec for model_type")
register_head_spec = HEAD_SPECS.add
get_head_spec = HEAD_SPECS.get


for _name in ("qwen2", "qwen3", "llama", "mistral"):
    register_head_spec(_name, HeadSpec("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"))


# ----------------------------------------------------------------------------- extraction

def _read_config(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint {checkpoint_dir}")
    return json.loads(path.read_text())


def _weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (from the shard index, or the single file)."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return {name: checkpoint_dir / f for name, f in weight_map.items()}
    single = checkpoint_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} has neither model.safetensors nor "
                                "model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _read_tensor(files: dict[str, Path], name: str, checkpoint_dir: Path) -> torch.Tensor:
    if name not in files:
        raise KeyError(f"tensor {name!r} not found in checkpoint {checkpoint_dir}")
    with safe_open(str(files[name]), framework="pt") as f:
        return f.get_tensor(name)


def extract_head(checkpoint_dir: str | Path, out_path: str | Path) -> Path:
    """Write the teacher's final norm + vocabulary projection to `out_path` (safetensors).

    Reads config.json and only the head's tensors. Tied embeddings: used when
    `tie_word_embeddings` is true or the checkpoint has no lm_head tensor.
    """
    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    config = _read_config(checkpoint_dir)
    model_type = config.get("model_type")
    spec = get_head_spec(model_type)
    if spec.eps_key not in config:
        raise KeyError(f"{checkpoint_dir / 'config.json'}: missing {spec.eps_key!r}")
    files = _weight_files(checkpoint_dir)
    tied = bool(config.get("tie_word_embeddings", False)) or spec.lm_head not in files
    norm = _read_tensor(files, spec.norm, checkpoint_dir)  # (H,)
    proj = _read_tensor(files, spec.embed if tied else spec.lm_head, checkpoint_dir)  # (V, H)
    if norm.dim() != 1 or proj.dim() != 2 or proj.shape[1] != norm.shape[0]:
        raise ValueError(f"{checkpoint_dir}: head shapes norm {tuple(norm.shape)}, projection "
                         f"{tuple(proj.shape)} do not fit together")
    metadata = {"model_type": model_type, "eps": repr(float(config[spec.eps_key])),
                "vocab_size": str(proj.shape[0]), "hidden_size": str(proj.shape[1]),
                "tied": str(tied).lower(), "source": str(checkpoint_dir.resolve())}
    data = safetensors_save({"norm.weight": norm.contiguous(), "proj.weight": proj.contiguous()}, metadata)
    atomic_write_bytes(out_path, data)
    return out_path


# ----------------------------------------------------------------------------- the head

class TeacherHead:
    """Final RMSNorm + projection: `__call__(hidden (N, H)) -> logits (N, V)` in float32."""

    def __init__(self, norm_weight: torch.Tensor, proj_weight: torch.Tensor, eps: float,
                 model_type: str = "", source: str = ""):
        self.norm_weight, self.proj_weight = norm_weight, proj_weight  # (H,), (V, H)
        self.eps, self.model_type, self.source = float(eps), model_type, source

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> "TeacherHead":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher head file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                norm, proj = f.get_tensor("norm.weight"), f.get_tensor("proj.weight")
            eps = float(meta["eps"])
        except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
            raise ValueError(f"teacher head file {path} is not a valid head: {e}") from e
        # a fresh (aligned) copy: tensors read from a file sit at the header's offset, and
        # CPU GEMM results depend on operand alignment, so the model's own logits would
        # differ from ours in the last bit
        norm, proj = (t.to(device=device, dtype=dtype or t.dtype, copy=True) for t in (norm, proj))
        return cls(norm, proj, eps, meta.get("model_type", ""), str(path))

    def to(self, device: str | torch.device) -> "TeacherHead":
        self._check_live()
        return TeacherHead(self.norm_weight.to(device), self.proj_weight.to(device), self.eps,
                           self.model_type, self.source)

    @property
    def vocab_size(self) -> int:
        self._check_live()
        return self.proj_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        self._check_live()
        return self.proj_weight.shape[1]

    @property
    def nbytes(self) -> int:
        self._check_live()
        return self.norm_weight.nbytes + self.proj_weight.nbytes

    @property
    def released(self) -> bool:
        return self.proj_weight is None

    def release(self) -> None:
        self.norm_weight = self.proj_weight = None

    def _check_live(self) -> None:
        if self.released:
            raise RuntimeError(f"teacher head {self.source or '?'} was released by the HeadManager; "
                               "a micro-batch's backward must run before the next teacher is activated")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_live()
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"teacher head {self.source}: hidden size {hidden.shape[-1]} != {self.hidden_size}")
        return compute_rmsnorm_logits(hidden, self.norm_weight, self.eps, self.proj_weight)  # (N, V)


# ----------------------------------------------------------------------------- residency

class HeadManager:
    """At most one teacher head on `device`; loads counted per optimiser step.

    Usage per optimiser step: `begin_step()`, then `activate(t)` for each micro-batch in
    ascending teacher order (repeating t is free), then `end_step()`, which records the
    step's load count in `head_loads_per_step` and releases the resident head (so every
    step's count equals the number of distinct teachers it used). With `prefetch`, the
    head after the one just activated (and head 0 at a step's end) is read into host
    memory on a background thread.
    """

    def __init__(self, head_paths: list[str], device: str | torch.device = "cpu", prefetch: bool = True,
                 dtype: torch.dtype | None = None):
        self.head_paths = [str(p) for p in head_paths]
        self.device, self.dtype = torch.device(device), dtype
        self.head_loads_per_step: list[int] = []
        self.max_resident_heads = 0  # measured: heads whose storages were alive at an activation
        self.max_resident_bytes = 0
        self.total_loads = 0
        self.prefetch_hits = 0
        self._resident: TeacherHead | None = None
        self._resident_index: int | None = None
        self._tracked: list[list[tuple[StorageWeakRef, int]]] = []  # per activated head: its storages
        self._step_loads: int | None = None
        self._last_index = -1
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-prefetch") if prefetch else None
        self._pending: tuple[int, Future] | None = None

    @property
    def resident_index(self) -> int | None:
        return self._resident_index

    def begin_step(self) -> None:
        if self._step_loads is not None:
            raise RuntimeError("HeadManager.begin_step() called twice without end_step()")
        self._step_loads, self._last_index = 0, -1

    def end_step(self) -> int:
        if self._step_loads is None:
            raise RuntimeError("HeadManager.end_step() called without begin_step()")
        loads, self._step_loads = self._step_loads, None
        self.head_loads_per_step.append(loads)
        self._release()
        if self.head_paths:
            self._start_prefetch(0)
        return loads

    def activate(self, teacher_index: int) -> TeacherHead:
        """The head of `teacher_index`, loaded (after releasing the current one) if needed."""
        i = int(teacher_index)
        if self._step_loads is None:
            raise RuntimeError("HeadManager.activate() outside a step: call begin_step() first")
        if not 0 <= i < len(self.head_paths):
            raise IndexError(f"teacher index {i} out of range: {len(self.head_paths)} heads")
        if i < self._last_index:
            raise TeacherOrderError(
                f"teacher {i} requested after teacher {self._last_index} within optimiser step "
                f"{len(self.head_loads_per_step)}: micro-batches must come in ascending teacher order")
        self._last_index = i
        if self._resident_index == i:
            return self._resident
        self._release()
        head = self._take_prefetched(i) or TeacherHead.load(self.head_paths[i], "cpu", self.dtype)
        if self.device.type != "cpu":
            head = head.to(self.device)
        self._resident, self._resident_index = head, i
        self._track(head)
        self._step_loads += 1
        self.total_loads += 1
        if i + 1 < len(self.head_paths):
            self._start_prefetch(i + 1)
        return head

    def close(self) -> None:
        self._release()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None

    def resident_heads(self) -> tuple[int, int]:
        """(heads, bytes) of activated heads whose tensor memory is still alive now."""
        self._tracked = [refs for refs in self._tracked if any(not r.expired() for r, _ in refs)]
        live = {r.cdata: n for refs in self._tracked for r, n in refs if not r.expired()}
        return len(self._tracked), sum(live.values())

    def _track(self, head: TeacherHead) -> None:
        refs = [(StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
                for t in (head.norm_weight, head.proj_weight)]
        self._tracked.append(refs)
        heads, nbytes = self.resident_heads()
        self.max_resident_heads = max(self.max_resident_heads, heads)
        self.max_resident_bytes = max(self.max_resident_bytes, nbytes)

    def _release(self) -> None:
        if self._resident is not None:
            self._resident.release()
        self._resident, self._resident_index = None, None

    def _start_prefetch(self, i: int) -> None:
        if self._pool is None or (self._pending is not None and self._pending[0] == i):
            return
        self._pending = (i, self._pool.submit(TeacherHead.load, self.head_paths[i], "cpu", self.dtype))

    def _take_prefetched(self, i: int) -> TeacherHead | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        index, future = pending
        if index != i:
            future.cancel()
            return None
        self.prefetch_hits += 1
        return future.result()  # re-raises a load error, which names the file


# ----------------------------------------------------------------------------- vocabulary

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def _tokenizer_vocab(model_dir: Path) -> dict[str, int] | None:
    """token -> id from tokenizer.json (model vocab + added tokens), None if absent."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text())
    vocab = tok.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
    vocab = dict(vocab)
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


def _file_digest(model_dir: Path) -> dict[str, str]:
    return {n: hashlib.sha256((model_dir / n).read_bytes()).hexdigest()
            for n in _TOKENIZER_FILES[1:] if (model_dir / n).is_file()}


def assert_same_vocab(student_dir: str | Path, teacher_dirs: list[str | Path]) -> None:
    """Raise VocabMismatchError unless every teacher shares the student's vocabulary.

    Compares config.json `vocab_size`, then the tokenizers: token -> id maps from
    tokenizer.json when both have one, else the bytes of vocab.json / tokenizer.model.
    """
    student_dir = Path(student_dir)
    s_size = _read_config(student_dir).get("vocab_size")
    s_vocab, s_files = _tokenizer_vocab(student_dir), _file_digest(student_dir)
    for t in map(Path, teacher_dirs):
        t_size = _read_config(t).get("vocab_size")
        if t_size != s_size:
            raise VocabMismatchError(f"vocab_size: student {student_dir} has {s_size}, teacher {t} has {t_size}")
        t_vocab = _tokenizer_vocab(t)
        if s_vocab is not None and t_vocab is not None:
            if s_vocab != t_vocab:
                diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:3]
                raise VocabMismatchError(f"tokenizer of teacher {t} differs from the student's "
                                         f"{student_dir} (e.g. token/id pairs {diff})")
            continue
        t_files = _file_digest(t)
        common = set(s_files) & set(t_files)
        if not common:
            raise VocabMismatchError(f"cannot compare tokenizers of student {student_dir} and teacher {t}: "
                                     f"no common file among {list(_TOKENIZER_FILES)}")
        bad = [n for n in common if s_files[n] != t_files[n]]
        if bad:
            raise VocabMismatchError(f"tokenizer file(s) {bad} of teacher {t} differ from the student's {student_dir}")
