"""What every generator back-end shares (`engine.generation`'s HF generator and
`engine.generation_vllm`'s vLLM one): the sampling parameters, the completion record, the
`Generator` protocol, per-row seeds and prompt validation. A module of its own so that
neither back-end imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    max_new_tokens: int = 64
    stop_token_ids: Sequence[int] = ()  # generation also stops at EOS and the end-of-turn ids
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an int >= 0, got {self.top_k!r}"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {msg}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, the stop token included when finish_reason == "stop"
    logprobs: list[float]  # aligned with token_ids (`engine.generation`'s docstring)
    finish_reason: str  # "stop" (EOS or a stop token) | "length" (max_new_tokens reached)


class Generator(Protocol):
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A well-mixed 63-bit seed for one sampled row (SplitMix64 over the three ints)."""
    x = 0
    for v in (seed, prompt_index, sample_index):
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


def validate_prompts(prompt_ids: list[list[int]], vocab_size: int) -> None:
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError("generate: prompt_ids must be a non-empty list of token-id lists")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"generate: prompt_ids[{i}] is empty")
        bad = [t for t in p if not (0 <= int(t) < vocab_size)]
        if bad:
            raise ValueError(f"generate: prompt_ids[{i}] has ids outside [0, {vocab_size}): {bad[:5]}")
