"""Do a think-max expert's redos fix anything? Greedy answers of one model on a modes run's
held-out problems in one mode: how many are right, how many contain a ` redo `, and how
many redos turn a wrong first answer right or a right one wrong (docs/modes.md, the
`math_chain_redo` run of commit a5e2baa).

    python scripts/think_max_redo_check.py runs/modes-redo grpo-math@think-max think-max
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(run: str, model: str, mode: str, max_new_tokens: int = 128) -> dict:
    import torch

    from engine.chat import render_row_prompt
    from engine.generation import HFGenerator, SamplingParams
    from engine.model import load_tokenizer

    torch.set_num_threads(1)
    rows = [json.loads(x) for x in open(Path(run) / "prepare/data/math/eval.jsonl")]
    rows = [r for r in rows if r.get("mode") == mode][:128]
    model_dir = Path(run) / model / "final"
    tok = load_tokenizer(model_dir)
    outs = HFGenerator(model_dir, tok).generate([render_row_prompt(r, tok) for r in rows],
                                                SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    counts = {"problems": len(rows), "right": 0, "with_redo": 0, "redo_fixed": 0, "redo_broke": 0}
    for r, o in zip(rows, outs):
        text, answer = tok.decode(o.token_ids, skip_special_tokens=True), r["reference"]["answer"]
        boxed = re.findall(r"\\boxed\{(-?\d+)\}", text)
        right = bool(boxed) and boxed[-1] == answer
        counts["right"] += right
        if " redo " in text:
            first = text.split(" check ")[0].split()[-1].split("=")[-1]  # the forward chain's result
            counts["with_redo"] += 1
            counts["redo_fixed"] += right and first != answer
            counts["redo_broke"] += (not right) and first == answer
            print(repr(text), "answer", answer)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main(*sys.argv[1:4])
