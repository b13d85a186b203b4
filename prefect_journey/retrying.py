"""The one retry loop: every paid generation and every store of the package retries here,
under the rules of :mod:`prefect_journey.policy`.

A provider's ``Retry-After`` is handled one way: with a run's
:class:`~prefect_journey.gate.Backpressure`, it pauses every new call of the run (the next
attempt waits at the gate with the others); without one, the loop waits it out. Either way
the wait is what the server asked, up to the limit past which the rule gives up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import httpx

from prefect_journey import policy
from prefect_journey.errors import JourneyError
from prefect_journey.gate import Backpressure
from prefect_journey.publishing import Logger
from prefect_journey.storage import Destination, StoredImage, astore_image

T = TypeVar("T")

# A rule: (the failure, failures so far) -> seconds before the next attempt, or None.
Rule = Callable[[JourneyError, int], float | None]


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    rule: Rule,
    *,
    what: str,
    logger: Logger,
    pause: Backpressure | None = None,
) -> tuple[T, int]:
    """``attempt()`` until it succeeds or ``rule`` gives up.

    Args:
        attempt: One attempt; a :class:`~prefect_journey.errors.JourneyError` is a failure
            the rule judges, anything else ends the loop at once.
        rule: The retry rule, such as :func:`~prefect_journey.policy.store_retry_delay`.
        what: What is attempted, for the log line of each failure.
        logger: Where each failure is logged.
        pause: The run's shared pause; a ``Retry-After`` holds it (and past its limit ends
            the loop with :class:`~prefect_journey.errors.NotStartedError`).

    Returns:
        The value and the attempts made.

    Raises:
        JourneyError: The last failure, when the rule gives up.
        NotStartedError: ``pause`` was asked to wait longer than its limit.
    """
    failures = 0
    while True:
        try:
            return await attempt(), failures + 1
        except JourneyError as error:
            failures += 1
            if pause is not None:
                pause.hold(error)
            delay = rule(error, failures)
            if delay is None:
                raise
            logger.warning(
                "%s attempt %d failed: %s; trying again in %.1f s", what, failures, error, delay
            )
            if pause is None or policy.retry_after_seconds(error) is None:
                await asyncio.sleep(delay)


async def store_with_retries(
    image_url: str,
    destination: Destination,
    *,
    logger: Logger,
    http: httpx.AsyncClient | None = None,
    **options: Any,
) -> StoredImage:
    """:func:`~prefect_journey.storage.astore_image` under the store's retry rule
    (:func:`~prefect_journey.policy.store_retry_delay`): the one store of the package, used by
    the store tasks and by every campaign item.

    Args:
        image_url: The image to download.
        destination: Where to write it.
        logger: Where each failed attempt is logged.
        http: A download client to share; None makes one per attempt.
        **options: The rest of ``astore_image``'s keyword options (task id, key template,
            key fields, size cap, overwrite, origin).

    Returns:
        What was written.
    """
    stored, _ = await retrying(
        partial(astore_image, image_url, destination, http=http, **options),
        policy.store_retry_delay,
        what="store",
        logger=logger,
    )
    return stored
