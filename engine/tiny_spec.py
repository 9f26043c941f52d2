"""The shape of a tiny random model (torch-free: the experiment schema uses it directly)."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt, model_validator

from engine.settings import Settings


class TinySpec(Settings):
    """A Qwen2- or Llama-shaped causal LM small enough to train on two CPU cores."""

    architecture: Literal["qwen2", "llama"] = "qwen2"
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 384
    tie_word_embeddings: bool = False
    max_position_embeddings: PositiveInt = 1024
    vocab_multiple: PositiveInt = 8

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self
