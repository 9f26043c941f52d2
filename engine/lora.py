"""LoRA through peft for the torch trainer (`trainer.lora`).

`apply_lora` injects peft's LoRA layers into an HF causal LM in place (the base weights are
frozen; only `lora_A`/`lora_B` train). The model keeps its own class and its module paths
(`q_proj` becomes a peft `Linear` holding `base_layer` and the adapters), so the trainer's
forward (`trainer_common.run_loss`) runs unchanged. What leaves the trainer as "the model"
(`merged_state_dict`: generator syncs, `save_hf`, `final/`) is the merged weight
W + scaling·B·A under the plain HF names, which loads without peft; `save_adapter` /
`load_adapter` write and read the adapter alone in peft's own format
(`adapter_config.json` + `adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`).
peft is imported here only, so a run without `trainer.lora` never needs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_DIR = "adapter"  # <checkpoint>/adapter, <stage>/final/adapter


def apply_lora(lm, lora):
    """Wrap `lm` with peft LoRA per `lora` (r, alpha, dropout, target_modules; read by
    attribute). Returns the `PeftModel`; `lm` itself is modified in place and stays the
    model to run. Raises ValueError naming the targets when none matches a module of `lm`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(lora.r), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                        target_modules=list(lora.target_modules), bias="none")
    try:
        return get_peft_model(lm, config)
    except ValueError as e:
        raise ValueError(f"trainer.lora.target_modules {list(lora.target_modules)}: {e}") from e


def _lora_layers(lm):
    from peft.tuners.lora import LoraLayer

    return [(name, mod) for name, mod in lm.named_modules() if isinstance(mod, LoraLayer)]


@torch.no_grad()
def merged_state_dict(lm) -> dict[str, torch.Tensor]:
    """The HF state dict of `lm` (LoRA injected by `apply_lora`) with every adapter merged:
    `<module>.weight` = base + scaling·B·A (peft's `get_delta_weight`), no `lora_*` keys, no
    `base_layer` in any name; CPU copies, `lm` untouched. A model held in a low precision
    (DeepSpeed's bf16 casts the frozen base too) is returned in float32, so a delta below the
    base's bf16 resolution (an RL-sized step) survives the merge; fp32 models are unchanged."""
    state = {}
    for key, value in lm.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().cpu().clone()
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in state.values()):
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    for name, mod in _lora_layers(lm):
        key = f"{name}.weight"
        if key not in state:
            raise KeyError(f"LoRA layer {name}: no base weight {key} in the model's state dict")
        for adapter in mod.active_adapters:
            if adapter in mod.lora_A or adapter in getattr(mod, "lora_embedding_A", {}):
                state[key] = state[key] + mod.get_delta_weight(adapter).detach().cpu().to(state[key].dtype)
    return state


def save_adapter(peft_model, path: Path, state_dict: dict | None = None) -> Path:
    """The adapter alone, in peft's format, under `path/adapter`; `state_dict` (peft's own
    names) when the model's parameters are partitioned (DeepSpeed ZeRO-3 gathers them)."""
    out = Path(path) / ADAPTER_DIR
    peft_model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    return out


def load_adapter(peft_model, path: Path) -> None:
    """Load `path/adapter` (written by `save_adapter`) into `peft_model`'s adapter weights;
    every adapter weight must be present and nothing else."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(path) / ADAPTER_DIR / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"load_checkpoint: {f} is missing (trainer.lora is set: the checkpoint must "
                                "hold the adapter)")
    result = set_peft_model_state_dict(peft_model, load_file(str(f)))
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise KeyError(f"{f}: adapter does not match trainer.lora: missing {missing[:5]}, "
                       f"unexpected {list(result.unexpected_keys)[:5]}")
