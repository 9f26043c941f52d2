"""Your own code for configs/examples/my_project/my_project.yaml: a reward function, a
data adapter and a tool environment. Polymath imports them by import path
(`my_verifiers:last_number`) from the directories in the config's `python_path`, in
every process that needs them (stage processes, scoring workers, Ray jobs).

A verifier is `(completion: str, reference: dict, **options) -> score`: a number in
[0, 1], `{"score": ..., "info": {...}}`, or a `rewards.RewardResult`. It runs in the
scoring worker processes with the built-in verifiers' per-item time limit (or your own:
`last_number.timeout_s = 5.0`): an exception or a hang scores that one completion 0, the
stage log names the row, the verifier and the reason, and the run goes on.
"""

import re


def last_number(completion, reference, **options):
    """1.0 when the last number in the completion is the reference answer."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    got = numbers[-1] if numbers else None
    return {"score": float(got is not None and float(got) == float(reference["answer"])),
            "info": {"extracted": got}}


def calc_row(record, *, domain, default_id):
    """An adapter: one record of my calculator dataset ({"ask", "a", "b", "result", "key"})
    -> a row (docs/CONTRACTS.md): an instruction to use the `add` tool, the call as the
    demonstration, the sum as the reference answer."""
    ask, result = record["ask"], int(record["result"])
    call = (f'<tool_call><invoke name="add"><parameter name="a">{record["a"]}</parameter>'
            f'<parameter name="b">{record["b"]}</parameter></invoke></tool_call>')
    return {"id": str(record.get("key") or default_id), "domain": domain,
            "messages": [{"role": "system", "content": "You can call the tool add(a, b)."},
                         {"role": "user", "content": ask},
                         {"role": "assistant", "content": call}],
            "reference": {"answer": str(result)}}


def calculator(reference):
    """A tool environment per row: an object with `execute(call_text) -> str` (here the
    package's XML tool-call environment over one `add(a, b)` tool)."""
    from engine.domains.tool import TOOLS, ToolEnvironment

    print("my_verifiers.calculator: an environment for a row", flush=True)
    return ToolEnvironment({"add": TOOLS["add"]})
