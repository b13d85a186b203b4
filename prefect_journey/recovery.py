"""Recover a possibly-billed generation instead of buying it again, believing only proof.

``imagine`` is a synchronous paid call: the ``task_id`` arrives only with the finished image,
so when the answer is lost (read timeout, dropped connection, 500/502/504, a malformed 2xx)
nobody knows whether an image was made and billed, and a retry may bill again. The provider
also POSTs the finished task to the request's ``webhook_url`` when the generation ends,
whatever happened to the HTTP answer. With a receiver configured
(:class:`~prefect_journey.receiver.JourneyWebhookReceiver`, or ``JOURNEY_WEBHOOK_URL`` and
``JOURNEY_WEBHOOK_SECRET``), every paid attempt of a campaign's items and of the
``imagine`` tasks:

1. mints a token (:mod:`prefect_journey.tokens`) and sends ``webhook_url=<receiver>/<token>``
   with the provider secret derived from the webhook secret (:mod:`prefect_journey.signing`);
2. records the attempt (:mod:`prefect_journey.attempts`: its id, never the token, when it
   was sent, until when its delivery is waited for) before the request leaves, so a run
   resumed on any worker that shares the result storage finds it;
3. on a possibly-billed failure, waits for the attempt's delivery until the attempt's
   deadline (sent + the attempt's timeout + the recovery window), reading the
   ``journey.attempt.*`` Prefect events the receiver (``prefect-journey webhooks``) emits
   (:mod:`prefect_journey.deliveries`). A delivery is believed only when it is **proven**:
   the receiver's signature over the attempt, task, status and image URL checks (so writing
   events to Prefect is not enough), and the provider's free ``/fetch`` of the task answers
   the same status and image URL. A
   finished task then becomes the attempt's result (no new paid call), a failed one its
   typed failure. A delivery that fails either check is refused with a warning naming the
   attempt, and the wait goes on for a real one. Only when the deadline passes with nothing
   does the retry policy of :mod:`prefect_journey.policy` apply;
4. on a 503 or 408 ("not now": nothing should have been made), keeps the record until its
   deadline all the same, so that each check before paying asks once for a late delivery;
5. before paying for an image, looks for deliveries of attempts an earlier run recorded for
   the same request (a run killed while its calls were in flight) and waits for those still
   before their deadline.

Without a receiver, nothing here runs and a possibly-billed failure is retried as the
policy says.

Each concept has its module, and the data goes one way through them:
:mod:`prefect_journey.receiver` (the Block and the configuration) ->
:mod:`prefect_journey.attempts` (the records) -> :mod:`prefect_journey.deliveries` (waiting
for a delivery and judging it) -> this module (an attempt's life: begin, end, recover).
"""

from __future__ import annotations

import asyncio
import time

from prefect.client.orchestration import PrefectClient

from prefect_journey.attempts import Attempt, AttemptRecord, recorded_attempts, save_attempts
from prefect_journey.budget import CreditBudget
from prefect_journey.client import AsyncJourneyClient
from prefect_journey.deliveries import await_delivery
from prefect_journey.errors import JourneyError, ServiceUnavailableError, TaskFailedError
from prefect_journey.models import CREDITS_PER_IMAGE, ImagineRequest, ImagineResult
from prefect_journey.publishing import Logger, run_logger
from prefect_journey.receiver import JourneyWebhookReceiver


def begin_attempt(key: str, receiver: JourneyWebhookReceiver, request: ImagineRequest) -> Attempt:
    """A new attempt at ``request`` for the image of ``key``, recorded before it is sent.

    Called inside the attempt's gate, right before the call, so that the record dates the
    call and not its wait for a slot.

    Args:
        key: The image's cache key; the caller holds its lock.
        receiver: Where its delivery goes.
        request: The request it sends.

    Returns:
        The attempt, to send with :meth:`Attempt.request`.
    """
    attempt = receiver.new_attempt(request)
    save_attempts(key, [*recorded_attempts(key), attempt.record])
    return attempt


def settle_image(key: str) -> None:
    """Forget every attempt of an image, once it is settled for good: its result is in its
    cache record, or the provider refused it.

    An image that came back is settled only after its cache record is written: a run killed
    in between leaves the record, and the next run finds the image's delivery instead of
    paying again.

    Args:
        key: The image's cache key; the caller holds its lock.
    """
    save_attempts(key, [])


def end_attempt(key: str, attempt: Attempt, error: JourneyError) -> None:
    """Settle a failed attempt by how it failed.

    Args:
        key: The image's cache key; the caller holds its lock.
        attempt: The attempt.
        error: How it failed. The provider's refusal (:class:`TaskFailedError`) settles all
            but the attempts a killed run left in flight before their deadline (they may
            still deliver an image, already billed). A 503/408
            (:class:`ServiceUnavailableError`) should have made nothing, but its record
            stays until its deadline, so that a check before paying still asks for a late
            delivery (a gateway may have answered for a provider at work). Any other
            failure forgets the attempt.
    """
    others = [r for r in recorded_attempts(key) if r.id != attempt.id]
    if isinstance(error, TaskFailedError):
        others = _unsettled(others, refused=True)
    elif isinstance(error, ServiceUnavailableError):
        others.append(attempt.record.model_copy(update={"answered": "unavailable"}))
    save_attempts(key, others)


