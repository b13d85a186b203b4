"""Timeouts and retry decisions, in one place.

One rule decides every retry, :func:`retry_delay`; each kind of call gives it its ladder:

- the client's own calls: a short exponential backoff (:func:`backoff_delay`);
- a paid generation: :func:`generation_retry_delay`, on :data:`GENERATION_RETRY_DELAYS`;
  a possibly-billed failure is paid again only within the image's allowance
  (:class:`RepayAllowance`, ``repay_possibly_billed``, one by default);
- a download-and-store: :func:`store_retry_delay`, on :data:`STORE_RETRY_DELAYS`.

``Retry-After`` is read once, by :func:`retry_after_seconds`, and handled one way: waited for
as given, up to a limit, past which the call gives up. The docs' retries-and-timeouts page is
a rendering of this module; change both together. No Prefect import: the plain client uses
it too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from prefect_journey.errors import JourneyError, JourneyValidationError, RateLimitedError
from prefect_journey.models import MAX_REFERENCES, ImagineRequest

# --- Timeouts -------------------------------------------------------------------------------
# Connecting is fast or broken: a loaded API still accepts TCP in well under a second.
CONNECT_TIMEOUT = 10.0
# The request body is a few hundred bytes of JSON.
WRITE_TIMEOUT = 30.0
# Waiting for a free pooled connection. Pools are sized to the caller's concurrency
# (see ``JourneyClient(max_connections=...)``), so a wait here means a sizing bug.
POOL_TIMEOUT = 30.0
# Connections a pool keeps open once their call is over (httpx's default): the rest close
# and a later call opens a new one. httpcore's pool looks at every connection it keeps, for
# each one idle, whenever a request starts or ends: with a hundred kept alive and a hundred
# calls in flight, that bookkeeping costs more than connecting again (a TLS handshake, a
# few milliseconds beside a generation's 30 s; BENCHMARKS.md, capacity).
KEEPALIVE_CONNECTIONS = 20

# No bytes arrive until the image exists, so the read timeout is the whole generation time.
# Public reports: p95 33-98 s for Nano Banana via resellers, 50-120 s at 4K with many
# references. The base covers a slow p99 without references; each reference adds upload and
# encoding time on the provider's side.
READ_TIMEOUT_BASE = {"1K": 90.0, "2K": 105.0, "4K": 150.0}
READ_TIMEOUT_PER_REFERENCE = 3.0


def read_timeout_for(reference_count: int, resolution: str | None) -> float:
    """Seconds to wait for a generation: ``base[resolution] + 3 s x references``.

    No bytes arrive until the image exists, so the read timeout is the whole generation time:
    1K: 90 s bare, 132 s with 14 references; 2K: 105/147 s; 4K: 150/192 s.

    Args:
        reference_count: The number of reference images the request sends.
        resolution: ``"1K"``, ``"2K"`` or ``"4K"``; None means 1K, the API's default.

    Returns:
        The read timeout in seconds.

    Example:
        ```python
        from prefect_journey.policy import read_timeout_for

        assert read_timeout_for(14, "4K") == 192.0
        ```
    """
    return READ_TIMEOUT_BASE[resolution or "1K"] + READ_TIMEOUT_PER_REFERENCE * reference_count


def request_read_timeout(request: ImagineRequest, override: float | None = None) -> float:
    """The read timeout of ``request``'s generation: ``override`` when given, else
    :func:`read_timeout_for` of its references and resolution.

    Args:
        request: The request to be sent.
        override: A read timeout the caller set (a client's ``read_timeout``,
            ``JOURNEY_READ_TIMEOUT``); None uses the formula.

    Returns:
        The read timeout in seconds.
    """
    if override is not None:
        return override
    return read_timeout_for(len(request.image_urls), request.resolution)


# A CDN download connects, writes and waits for a pooled connection under the API's timeouts
# above; the CDN answers at once, so its read timeout is the longest gap between two chunks.
DOWNLOAD_READ_TIMEOUT = 60.0
# A whole download's deadline is download_deadline(max_bytes): the cap at this rate plus the
# margin. 1 MiB/s is a slow link (a 25 MB 4K image in 25 s); a CDN that trickles slower is
# broken or hostile and would otherwise hold a worker for ever, one byte per read gap.
MIN_DOWNLOAD_BYTES_PER_SECOND = 1024 * 1024
# Connecting, TLS and the first byte, on top of the transfer itself.
DOWNLOAD_DEADLINE_MARGIN = 30.0


def download_deadline(max_bytes: int) -> float:
    """The seconds a whole download of up to ``max_bytes`` may take.

    Args:
        max_bytes: The download's size cap.

    Returns:
        :data:`DOWNLOAD_DEADLINE_MARGIN` plus ``max_bytes`` at
        :data:`MIN_DOWNLOAD_BYTES_PER_SECOND`: 130 s for the default 100 MB cap.

    Example:
        ```python
        from prefect_journey.policy import download_deadline

        assert download_deadline(100 * 1024 * 1024) == 130.0
        ```
    """
    return DOWNLOAD_DEADLINE_MARGIN + max_bytes / MIN_DOWNLOAD_BYTES_PER_SECOND


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
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Args:
        value: The header's value; None when the header is absent.
        now: The time an HTTP date is measured from; None means the current time (tests
            pass a fixed one). A date without a timezone is read as UTC.

    Returns:
        The seconds to wait, never negative (a date in the past gives 0); None if the header
        is absent, blank or unreadable (including NaN and infinity).
    """
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


