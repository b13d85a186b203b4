"""Timeout formula, Retry-After parsing and the retry decision."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from prefect_journey import policy, receiver
from prefect_journey.errors import (
    AuthenticationError,
    DownloadError,
    InsufficientCreditsError,
    JourneyConnectionError,
    JourneyTimeoutError,
    JourneyValidationError,
    RateLimitedError,
    ServerError,
)
from prefect_journey.models import ImagineRequest
from prefect_journey.signing import new_secret


def test_read_timeout_grows_with_references_and_resolution() -> None:
    assert policy.read_timeout_for(14, "1K") >= 120
    assert policy.read_timeout_for(14, "4K") >= 180
    assert policy.read_timeout_for(0, None) == policy.read_timeout_for(0, "1K")
    assert (
        policy.read_timeout_for(0, "1K")
        < policy.read_timeout_for(0, "2K")
        < policy.read_timeout_for(0, "4K")
    )
    assert policy.read_timeout_for(5, "2K") < policy.read_timeout_for(6, "2K")


def test_retry_after_seconds_and_http_date() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert policy.parse_retry_after("3") == 3
    assert policy.parse_retry_after("1.5") == 1.5
    assert (
        policy.parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now)
        == 30
    )
    assert (
        policy.parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now)
        == 0
    )
    for unreadable in [None, "", "soon", "nan", "inf"]:
        assert policy.parse_retry_after(unreadable) is None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [policy.backoff_delay(n, rng) for n in range(8)]
    assert all(0.75 * min(0.5 * 2**n, 8) <= d <= min(0.5 * 2**n, 8) for n, d in enumerate(delays))
    assert len({round(policy.backoff_delay(2, rng), 6) for _ in range(5)}) > 1


@pytest.mark.parametrize(
    "error",
    [
        JourneyValidationError("x", status_code=400),
        AuthenticationError("x", status_code=401),
        InsufficientCreditsError("x", status_code=402),
    ],
)
def test_client_errors_are_never_retried(error: Exception) -> None:
    for idempotent in (True, False):
        assert policy.retry_delay(error, 0, max_retries=5, idempotent=idempotent) is None  # type: ignore[arg-type]


def test_possibly_billed_only_retried_when_idempotent() -> None:
    for error in (ServerError("x", status_code=500), JourneyTimeoutError("x")):
        assert policy.retry_delay(error, 0, max_retries=3, idempotent=False) is None
        assert policy.retry_delay(error, 0, max_retries=3, idempotent=True) is not None


def test_a_paid_call_pays_again_for_a_possibly_billed_failure_only_within_its_repays() -> None:
    repays = policy.RepayAllowance(allowed=1)
    error = ServerError("x", status_code=502)
    assert policy.retry_delay(error, 0, max_retries=3, idempotent=False, repays=repays) is not None
    assert policy.retry_delay(error, 1, max_retries=3, idempotent=False, repays=repays) is None
    assert repays.used == 1
    # A free call does not use the paid call's allowance.
    assert policy.retry_delay(error, 0, max_retries=3, idempotent=True, repays=repays) is not None


@pytest.mark.parametrize("allowed", [0, 1, 2, 5])
def test_the_generation_rule_pays_again_at_most_allowed_times_and_retries_safe_failures(
    allowed: int,
) -> None:
    repays = policy.RepayAllowance(allowed)
    possibly_billed = [ServerError("x", status_code=500), JourneyTimeoutError("x")] * 3
    decisions = [
        policy.generation_retry_delay(error, 1, repays) is not None for error in possibly_billed
    ]
    assert decisions == [True] * allowed + [False] * (len(possibly_billed) - allowed)
    assert repays.used == allowed
    # Failures that cannot have been billed do not use the allowance; the others never retry.
    assert policy.generation_retry_delay(RateLimitedError("x", retry_after=1), 1, repays) == 1
    assert policy.generation_retry_delay(JourneyConnectionError("x"), 1, repays) is not None
    refused = InsufficientCreditsError("x", status_code=402)
    assert policy.generation_retry_delay(refused, 1, repays) is None
    assert repays.used == allowed


def test_retry_after_is_waited_as_given_up_to_the_pause_limit_by_every_rule() -> None:
    busy = RateLimitedError("x", status_code=429, retry_after=45)
    assert policy.retry_delay(busy, 0, max_retries=3, idempotent=False) == 45
    assert policy.generation_retry_delay(busy, 1, policy.RepayAllowance()) == 45
    assert policy.store_retry_delay(busy, 1) == 45
    # Longer than the limit: every rule gives up rather than sleep through it.
    assert policy.generation_retry_delay(busy, 1, policy.RepayAllowance(), max_pause=30) is None
    assert policy.retry_delay(busy, 0, max_retries=3, idempotent=False, max_pause=30) is None
    # The ladder runs out whatever the server says.
    last = policy.GENERATION_RETRIES + 1
    assert policy.generation_retry_delay(busy, last, policy.RepayAllowance()) is None


def test_the_ladders_apply_when_the_server_names_no_pause() -> None:
    rng = random.Random(7)
    error = JourneyConnectionError("x")
    for failures, nominal in enumerate(policy.GENERATION_RETRY_DELAYS, start=1):
        delay = policy.generation_retry_delay(error, failures, policy.RepayAllowance(), rng=rng)
        assert delay is not None
        assert nominal * 0.5 <= delay <= nominal * 1.5
    assert policy.store_retry_delay(DownloadError("x"), policy.STORE_RETRIES + 1) is None


@pytest.mark.parametrize("value", [-1, 6, 1.0, True, "1", None])
def test_a_repay_allowance_outside_the_ladder_is_refused(value: object) -> None:
    with pytest.raises(JourneyValidationError, match="repay_possibly_billed must be"):
        policy.check_repay_possibly_billed(value)


def test_only_an_unknown_outcome_is_left_possibly_billed() -> None:
    assert policy.left_possibly_billed(ServerError("x", status_code=500))
    assert policy.left_possibly_billed(TimeoutError("the attempt ran out of time"))
    assert not policy.left_possibly_billed(RateLimitedError("x", retry_after=1))
    assert not policy.left_possibly_billed(ValueError("x"))
    assert not policy.left_possibly_billed(None)


def test_the_attempt_deadline_is_above_the_read_timeout_the_user_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The policy sizes a deadline from the read timeout it is given and never reads the
    environment; the Prefect layer's one helper passes ``JOURNEY_READ_TIMEOUT``."""
    bare = ImagineRequest(prompt="x")
    formula = policy.CONNECT_TIMEOUT + 90 + policy.ATTEMPT_TIMEOUT_MARGIN
    monkeypatch.setenv("JOURNEY_READ_TIMEOUT", "400")
    assert policy.attempt_timeout(bare) == formula
    assert receiver.attempt_timeout(bare) == policy.CONNECT_TIMEOUT + 400 + (
        policy.ATTEMPT_TIMEOUT_MARGIN
    )
    # A client given its own read timeout sizes its deadline by it.
    assert receiver.attempt_timeout(bare, read_timeout=5) == policy.CONNECT_TIMEOUT + 5 + (
        policy.ATTEMPT_TIMEOUT_MARGIN
    )
    # An attempt's delivery is waited for past that deadline too.
    hook = receiver.JourneyWebhookReceiver(url="https://hooks.example/x", secret=new_secret())
    attempt = hook.new_attempt(bare)
    assert attempt.record.deadline - attempt.record.sent_at == pytest.approx(
        policy.CONNECT_TIMEOUT + 400 + policy.ATTEMPT_TIMEOUT_MARGIN + hook.recovery_window_seconds
    )
    monkeypatch.delenv("JOURNEY_READ_TIMEOUT")
    assert receiver.attempt_timeout(bare) == formula


def test_safe_errors_retried_with_retry_after_up_to_cap() -> None:
    assert (
        policy.retry_delay(RateLimitedError("x", retry_after=4), 0, max_retries=3, idempotent=False)
        == 4
    )
    assert (
        policy.retry_delay(
            RateLimitedError("x", retry_after=61), 0, max_retries=3, idempotent=False
        )
        is None
    )
    assert (
        policy.retry_delay(JourneyConnectionError("x"), 0, max_retries=3, idempotent=False)
        is not None
    )
    assert (
        policy.retry_delay(JourneyConnectionError("x"), 3, max_retries=3, idempotent=False) is None
    )


def test_errors_pickle_with_their_attributes() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(RateLimitedError("slow down", retry_after=2.5)))
    assert error.retry_after == 2.5 and error.retryable and str(error) == "slow down [retryable]"
