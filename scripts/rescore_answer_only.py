"""Re-score a finished run's OPD rollouts on the whole completion and on its answer only
(engine.reasoning.split_reasoning), to see whether the answer-only rewards of issue 34 can
change that run's figures: `python scripts/rescore_answer_only.py RUN_DIR`.

Reads `RUN_DIR/opd/round-*/rollouts.jsonl` (read only); the code domain is skipped (its
verifier runs the code in the sandbox). Prints, per domain, the samples, those that write
`<think>`/`</think>`, those whose reasoning never closes, those whose score changes, and
the two mean scores.
"""

from __future__ import annotations

import collections
import glob
import json
import sys

VERIFIER = {"math": "math", "math_chain": "math", "ifeval": "ifeval", "tool": "tool"}


def main(run_dir: str) -> None:
    from engine.reasoning import split_reasoning
    from rewards.registry import get_verifier

    stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in sorted(glob.glob(f"{run_dir}/opd/round-*/rollouts.jsonl")):
        with open(path) as fh:
            for line in fh:
                rec = json.loads(line)
                domain = rec["domain"].split("@")[0]
                c = stats[rec["domain"]]
                if domain not in VERIFIER:
                    c["skipped"] += 1
                    continue
                verify = get_verifier(VERIFIER[domain])
                split = split_reasoning(rec["text"])
                whole = verify(rec["text"], rec["reference"]).score
                answer = 0.0 if split.unfinished else verify(split.answer, rec["reference"]).score
                c["n"] += 1
                c["think_tags"] += "<think>" in rec["text"] or "</think>" in rec["text"]
                c["unfinished"] += split.unfinished
                c["changed"] += whole != answer
                c["whole"] += whole
                c["answer"] += answer
    for route, c in sorted(stats.items()):
        n = c["n"]
        if not n:
            print(f"{route}: {c['skipped']} skipped")
            continue
        print(f"{route}: {n} samples, {c['think_tags']} with think tags, {c['unfinished']} unfinished, "
              f"{c['changed']} scores changed; mean whole {c['whole'] / n:.4f}, answer {c['answer'] / n:.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