def retry_after_seconds(error: BaseException) -> float | None:
    """The server's ``Retry-After`` carried by ``error`` (429, 503, 408), or None.

    Args:
        error: Any exception; only :class:`~prefect_journey.errors.RateLimitedError` and
            :class:`~prefect_journey.errors.ServiceUnavailableError` carry one.

    Returns:
        The seconds the server asked to wait, not capped; None when it did not say.
    """
    return error.retry_after if isinstance(error, RateLimitedError) else None


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Jittered exponential backoff before retry number ``attempt`` (0-based).

    ``min(0.5 * 2**attempt, 8)`` seconds, minus up to 25 % jitter so that a fleet of clients
    does not retry in lockstep.

    Args:
        attempt: How many retries came before this one (0 for the first retry).
        rng: The random source of the jitter; None uses the :mod:`random` module's own.

    Returns:
        Seconds to wait: more than 75 % and at most 100 % of the capped exponential delay.
    """
    base = min(BACKOFF_INITIAL * 2.0**attempt, BACKOFF_MAX)
    jitter: float = (rng or random).random()
    return base * (1 - BACKOFF_JITTER * jitter)


def retry_delay(
    error: JourneyError,
    attempt: int,
    *,
    max_retries: int,
    idempotent: bool,
    repays: RepayAllowance | None = None,
    delays: Sequence[float] | None = None,
    max_pause: float = RETRY_AFTER_CAP,
    rng: random.Random | None = None,
) -> float | None:
    """The one retry decision: seconds to wait before retrying, or None to give up.

    Every retry of the package asks it: the client's own, a paid generation's
    (:func:`generation_retry_delay`), a store's (:func:`store_retry_delay`).

    - 4xx other than 408/429 (bad input, bad key, no credits, not found), a refused task:
      never.
    - Cannot have been billed (connection refused, 408, 429, 503): yes. A ``Retry-After``
      is honoured as given, up to ``max_pause``; a longer demand gives up (the caller
      surfaces it, a campaign stops starting items). Without one, the ladder's delay.
    - Possibly billed (read timeout, dropped connection, 500/502/504): for idempotent calls
      (``/fetch``, ``/account``, a download); a paid ``/imagine`` only within ``repays``.

    Args:
        error: The failure of the attempt that just ended.
        attempt: How many retries came before (0 when the first attempt has failed).
        max_retries: The most retries allowed; once ``attempt`` reaches it, the answer is
            None.
        idempotent: Whether repeating the call cannot bill twice.
        repays: The paid call's allowance of possibly-billed failures paid again (one is
            used when the answer is yes); None allows none.
        delays: The ladder: ``delays[attempt]``, jittered (:func:`jittered`); None for the
            client's exponential :func:`backoff_delay`.
        max_pause: The longest ``Retry-After`` waited for.
        rng: The random source of the jitter; None uses the :mod:`random` module's own.

    Returns:
        Seconds to wait before the next attempt, or None to raise ``error``.

    Example:
        ```python
        from prefect_journey.errors import RateLimitedError
        from prefect_journey.policy import retry_delay

        busy = RateLimitedError("429", status_code=429, retry_after=7)
        assert retry_delay(busy, 0, max_retries=3, idempotent=False) == 7
        ```
    """
    if attempt >= max_retries:
        return None
    if error.possibly_billed:
        repaid = idempotent or (repays is not None and repays.take())
        return _ladder(attempt, delays, rng) if repaid else None
    if not error.retryable:
        return None
    retry_after = retry_after_seconds(error)
    if retry_after is None:
        return _ladder(attempt, delays, rng)
    return retry_after if retry_after <= max_pause else None


def _ladder(attempt: int, delays: Sequence[float] | None, rng: random.Random | None) -> float:
    return backoff_delay(attempt, rng) if delays is None else jittered(delays[attempt], rng)


def generation_retry_delay(
    error: JourneyError,
    failures: int,
    repays: RepayAllowance,
    *,
    max_pause: float = RETRY_AFTER_CAP,
    rng: random.Random | None = None,
) -> float | None:
    """The retry rule of a paid generation (:func:`retry_delay` on
    :data:`GENERATION_RETRY_DELAYS`, within ``repays``).

    Args:
        error: The failure of the attempt that just ended.
        failures: The image's failed attempts so far, 1 after the first.
        repays: The image's allowance of possibly-billed failures paid again.
        max_pause: The longest ``Retry-After`` waited for.
        rng: The random source of the jitter.

    Returns:
        Seconds before the next attempt, or None to give up.
    """
    return retry_delay(
        error,
        failures - 1,
        max_retries=GENERATION_RETRIES,
        idempotent=False,
        repays=repays,
        delays=GENERATION_RETRY_DELAYS,
        max_pause=max_pause,
        rng=rng,
    )


def store_retry_delay(
    error: JourneyError, failures: int, *, rng: random.Random | None = None
) -> float | None:
    """The retry rule of a download-and-store (:func:`retry_delay` on
    :data:`STORE_RETRY_DELAYS`; downloads cost no credits, so nothing counts as billed).

    Args:
        error: The failure of the attempt that just ended.
        failures: The store's failed attempts so far, 1 after the first.
        rng: The random source of the jitter.

    Returns:
        Seconds before the next attempt, or None to give up.
    """
    return retry_delay(
        error,
        failures - 1,
        max_retries=STORE_RETRIES,
        idempotent=True,
        delays=STORE_RETRY_DELAYS,
        rng=rng,
    )


# --- The pipeline's attempts ---------------------------------------------------------------
# 5 retries at 2, 4, 8, 16, 32 s (+/- 50 % jitter): a 25 % fault rate fails an item with
# probability 0.25**6 = 0.02 %, and the whole ladder stays within a minute.
GENERATION_RETRY_DELAYS: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0)
GENERATION_RETRIES = len(GENERATION_RETRY_DELAYS)
# Downloads are free: retry them briskly.
STORE_RETRY_DELAYS: tuple[float, ...] = (1.0, 5.0, 15.0)
STORE_RETRIES = len(STORE_RETRY_DELAYS)
# Each delay is drawn within +/- this share of its value, so that a fleet does not retry in
# lockstep (Prefect's retry_jitter_factor takes the same number).
RETRY_JITTER_FACTOR = 0.5
# How far above the HTTP deadline an attempt's own timeout sits, so the HTTP layer fails first
# with the clearer error.
ATTEMPT_TIMEOUT_MARGIN = 15.0
# 100 MB (the size cap) at a slow 1 MB/s, plus commit time.
STORE_TIMEOUT = 180.0


# --- Recovery of a possibly-billed generation -----------------------------------------------
# The provider POSTs the finished task to the attempt's webhook when the generation ends,
# whatever happened to the HTTP answer, and retries a refused delivery about 10, 30 and 90 s
# later.
PROVIDER_WEBHOOK_RETRY_DELAYS: tuple[float, ...] = (10.0, 30.0, 90.0)
# A generation can still run for up to a minute after the client gave up (the read timeout
# covers a p99, 4K with many references runs to 120 s).
GENERATION_OVERRUN = 60.0
# How long a possibly-billed attempt waits for its delivery before the retry ladder applies:
# the overrun plus the provider's first two delivery retries, so a receiver that could not
# reach the Prefect API for up to 40 s still recovers the image. Waiting costs time; not
# waiting costs 4 credits.
RECOVERY_WINDOW = GENERATION_OVERRUN + sum(PROVIDER_WEBHOOK_RETRY_DELAYS[:2])
# How often the events API is asked for a delivery while waiting: a delivery is worth
# seconds, a question costs one small query.
RECOVERY_POLL_INTERVAL = 1.0


# --- Paying again for a possibly-billed generation -------------------------------------------
# Without a receiver, a possibly-billed failure (read timeout, 500/502/504, dropped answer,
# malformed 2xx) is paid again blind: the image may exist and be billed already. One repay
# turns most transient faults into an image at a risk of one extra image's price; each further
# one adds that risk again for a fault that did not clear. The fault soak (docs/reliability.md)
# measures the trade. With a receiver, the repay comes only after a recovery window that ended
# with nothing.
DEFAULT_REPAY_POSSIBLY_BILLED = 1
# Every retry of the generation ladder may be a repay, no more.
MAX_REPAY_POSSIBLY_BILLED = GENERATION_RETRIES


# --- The shared Redis (JOURNEY_REDIS_URL) -----------------------------------------------------
# A Redis answers within milliseconds; 5 s tells a stalled one from a busy one without holding
# an attempt at its gate for long.
REDIS_SOCKET_TIMEOUT = 5.0
# A refused or dropped connection is tried again 3 times, 0.1 to 1 s apart: a blip (a
# failover, a restart) passes unnoticed, while a Redis that is gone fails the attempt within
# about a second, before its call.
REDIS_RETRIES = 3
REDIS_RETRY_BACKOFF = (0.1, 1.0)
# How often a lock held elsewhere, or freed, is looked at again: as often as Prefect's own
# file locks.
LOCK_POLL_INTERVAL = 0.1
# The receiver remembers each delivery, and which task each token delivered, this long: far
# past the provider's last retry of a delivery (130 s after its first try) and any attempt
# record's expiry, at about 150 bytes a delivery (100,000 deliveries a day: 15 MB).
DELIVERY_MEMORY_SECONDS = 24 * 3600.0
# A delivery is first remembered only this long, until its event is emitted: a receiver
# killed while emitting leaves nothing that would make the provider's next try (10 s later) a
# duplicate. It covers the emission's own deadline (EMIT_DEADLINE, 8 s).
DELIVERY_CLAIM_SECONDS = 10.0


def check_repay_possibly_billed(value: object) -> int:
    """``value`` if it is a whole number of repays the ladder allows.

    Args:
        value: How many times an image's possibly-billed failure may be paid again.

    Returns:
        ``value``, unchanged.

    Raises:
        JourneyValidationError: Not an int (a bool is refused), or outside
            0..:data:`MAX_REPAY_POSSIBLY_BILLED`.

    Example:
        ```python
        from prefect_journey.policy import check_repay_possibly_billed

        assert check_repay_possibly_billed(0) == 0  # never pay twice
        ```
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= MAX_REPAY_POSSIBLY_BILLED
    ):
        raise JourneyValidationError(
            f"repay_possibly_billed must be a whole number from 0 to "
            f"{MAX_REPAY_POSSIBLY_BILLED}, got {value!r}"
        )
    return value


