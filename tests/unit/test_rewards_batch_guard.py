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


def test_a_configured_rate_stops_below_all_and_is_validated():
    from rewards.batch import check_verifier_errors, validate_error_rate

    half = [_err()] * 4 + [RewardResult(0.0, {"reason": "wrong answer"})] * 4
    check_verifier_errors(half, "tool", "x")  # default 1.0: half a batch of errors is the rows' problem
    check_verifier_errors(half, "tool", "x", max_error_rate=0.6)
    with pytest.raises(RuntimeError, match=r"raised on 4 of 8 items \(max_verifier_error_rate 0.5"):
        check_verifier_errors(half, "tool", "GRPO", max_error_rate=0.5)
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="max_error_rate must be a number in"):
            validate_error_rate(bad)


def test_failures_are_counted_by_kind():
    from rewards.batch import count_failures

    results = [_err(), _err(), RewardResult(0.0, {"reason": "timeout: item took longer than 8s"}),
               RewardResult(0.0, {"reason": "scoring worker crashed (signal SIGKILL): "}),
               RewardResult(0.0, {"reason": "bad input: completion must be a string"}),
               RewardResult(0.0, {"reason": "answer differs from reference"}), RewardResult(1.0, {})]
    assert count_failures(results) == {"verifier_errors": 2, "timeouts": 1, "worker_failures": 1, "bad_inputs": 1}
