"""The reasons a score is not a verifier's verdict, shared by the pool, its workers and the CLI.

A verifier scores bad model output 0 with its own reason and never raises on it. These
prefixes mark the other zeros: the verifier raised (a verifier bug, or a reference it
cannot use), the row could not be handed to a verifier, or the scoring worker crashed or
ran past the per-item timeout. `python -m rewards score` copies them to a row's `error`
field; `batch.check_verifier_errors` stops a stage only when VERIFIER_ERROR reaches the
configured rate of a batch (`max_verifier_error_rate`, default every item).
"""

from __future__ import annotations

from typing import Any

VERIFIER_ERROR = "verifier error"
BAD_INPUT = "bad input"
WORKER_FAILED = "scoring worker"
ITEM_TIMEOUT = "timeout: item took longer than"
FAILURES = (VERIFIER_ERROR, BAD_INPUT, WORKER_FAILED, ITEM_TIMEOUT)


def scoring_failure(info: Any) -> str | None:
    """The failure reason in a result's `info`, or None when the score is a verdict."""
    reason = info.get("reason") if isinstance(info, dict) else None
    return reason if isinstance(reason, str) and reason.startswith(FAILURES) else None
