"""`raise_if_all_verifier_errors`: a batch whose every item failed inside the verifier is
an environment problem and stops the caller; bad model output (scored 0 with another
reason) and small batches do not."""

import pytest

from rewards import RewardResult, raise_if_all_verifier_errors


def _err(msg="verifier error: FileNotFoundError: /tmp/x/python"):
    return RewardResult(0.0, {"reason": msg})


def test_all_verifier_errors_raise_with_the_first_reason():
    with pytest.raises(RuntimeError, match=r"'code' verifier raised on all 8 items.*FileNotFoundError"):
        raise_if_all_verifier_errors([_err()] * 8, "code", "GRPO")


def test_one_scored_item_or_model_failures_or_a_small_batch_pass():
    raise_if_all_verifier_errors([_err()] * 7 + [RewardResult(0.0, {"reason": "syntax error"})], "code", "x")
    raise_if_all_verifier_errors([_err()] * 7 + [RewardResult(1.0, {})], "code", "x")
    raise_if_all_verifier_errors([RewardResult(0.0, {"reason": "no answer"})] * 16, "math", "x")
    raise_if_all_verifier_errors([_err()] * 7, "code", "x")  # below min_items
