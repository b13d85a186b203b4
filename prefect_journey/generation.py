"""A paid generation, written once: every path that pays for an image comes here (the
``imagine`` tasks, every campaign item, ``prefect-journey imagine``).

    [the run's pause -> look for an earlier attempt's delivery -> a slot of the run
     -> the pause again -> the gate (concurrency limit, budget) -> record the attempt
     -> the call
     -> settle, or recover a lost answer from its delivery] x the retry rule

The retry rule is :func:`~prefect_journey.policy.generation_retry_delay`, applied by the one
loop of :mod:`prefect_journey.retrying`; a ``Retry-After`` pauses every call of the run
(:class:`~prefect_journey.gate.Backpressure`). The image's lock and its cache record belong
to whoever runs this: Prefect's task engine for the ``imagine`` tasks, the item's own step
for a campaign (:mod:`prefect_journey.campaigns.item`), both on the same records.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial

from prefect.client.orchestration import PrefectClient

from prefect_journey import policy
from prefect_journey.attempts import Attempt
from prefect_journey.budget import CreditBudget
from prefect_journey.client import AsyncJourneyClient
from prefect_journey.errors import JourneyError, JourneyTimeoutError
from prefect_journey.gate import Backpressure, paid_attempt
from prefect_journey.models import ImagineRequest, ImagineResult
from prefect_journey.publishing import Logger, log_generation
from prefect_journey.receiver import JourneyWebhookReceiver, attempt_timeout, receiver_for
from prefect_journey.recovery import begin_attempt, recover_attempt, recover_earlier
from prefect_journey.retrying import retrying


@dataclass
class PaidCalls:
    """What every paid attempt of one run shares.

    Attributes:
        api: The provider's client; its own retries are off (``max_retries=0``): the retry
            rule here decides.
        budget: The credit budget each attempt reserves from; None for none.
        concurrency_limit: The Prefect global concurrency limit each attempt holds a slot
            of; None for none.
        receiver: The webhook receiver that recovers lost answers; None for none.
        repay_possibly_billed: How many times an image's possibly-billed failure is paid
            again (:class:`~prefect_journey.policy.RepayAllowance`).
        slots: The run's calls in flight: a slot is held for the call only, so the wait for
            a delivery and the pause before a retry leave it to the run's other images.
        pause: The run's shared pause (``Retry-After``) and its limit.
        prefect: A Prefect client to reuse for reading deliveries; None opens one.
    """

    api: AsyncJourneyClient
    budget: CreditBudget | None = None
    concurrency_limit: str | None = None
    receiver: JourneyWebhookReceiver | None = None
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    pause: Backpressure = field(default_factory=Backpressure)
    prefect: PrefectClient | None = None


async def generate(
    request: ImagineRequest, calls: PaidCalls, *, key: str, logger: Logger
) -> ImagineResult:
    """Pay for ``request``'s image: attempts until one brings it or the retry rule gives up.

    Args:
        request: The checked request.
        calls: What the run's paid attempts share.
        key: The image's cache key (names its attempt records); the caller holds its lock.
        logger: The run's logger.

    Returns:
        The image, with its attempts and the possibly-billed ones paid again counted, and
        ``recovered`` when it came from a webhook delivery. Its attempt records stay: the
        caller writes the image's cache record, then settles the image
        (:func:`~prefect_journey.recovery.settle_image`), so a process killed in between
        leaves the next run a delivery to find instead of an image to pay for again.

    Raises:
        JourneyError: The last attempt's failure, when the rule gives up.
        NotStartedError: The provider asked for a pause longer than the run's limit.
        TimeoutError: The last attempt ran out of time (possibly billed, never repaid).
    """
    repays = policy.RepayAllowance(calls.repay_possibly_billed)
    receiver = receiver_for(request, calls.receiver)
    result, attempts = await retrying(
        partial(_attempt, request, key, receiver, calls),
        partial(policy.generation_retry_delay, repays=repays, max_pause=calls.pause.max_pause),
        what="imagine",
        logger=logger,
        pause=calls.pause,
    )
    return log_generation(
        logger,
        result.model_copy(update={"attempts": attempts, "possibly_billed_attempts": repays.used}),
    )


async def _attempt(
    request: ImagineRequest, key: str, receiver: JourneyWebhookReceiver | None, calls: PaidCalls
) -> ImagineResult:
    """One paid attempt, or the delivery of an earlier one."""
    # The client's own read timeout, so the deadline never cuts its call short.
    limit = attempt_timeout(request, calls.api.read_timeout)
    # The run's pause first: a delivery that comes during it is found by the check below.
    await calls.pause.wait()
    if receiver is not None:
        # Before every paid attempt: an earlier run's attempt, or a 503 of this one, may
        # have been delivered after all.
        earlier = await recover_earlier(key, receiver, calls.api, calls.prefect)
        if earlier is not None:
            return earlier
    attempt = None
    try:
        async with calls.slots:
            # Again once the slot is ours: a pause may have begun while this image queued.
            await calls.pause.wait()
            async with paid_attempt(calls.budget, calls.concurrency_limit, lease=limit):
                if receiver is not None:
                    attempt = await asyncio.to_thread(begin_attempt, key, receiver, request)
                result = await asyncio.wait_for(
                    calls.api.imagine(attempt.request(request) if attempt else request), limit
                )
    except JourneyError as error:
        return await _recovered_or_raise(key, attempt, receiver, calls, error)
    except TimeoutError:
        # Possibly billed and never repaid (the HTTP read timeout, set below this, normally
        # fires first with a clearer error); its delivery may still come.
        lost = JourneyTimeoutError(f"no answer within the attempt timeout ({limit:.0f} s)")
        try:
            return await _recovered_or_raise(key, attempt, receiver, calls, lost)
        except JourneyTimeoutError:
            raise TimeoutError(str(lost)) from None
    # The attempt's record stays until the image's cache record is written: the caller,
    # which writes it, settles the image (recovery.settle_image).
    return result


async def _recovered_or_raise(
    key: str,
    attempt: Attempt | None,
    receiver: JourneyWebhookReceiver | None,
    calls: PaidCalls,
    error: JourneyError,
) -> ImagineResult:
    """The delivered image of a failed attempt, else ``error`` raised."""
    if attempt is not None and receiver is not None:
        recovered = await recover_attempt(
            key, attempt, receiver, error, calls.budget, calls.api, calls.prefect
        )
        if recovered is not None:
            return recovered
    raise error
