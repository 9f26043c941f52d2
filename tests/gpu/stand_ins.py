"""tests/gpu run where only torch, transformers, safetensors and tokenizers may be installed
(the GPU machine has no pydantic, ray, deepspeed or vllm): the pydantic schemas are stood in
for by plain namespaces of their defaults when pydantic is absent. The trainers read their
settings by attribute, so the code under test is the same."""

from types import SimpleNamespace

# engine/trainer_settings.py `TrainerSettings` defaults
TRAINER_DEFAULTS = dict(backend="torch", device="cpu", dtype="fp32", zero_stage=0, optimizer="adamw", lr=1e-3,
                        weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, schedule="constant", warmup_steps=0,
                        total_steps=None, min_lr_ratio=0.0, grad_clip=1.0, seed=0, deterministic=True,
                        logprob_chunk=0, gradient_checkpointing=False)
# engine/tiny_spec.py `TinySpec` defaults
TINY_DEFAULTS = dict(architecture="qwen2", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                     intermediate_size=384, tie_word_embeddings=False, max_position_embeddings=1024, vocab_multiple=8)


def _namespace(defaults: dict, kw: dict, what: str) -> SimpleNamespace:
    unknown = set(kw) - set(defaults)
    if unknown:
        raise TypeError(f"{what}: unknown fields {sorted(unknown)}")
    return SimpleNamespace(**{**defaults, **kw})


def trainer_settings(**kw):
    """`TrainerSettings(**kw)`, or the same fields in a namespace without pydantic."""
    try:
        from engine.trainer_settings import TrainerSettings
    except ImportError:
        return _namespace(TRAINER_DEFAULTS, kw, "trainer_settings")
    return TrainerSettings(**kw)


def tiny_spec(**kw):
    """`TinySpec(**kw)`, or the same fields in a namespace without pydantic."""
    try:
        from engine.tiny_spec import TinySpec
    except ImportError:
        return _namespace(TINY_DEFAULTS, kw, "tiny_spec")
    return TinySpec(**kw)
