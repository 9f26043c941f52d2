"""Fingerprint of the models' numerics under the installed transformers: configs/tiny.yaml's
model (qwen2, hidden 128, 4 layers) and configs/small-hf.yaml's real-shaped toy (Qwen3,
engine/toy_hf.py), each built from seed 0: 5 AdamW steps on a fixed batch (forward, loss,
backward, step), then 32 greedy tokens from the HF generator. Writes the losses (as hex
floats), a hash of every parameter's bytes after training and the generated ids and
log-probs as JSON. Two environments (e.g. transformers 5.19 and 5.24) agree bitwise when
their JSON files are equal apart from the versions line:
`python scripts/numerics_fingerprint.py WORKDIR OUT.json`."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def main(workdir: str, out: str) -> None:
    import torch
    import transformers

    from engine.model import TinySpec, materialize_tiny
    from engine.toy_hf import ToyHFSpec, materialize_toy_hf

    torch.manual_seed(0)
    spec = TinySpec(architecture="qwen2", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=384)
    result = {"transformers": transformers.__version__, "torch": torch.__version__,
              "tiny": _fingerprint(materialize_tiny(spec, Path(workdir) / "tiny", seed=0)),
              "toy_hf": _fingerprint(materialize_toy_hf(ToyHFSpec(), Path(workdir) / "toy_hf", seed=0))}
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k]["params_sha256"] for k in ("tiny", "toy_hf")} | {"tf": transformers.__version__}))


def _fingerprint(path) -> dict:
    import torch

    from engine.chat import render_prompt
    from engine.generation import HFGenerator, SamplingParams
    from engine.model import load_model, load_tokenizer

    tok, model = load_tokenizer(path), load_model(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tok), (4, 48), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0  # a padded row: the attention-mask path too
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="none")
        loss = (loss * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item().hex())
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode() + p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    model.eval()
    prompt = render_prompt([{"role": "user", "content": "What is 12+30?"}], tok)
    gen = HFGenerator(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=32))[0]
    return {"losses": losses, "params_sha256": h.hexdigest(), "greedy_ids": gen.token_ids,
            "greedy_logprobs": [float(x).hex() for x in gen.logprobs]}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
