"""Model and tokenizer loading, and tiny random models built offline.

`TinySpec` describes a Qwen2- or Llama-shaped causal LM small enough to train on two CPU
cores; `materialize_tiny` builds it with random weights from a seed and saves it, with
the offline tokenizer, in the standard Hugging Face layout (safetensors), so every later
stage, vLLM and transformers load it like any checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from engine.tokenizer import build_tiny_tokenizer


def __getattr__(name: str):
    """`TinySpec` re-exported lazily: it is a pydantic model, and loading models needs none."""
    if name == "TinySpec":
        from engine.tiny_spec import TinySpec

        return TinySpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def tiny_config(spec: TinySpec, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[spec.architecture]
    padded = -(-vocab_size // spec.vocab_multiple) * spec.vocab_multiple
    return cls(
        vocab_size=padded,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        rope_theta=10000.0,
    )


def materialize_tiny(spec: TinySpec, out_dir: str | os.PathLike, seed: int) -> Path:
    """Build a random tiny model + tokenizer and save both to `out_dir` atomically."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return save_model_dir(model, tokenizer, out)


def save_model_dir(model, tokenizer, out: Path) -> Path:
    """Write `model` and `tokenizer` as one HF directory `out`: a temp name, then rename."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_tokenizer(path: str | os.PathLike, chat_template: str | os.PathLike | None = None):
    """`AutoTokenizer.from_pretrained(path)` (a local directory or a hub id); `chat_template`,
    a Jinja file, replaces the tokenizer's own template (`model.chat_template`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if chat_template is not None:
        file = Path(chat_template)
        if not file.is_file():
            raise FileNotFoundError(f"model.chat_template: file not found: {file}")
        tokenizer.chat_template = file.read_text()
    return tokenizer


def load_model(path: str | os.PathLike, dtype: str = "fp32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    return model.to(device)


