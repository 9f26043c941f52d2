"""Export a stage's model as `final/`: what transformers and vLLM load with no arguments.

`final/` holds the safetensors weights and `config.json` of the stage's last checkpoint,
the tokenizer with its chat template, and a `generation_config.json` whose
`eos_token_id` lists every id that ends an assistant turn (EOS and the template's
end-of-turn token, `engine.chat.end_of_turn_ids`), so `model.generate(ids)` and
`vllm serve` stop where the pipeline's own generators do. With `trainer.lora` the weights
are the merged ones, and the checkpoint's `adapter/` (peft format) is copied as well. Optimizer state and resume
metadata stay in the stage's `checkpoints/`. Written to a temporary directory, then
renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")


def export_final(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer) -> Path:
    """Write `out_dir` (e.g. `<stage dir>/final`) from the HF checkpoint directory `checkpoint`."""
    from transformers import GenerationConfig

    from engine.chat import end_of_turn_ids

    src, out = Path(checkpoint), Path(out_dir)
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in src.glob(pattern)})
    if not (src / "config.json").is_file() or not any(p.suffix == ".safetensors" for p in weights):
        raise FileNotFoundError(f"export_final: {src} is not an HF checkpoint (config.json + *.safetensors)")
    config = json.loads((src / "config.json").read_text())
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for p in [src / "config.json", *weights]:  # new files, mode from the umask (transformers
            shutil.copyfile(p, tmp / p.name)       # writes checkpoint weights 0600)
        if (src / "adapter").is_dir():  # trainer.lora: the adapter alone, next to the merged weights
            shutil.copytree(src / "adapter", tmp / "adapter")
        tokenizer.save_pretrained(str(tmp))
        gen = GenerationConfig.from_pretrained(str(src)) if (src / "generation_config.json").is_file() \
            else GenerationConfig()
        ends = end_of_turn_ids(tokenizer, src)
        eos = config.get("eos_token_id")
        ends += [int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None and int(t) not in ends]
        gen.eos_token_id = ends if len(ends) > 1 else ends[0]
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.get("pad_token_id")
        gen.bos_token_id = config.get("bos_token_id")
        gen.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