@dataclass
class RepayAllowance:
    """One image's allowance of possibly-billed failures paid again, and how much of it is
    used. Every path that pays for an image asks it through :func:`retry_delay`.

    Attributes:
        allowed: Possibly-billed failures that may be paid again (``repay_possibly_billed``).
        used: Possibly-billed failures paid again so far.

    Example:
        ```python
        from prefect_journey.errors import ServerError
        from prefect_journey.policy import RepayAllowance, generation_retry_delay

        repays = RepayAllowance(allowed=1)
        lost = ServerError("502", status_code=502)
        assert generation_retry_delay(lost, 1, repays) is not None
        assert generation_retry_delay(lost, 2, repays) is None
        assert repays.used == 1
        ```
    """

    allowed: int = DEFAULT_REPAY_POSSIBLY_BILLED
    used: int = 0

    def take(self) -> bool:
        """Use one repay, if one is left.

        Returns:
            True when a repay was left (it is now used).
        """
        if self.used >= self.allowed:
            return False
        self.used += 1
        return True


def left_possibly_billed(error: BaseException | None) -> bool:
    """Whether a generation that ended with ``error`` may have been billed for an image
    nobody received: a possibly-billed failure not paid again, or an attempt that ran out
    of time (its call may still have run).

    Args:
        error: How the item's generation ended, or None.

    Returns:
        True for a possibly-billed :class:`~prefect_journey.errors.JourneyError` or a
        :class:`TimeoutError`.
    """
    if isinstance(error, JourneyError):
        return error.possibly_billed
    return isinstance(error, TimeoutError)


