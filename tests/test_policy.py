"""Timeout formula, Retry-After parsing and the retry decision."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from prefect_journey import policy
from prefect_journey.errors import (
    AuthenticationError,
    InsufficientCreditsError,
    JourneyConnectionError,
    JourneyTimeoutError,
    JourneyValidationError,
    RateLimitedError,
    ServerError,
)


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
