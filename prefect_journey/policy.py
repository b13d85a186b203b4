"""Timeouts and retry decisions, in one place.

The README's retry/timeout table is a rendering of this module; change both together.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from prefect_journey.errors import JourneyError

# --- Timeouts -------------------------------------------------------------------------------
# Connecting is fast or broken: a loaded API still accepts TCP in well under a second.
CONNECT_TIMEOUT = 10.0
# The request body is a few hundred bytes of JSON.
WRITE_TIMEOUT = 30.0
# Waiting for a free pooled connection. Pools are sized to the caller's concurrency
# (see ``JourneyClient(max_connections=...)``), so a wait here means a sizing bug.
POOL_TIMEOUT = 30.0

# No bytes arrive until the image exists, so the read timeout is the whole generation time.
# Public reports: p95 33-98 s for Nano Banana via resellers, 50-120 s at 4K with many
# references. The base covers a slow p99 without references; each reference adds upload and
# encoding time on the provider's side.
READ_TIMEOUT_BASE = {"1K": 90.0, "2K": 105.0, "4K": 150.0}
READ_TIMEOUT_PER_REFERENCE = 3.0


def read_timeout_for(reference_count: int, resolution: str | None) -> float:
    """Seconds to wait for a generation: ``base[resolution] + 3 s x references``.

    1K: 90 s bare, 132 s with 14 references; 2K: 105/147 s; 4K: 150/192 s.
    """
    return READ_TIMEOUT_BASE[resolution or "1K"] + READ_TIMEOUT_PER_REFERENCE * reference_count


# --- Retries --------------------------------------------------------------------------------
# Retries the client makes by itself, and only for failures that cannot have been billed.
DEFAULT_MAX_RETRIES = 3
# A server asking for a longer pause than this is better handled by the scheduler
# (Prefect's task retries) than by a thread sleeping inside one HTTP call.
RETRY_AFTER_CAP = 60.0
# Backoff when the server gives no Retry-After: min(0.5 * 2**n, 8) seconds, minus up to 25 %
# jitter so that a fleet of clients does not retry in lockstep (as openai-python does).
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 8.0
BACKOFF_JITTER = 0.25


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent
    or unreadable. Negative values (a date in the past) become 0."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Jittered exponential backoff before retry number ``attempt`` (0-based)."""
    base = min(BACKOFF_INITIAL * 2.0**attempt, BACKOFF_MAX)
    jitter: float = (rng or random).random()
    return base * (1 - BACKOFF_JITTER * jitter)


def retry_delay(
    error: JourneyError,
    attempt: int,
    *,
    max_retries: int,
    idempotent: bool,
    rng: random.Random | None = None,
) -> float | None:
    """The one retry decision: seconds to wait before retrying, or None to give up.

    - 4xx other than 408/429 (bad input, bad key, no credits, not found): never.
    - Cannot have been billed (connection refused, 408, 429, 503): yes, honouring
      ``Retry-After`` up to :data:`RETRY_AFTER_CAP`; a longer demand is handed to the caller.
    - Possibly billed (read timeout, dropped connection, 500/502/504): only for idempotent
      calls (``/fetch``, ``/account``); a paid ``/imagine`` surfaces the error instead.
    """
    if attempt >= max_retries:
        return None
    if error.possibly_billed:
        return backoff_delay(attempt, rng) if idempotent else None
    if not error.retryable:
        return None
    retry_after: float | None = getattr(error, "retry_after", None)
    if retry_after is None:
        return backoff_delay(attempt, rng)
    if retry_after > RETRY_AFTER_CAP:
        return None
    return retry_after