def jittered(delay: float, rng: random.Random | None = None) -> float:
    """``delay`` moved by up to :data:`RETRY_JITTER_FACTOR` of itself either way.

    The spread keeps a fleet of runs from retrying in lockstep.

    Args:
        delay: The nominal delay in seconds.
        rng: The random source; None uses the :mod:`random` module's own.

    Returns:
        A delay between 50 % and 150 % of ``delay``, never negative.
    """
    spread = (rng or random).uniform(-RETRY_JITTER_FACTOR, RETRY_JITTER_FACTOR)
    return max(0.0, delay * (1 + spread))


def attempt_timeout(request: ImagineRequest, read_timeout: float | None = None) -> float:
    """One paid attempt's deadline: connect + the request's read timeout + a margin.

    The read timeout is the one the client uses: ``read_timeout``, else the formula
    (:func:`request_read_timeout`). This module does not read the environment: the Prefect
    layer sizes its deadlines with :func:`prefect_journey.receiver.attempt_timeout`, which
    passes ``JOURNEY_READ_TIMEOUT``, so no deadline cuts a call off before the read timeout
    the user set. The margin (:data:`ATTEMPT_TIMEOUT_MARGIN`) lets the HTTP layer fail
    first, with the clearer error.

    Args:
        request: The request the attempt sends.
        read_timeout: The client's read timeout; None for the formula's.

    Returns:
        The deadline in seconds.

    Example:
        ```python
        from prefect_journey.models import ImagineRequest
        from prefect_journey.policy import attempt_timeout

        # 10 s to connect + 90 s to generate a bare 1K image + 15 s of margin
        assert attempt_timeout(ImagineRequest(prompt="a lighthouse"), read_timeout=90) == 115
        ```
    """
    return CONNECT_TIMEOUT + request_read_timeout(request, read_timeout) + ATTEMPT_TIMEOUT_MARGIN