def _waiting(attempt: Attempt, error: JourneyError) -> None:
    _logger().warning(
        "the answer of attempt %s is lost (%s); waiting up to %.0f s for its webhook delivery",
        attempt.id,
        type(error).__name__,
        max(0.0, attempt.record.deadline - time.time()),
    )


def _settle(
    budget: CreditBudget | None,
    key: str,
    attempt: Attempt,
    error: JourneyError,
    found: ImagineResult | None,
) -> ImagineResult | None:
    if found is None:
        end_attempt(key, attempt, error)
        _logger().warning("no proven delivery of attempt %s by its deadline", attempt.id)
        return None
    # Its record stays until the image's cache record is written (settle_image).
    _logger().info("recovered task %s from attempt %s's delivery", found.task_id, attempt.id)
    if budget is not None:
        budget.recovered(billed=True)
    return found


def _refusal(budget: CreditBudget | None, key: str, attempt: Attempt) -> None:
    settle_image(key)  # the provider's answer settles the image
    if budget is not None:
        budget.recovered(billed=False)  # a refused image is not billed


async def recover_attempt(
    key: str,
    attempt: Attempt,
    receiver: JourneyWebhookReceiver,
    error: JourneyError,
    budget: CreditBudget | None,
    api: AsyncJourneyClient,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """After ``attempt`` failed with ``error``: its delivered image, if it may have been
    billed and a proven delivery comes by the attempt's deadline.

    Args:
        key: The image's cache key; the caller holds its lock.
        attempt: The failed attempt.
        receiver: Its receiver (the keys that check deliveries).
        error: How it failed; only a possibly-billed failure is waited for.
        budget: The run's budget, told when the attempt's fate is known.
        api: The provider's client, to confirm a delivery with ``/fetch``.
        client: A Prefect client to reuse for reading events; None opens one.

    Returns:
        The recovered image; None when the failure is to be handled as usual.

    Raises:
        TaskFailedError: The provider confirms the delivery's refusal of the image.
    """
    if not error.possibly_billed:
        await asyncio.to_thread(end_attempt, key, attempt, error)
        return None
    _waiting(attempt, error)
    try:
        found = await await_delivery(
            [attempt.record],
            attempt.record.deadline,
            keys=receiver.signing_keys,
            api=api,
            charged=CREDITS_PER_IMAGE,
            client=client,
        )
    except TaskFailedError:
        await asyncio.to_thread(_refusal, budget, key, attempt)
        raise
    return await asyncio.to_thread(_settle, budget, key, attempt, error, found)


def _earlier(key: str) -> tuple[list[AttemptRecord], float]:
    records = recorded_attempts(key)
    # A 503/408's delivery is looked for, not waited for: nothing should have been made.
    deadline = max((r.deadline for r in records if not r.answered), default=time.time())
    if records:
        _logger().warning(
            "%d attempt(s) of this image are unsettled; looking for their deliveries "
            "(for up to %.0f s) before paying again",
            len(records),
            max(0.0, deadline - time.time()),
        )
    return records, deadline


def _unsettled(records: list[AttemptRecord], *, refused: bool) -> list[AttemptRecord]:
    """The records an answered question leaves: those before their deadline (a killed run's
    attempt may still deliver; a 503/408's is asked for again by the next check), and after
    a refusal only a killed run's (a 503/408 made nothing the refused item could use)."""
    now = time.time()
    return [r for r in records if r.deadline > now and not (refused and r.answered)]


def _forget_earlier(
    key: str, found: ImagineResult | None, *, refused: bool = False
) -> ImagineResult | None:
    if found is not None:
        # The records stay until the image's cache record is written (settle_image).
        _logger().info("recovered task %s from an earlier attempt", found.task_id)
        return found
    save_attempts(key, _unsettled(recorded_attempts(key), refused=refused))
    return None


async def recover_earlier(
    key: str,
    receiver: JourneyWebhookReceiver,
    api: AsyncJourneyClient,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """Before paying: the delivered image of an attempt recorded for the same image and not
    settled (a run killed with the call in flight, or a 503/408 still before its deadline).

    Attempts still before their deadline are waited for. The records are forgotten once the
    question is answered (an image, a refusal, or nothing by the deadline); an interrupted
    wait keeps them for the next try.

    Args:
        key: The image's cache key; the caller holds its lock.
        receiver: The receiver (the keys that check deliveries).
        api: The provider's client, to confirm a delivery with ``/fetch``.
        client: A Prefect client to reuse for reading events; None opens one.

    Returns:
        The recovered image, at no charge to this run; None when there is none.

    Raises:
        TaskFailedError: The provider confirms the delivery's refusal of the image.
    """
    records, deadline = await asyncio.to_thread(_earlier, key)
    if not records:
        return None
    try:
        found = await await_delivery(
            records, deadline, keys=receiver.signing_keys, api=api, charged=0, client=client
        )
    except TaskFailedError:
        await asyncio.to_thread(_forget_earlier, key, None, refused=True)
        raise
    return await asyncio.to_thread(_forget_earlier, key, found)


def _logger() -> Logger:
    return run_logger(__name__)