def worst_case_attempt_timeout(*, recovering: bool = False) -> float:
    """:func:`attempt_timeout` of the slowest request the rules allow (4K, 14 references).

    Args:
        recovering: Size it for an attempt that may also wait for deliveries (see
            :func:`recovering_timeout`).

    Returns:
        The deadline in seconds.
    """
    timeout = CONNECT_TIMEOUT + read_timeout_for(MAX_REFERENCES, "4K") + ATTEMPT_TIMEOUT_MARGIN
    return recovering_timeout(timeout, RECOVERY_WINDOW) if recovering else timeout


def generation_time_limit() -> float:
    """The longest a paid generation of the slowest request can take, every attempt used:
    each attempt recovering (:func:`recovering_timeout`), the ladder's longest delays, and a
    full pause (:data:`RETRY_AFTER_CAP`) before each retry. The ``imagine`` tasks' timeout:
    every wait inside has its own deadline, so this only catches what has none.

    Returns:
        Seconds.
    """
    attempts = GENERATION_RETRIES + 1
    waits = sum(d * (1 + RETRY_JITTER_FACTOR) for d in GENERATION_RETRY_DELAYS)
    return (
        attempts * worst_case_attempt_timeout(recovering=True)
        + waits
        + GENERATION_RETRIES * RETRY_AFTER_CAP
    )


def store_time_limit() -> float:
    """The longest a store can take, every attempt used: the store tasks' timeout.

    Returns:
        Seconds.
    """
    waits = sum(d * (1 + RETRY_JITTER_FACTOR) for d in STORE_RETRY_DELAYS)
    return (STORE_RETRIES + 1) * STORE_TIMEOUT + waits


def delivery_deadline(sent_at: float, attempt: float, window: float) -> float:
    """Until when a paid attempt's webhook delivery is waited for.

    Counted from when the attempt was sent, not from when it failed: a gateway can answer
    502 early while the provider goes on generating for as long as the attempt could have
    taken, and the delivery comes when the generation ends.

    Args:
        sent_at: When the attempt was sent (epoch seconds).
        attempt: The attempt's own deadline in seconds (:func:`attempt_timeout`).
        window: The recovery window.

    Returns:
        ``sent_at + attempt + window``, epoch seconds.
    """
    return sent_at + attempt + window


def attempt_record_expiry(deadline: float) -> float:
    """When an attempt's record is dropped: after every delivery retry of the provider.

    Args:
        deadline: The attempt's :func:`delivery_deadline`.

    Returns:
        Epoch seconds past which nothing can be delivered for the attempt.
    """
    return deadline + sum(PROVIDER_WEBHOOK_RETRY_DELAYS)


def recovering_timeout(attempt: float, window: float) -> float:
    """The deadline of an attempt that recovers: before its call it may wait for an earlier
    run's attempt (that attempt's deadline plus the window), after it for its own delivery
    (the window).

    Args:
        attempt: The call's own deadline (:func:`attempt_timeout`).
        window: The recovery window.

    Returns:
        ``2 x (attempt + window)`` seconds.
    """
    return 2 * (attempt + window)
