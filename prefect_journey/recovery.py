"""Recover a possibly-billed generation instead of buying it again.

``imagine`` is a synchronous paid call: the ``task_id`` arrives only with the finished image,
so when the answer is lost (read timeout, dropped connection, 500/502/504, a malformed 2xx)
nobody knows whether an image was made and billed, and a retry may bill again. The provider
also POSTs the finished task to the request's ``webhook_url`` when the generation ends,
whatever happened to the HTTP answer. With a receiver configured
(:class:`JourneyWebhookReceiver`, or ``JOURNEY_WEBHOOK_URL`` and ``JOURNEY_WEBHOOK_SECRET``),
every paid attempt of both campaign executors and of the ``imagine`` tasks:

1. mints a token (:mod:`prefect_journey.tokens`) and sends ``webhook_url=<receiver>/<token>``;
2. records the attempt (its id, never the token, and when it was sent) in the result store
   of the ``imagine`` records before the request leaves, under the image's cache key, so a
   run resumed on any worker that shares the result storage finds it;
3. on a possibly-billed failure, waits up to the recovery window for the attempt's delivery,
   which the receiver (``prefect-journey webhooks``) turned into a ``journey.attempt.*``
   Prefect event about the attempt: a finished task becomes the attempt's result (no new
   paid call), a failed one its typed failure. Only when the window ends with nothing does
   the retry policy of :mod:`prefect_journey.policy` apply;
4. before paying for an image, looks for deliveries of attempts an earlier run recorded for
   the same request (a run killed while its calls were in flight) and waits for those still
   inside their window.

Without a receiver, nothing here runs and a possibly-billed failure is retried as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

from prefect.blocks.core import Block
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.events import EventPage
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.tasks import Task
from pydantic import BaseModel, Field, HttpUrl, SecretStr, field_validator

from prefect_journey import policy, settings
from prefect_journey._compat import call_sync
from prefect_journey.budget import CreditBudget
from prefect_journey.cache import record_store
from prefect_journey.client import parse_task
from prefect_journey.credentials import DOCUMENTATION_URL, LOGO_URL
from prefect_journey.errors import ConfigurationError, JourneyError, TaskFailedError
from prefect_journey.models import CREDITS_PER_IMAGE, ImagineRequest, ImagineResult, check_http_url
from prefect_journey.publishing import Logger
from prefect_journey.tokens import (
    ATTEMPT_EVENT_PREFIX,
    attempt_id,
    attempt_resource,
    delivery_url,
    mint_token,
)

# The attempt records of an image live beside its cache record, under this prefix.
ATTEMPTS_KEY_PREFIX = "journey-attempts-"
# A receiver's clock may run behind ours: deliveries are looked for from this long before the
# attempt was sent.
CLOCK_SKEW = timedelta(minutes=5)
# Deliveries read per question: one per attempt of one image, with room for replays.
DELIVERIES_READ = 20


class JourneyWebhookReceiver(Block):
    """Where the provider delivers finished tasks: the public URL of a
    ``prefect-journey webhooks`` receiver and the secret it expects.

    Given to a campaign (``webhook_block``) or to the ``imagine`` tasks (``webhook``), it turns
    on the recovery of possibly-billed generations (see :mod:`prefect_journey.recovery`).

    Example:
        Load a saved receiver and run a campaign that recovers lost answers:
        ```python
        from prefect_journey.flows import batch_campaign
        from prefect_journey.recovery import JourneyWebhookReceiver

        receiver = JourneyWebhookReceiver.load("BLOCK_NAME")
        print(receiver.url, receiver.recovery_window_seconds)
        batch_campaign(items=[{"prompt": "a lighthouse at dusk"}], webhook_block="BLOCK_NAME")
        ```
    """

    _block_type_name = "JourneyAPI Webhook Receiver"
    _block_type_slug = "journeyapi-webhook-receiver"
    _logo_url = HttpUrl(LOGO_URL)
    _documentation_url = HttpUrl(DOCUMENTATION_URL)

    url: str = Field(
        default=...,
        title="Receiver URL",
        description=(
            "The receiver's public deliveries URL, such as "
            "https://hooks.example.com/webhooks/journey (plain http only on loopback)."
        ),
    )
    secret: SecretStr = Field(
        default=...,
        description="The secret the receiver expects (its JOURNEY_WEBHOOK_SECRET).",
    )
    recovery_window_seconds: float = Field(
        default=policy.RECOVERY_WINDOW,
        gt=0,
        title="Recovery window (seconds)",
        description="How long a possibly-billed attempt waits for its delivery before a retry.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_http_url(value, what="webhook_url", https_only_remote=True)

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("the webhook secret must not be blank")
        return value

    def new_attempt(self) -> Attempt:
        """A new attempt: a fresh token, stamped now.

        Returns:
            The attempt, to record and then send with :meth:`Attempt.request`.
        """
        token = mint_token(self.secret.get_secret_value())
        return Attempt(
            id=attempt_id(token),
            sent_at=time.time(),
            webhook_url=delivery_url(self.url, token),
            webhook_secret=self.secret,
        )

    def deadline(self, failed_at: float) -> float:
        """When waiting for a delivery after a failure ends.

        Args:
            failed_at: When the attempt failed (epoch seconds).

        Returns:
            ``failed_at`` plus the recovery window.
        """
        return failed_at + self.recovery_window_seconds


def task_timeout(request: ImagineRequest, receiver: JourneyWebhookReceiver | None) -> float:
    """The timeout of an ``imagine`` task run for ``request``: its attempt's deadline
    (:func:`~prefect_journey.policy.attempt_timeout`, ``JOURNEY_READ_TIMEOUT`` included), and
    when ``receiver`` recovers its attempts the waits for deliveries too
    (:func:`~prefect_journey.policy.recovering_timeout`).

    Args:
        request: The request.
        receiver: The configured receiver, if any (none recovers a request that carries its
            own webhook, see :func:`receiver_for`).

    Returns:
        Seconds.

    Raises:
        ConfigurationError: ``JOURNEY_READ_TIMEOUT`` is malformed.
    """
    attempt = policy.attempt_timeout(request)
    receiver = receiver_for(request, receiver)
    if receiver is None:
        return attempt
    return policy.recovering_timeout(attempt, receiver.recovery_window_seconds)


def load_receiver(block_name: str | None = None) -> JourneyWebhookReceiver | None:
    """The receiver to use: the named block, else ``JOURNEY_WEBHOOK_URL`` and
    ``JOURNEY_WEBHOOK_SECRET``, else None (no recovery).

    Args:
        block_name: A saved :class:`JourneyWebhookReceiver`; None reads the environment.

    Returns:
        The receiver, or None when none is configured.

    Raises:
        ConfigurationError: The URL is set without the secret, or is malformed.
    """
    if block_name:
        return cast(JourneyWebhookReceiver, call_sync(JourneyWebhookReceiver.load, block_name))
    url, secret = settings.webhook_url(), settings.webhook_secret()
    if not url:  # the secret alone configures a receiver process, not recovery
        return None
    if not secret:
        raise ConfigurationError(
            f"{settings.WEBHOOK_URL.name} is set without {settings.WEBHOOK_SECRET.name}: "
            "recovery needs both"
        )
    try:
        return JourneyWebhookReceiver(
            url=url,
            secret=SecretStr(secret),
            recovery_window_seconds=settings.recovery_window(),
        )
    except ValueError as exc:
        raise ConfigurationError(f"{settings.WEBHOOK_URL.name}: {exc}") from None


class AttemptRecord(BaseModel):
    """One paid attempt, as recorded before it was sent: what a resumed run reads."""

    id: str
    sent_at: float


@dataclass(frozen=True)
class Attempt:
    """One paid attempt: its record, and the webhook it sends (never recorded or logged)."""

    id: str
    sent_at: float
    webhook_url: str = field(repr=False)
    webhook_secret: SecretStr = field(repr=False)

    @property
    def record(self) -> AttemptRecord:
        """What is recorded of the attempt."""
        return AttemptRecord(id=self.id, sent_at=self.sent_at)

    def request(self, request: ImagineRequest) -> ImagineRequest:
        """``request`` with this attempt's ``webhook_url`` and ``webhook_secret``.

        Args:
            request: The request, without a webhook (its cache key is computed from it).

        Returns:
            A copy to send.
        """
        return request.model_copy(
            update={"webhook_url": self.webhook_url, "webhook_secret": self.webhook_secret}
        )


# --- Attempt records ---------------------------------------------------------------------------


def _records_key(key: str) -> str:
    return ATTEMPTS_KEY_PREFIX + key


def recorded_attempts(key: str) -> list[AttemptRecord]:
    """The attempts recorded for the image of cache key ``key`` and not yet settled.

    Args:
        key: The image's cache key (the ``imagine`` task's).

    Returns:
        The records, oldest first; empty when there are none.

    Raises:
        Exception: The record exists and cannot be read (the result store's error): an
            unreadable record is not taken for none, which would let it be overwritten.
    """
    store = record_store(_imagine_task())
    records_key = _records_key(key)
    if not store.exists(records_key):
        return []
    value = store.read(records_key).result
    return [AttemptRecord.model_validate(item) for item in value] if isinstance(value, list) else []


def save_attempts(key: str, records: Iterable[AttemptRecord]) -> None:
    """Replace the attempt records of ``key``'s image.

    The caller holds the image's lock (the task engine's, or the chunked executor's), so
    reading and rewriting the list is safe.

    Args:
        key: The image's cache key.
        records: The attempts still to settle; empty once the image is settled.
    """
    record_store(_imagine_task()).write(
        [record.model_dump() for record in records], key=_records_key(key)
    )


def _imagine_task() -> Task[..., ImagineResult]:
    # Imported on use: the tasks import this module.
    from prefect_journey.tasks import imagine

    return imagine


# --- Deliveries --------------------------------------------------------------------------------


def delivery_filter(records: Iterable[AttemptRecord]) -> EventFilter:
    """The events API filter of the deliveries of ``records``' attempts, as of now.

    Args:
        records: The attempts.

    Returns:
        ``journey.attempt.*`` events of the attempts' resources, up to a little past now
        (built again for every question: a filter's end is fixed when it is built).
    """
    records = list(records)
    since = datetime.fromtimestamp(min(r.sent_at for r in records), UTC) - CLOCK_SKEW
    return EventFilter(
        occurred=EventOccurredFilter.model_validate(
            {"since": since, "until": datetime.now(UTC) + CLOCK_SKEW}
        ),
        event=EventNameFilter(prefix=[ATTEMPT_EVENT_PREFIX]),
        resource=EventResourceFilter(id=[attempt_resource(r.id) for r in records]),
    )


def delivered_result(
    payloads: list[dict[str, object]], records: list[AttemptRecord], *, charged: int
) -> ImagineResult | None:
    """The result a delivery carries, if one of ``payloads`` (event payloads) has one.

    A payload that is not a valid task is passed over: it cannot be a result.

    Args:
        payloads: The payloads of the deliveries found, in any order.
        records: The attempts they belong to (the first one dates the result).
        charged: The credits this run paid for the attempt (0 for an earlier run's).

    Returns:
        The finished image, marked ``recovered``; None when nothing usable was delivered.

    Raises:
        TaskFailedError: The delivered task failed (the provider refused the image) and no
            delivery carries an image.
    """
    refusal: TaskFailedError | None = None
    for payload in payloads:
        try:
            task = parse_task(dict(payload), "webhook delivery")
        except TaskFailedError as error:
            refusal = error
            continue
        except JourneyError as error:
            _logger().warning("a delivery was not a usable task: %s", error)
            continue
        if task.status == "finished" and task.image_url is not None:
            return ImagineResult(
                task_id=task.task_id,
                status=task.status,
                image_url=task.image_url,
                elapsed_seconds=round(time.time() - records[0].sent_at, 3),
                credits_charged=charged,
                recovered=True,
            )
    if refusal is not None:
        raise refusal
    return None


def _payloads(page: EventPage) -> list[dict[str, object]]:
    return [dict(event.payload) for event in page.events]


def _unanswered(error: Exception) -> None:
    # The events API may be briefly unreachable (a restart, a busy database): the delivery
    # may still be there at the next question, so waiting goes on.
    _logger().warning(
        "could not ask Prefect for deliveries (%s); asking again", type(error).__name__
    )


def wait_for_delivery(
    records: list[AttemptRecord], deadline: float, *, charged: int
) -> ImagineResult | None:
    """Ask the Prefect events API for a delivery of ``records`` until ``deadline``.

    Args:
        records: The attempts whose delivery would do.
        deadline: When to stop (epoch seconds); asked at least once.
        charged: The credits this run paid for the attempt (0 for an earlier run's).

    Returns:
        The recovered image; None when nothing came in time.

    Raises:
        TaskFailedError: The delivered task failed.
    """
    with get_client(sync_client=True) as client:
        while True:
            try:
                page = client.read_events(filter=delivery_filter(records), limit=DELIVERIES_READ)
            except Exception as error:  # any failure to ask is "nothing yet"
                _unanswered(error)
            else:
                found = delivered_result(_payloads(page), records, charged=charged)
                if found is not None:
                    return found
            if time.time() >= deadline:
                return None
            time.sleep(min(policy.RECOVERY_POLL_INTERVAL, max(0.0, deadline - time.time())))


async def await_delivery(
    records: list[AttemptRecord],
    deadline: float,
    *,
    charged: int,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """Async twin of :func:`wait_for_delivery`; ``client`` is a Prefect client to reuse."""
    async with get_client() if client is None else _Borrowed(client) as api:
        while True:
            try:
                page = await api.read_events(filter=delivery_filter(records), limit=DELIVERIES_READ)
            except Exception as error:  # any failure to ask is "nothing yet"
                _unanswered(error)
            else:
                found = delivered_result(_payloads(page), records, charged=charged)
                if found is not None:
                    return found
            if time.time() >= deadline:
                return None
            await asyncio.sleep(
                min(policy.RECOVERY_POLL_INTERVAL, max(0.0, deadline - time.time()))
            )


def _logger() -> Logger:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a run, as a plain function
        return logging.getLogger(__name__)


class _Borrowed:
    """A client used as ``async with`` without being closed at the end."""

    def __init__(self, client: PrefectClient) -> None:
        self.client = client

    async def __aenter__(self) -> PrefectClient:
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        return None


# --- The attempt's life ------------------------------------------------------------------------
# Sync for the ``imagine`` task (a worker thread), async for ``aimagine`` and the chunked
# executor (one event loop): the decisions are shared, only the waiting differs.


def receiver_for(
    request: ImagineRequest, receiver: JourneyWebhookReceiver | None
) -> JourneyWebhookReceiver | None:
    """The receiver that recovers ``request``'s attempts: none for a request that carries
    its own webhook (the provider delivers to one URL, and that one is the caller's).

    Args:
        request: The request to send.
        receiver: The configured receiver, if any.

    Returns:
        ``receiver``, or None.
    """
    return None if request.webhook_url is not None else receiver


def begin_attempt(key: str, receiver: JourneyWebhookReceiver) -> Attempt:
    """A new attempt for the image of ``key``, recorded before it is sent.

    Called inside the attempt's gate, right before the call, so that the record dates the
    call and not its wait for a slot.

    Args:
        key: The image's cache key; the caller holds its lock.
        receiver: Where its delivery goes.

    Returns:
        The attempt, to send with :meth:`Attempt.request`.
    """
    attempt = receiver.new_attempt()
    save_attempts(key, [*recorded_attempts(key), attempt.record])
    return attempt


def end_attempt(key: str, attempt: Attempt | None) -> None:
    """Forget a settled attempt (answered, recovered, failed, or waited out).

    Args:
        key: The image's cache key; the caller holds its lock.
        attempt: The attempt; None (no receiver) does nothing.
    """
    if attempt is not None:
        save_attempts(key, [r for r in recorded_attempts(key) if r.id != attempt.id])


def _waiting(attempt: Attempt, error: JourneyError, window: float) -> None:
    _logger().warning(
        "the answer of attempt %s is lost (%s); waiting up to %.0f s for its webhook delivery",
        attempt.id,
        type(error).__name__,
        window,
    )


def _settle(
    budget: CreditBudget | None, key: str, attempt: Attempt, found: ImagineResult | None
) -> ImagineResult | None:
    end_attempt(key, attempt)
    if found is None:
        _logger().warning("no delivery of attempt %s within the window", attempt.id)
        return None
    _logger().info("recovered task %s from attempt %s's delivery", found.task_id, attempt.id)
    if budget is not None:
        budget.recovered(billed=True)
    return found


def _refused(budget: CreditBudget | None, key: str, attempt: Attempt) -> None:
    end_attempt(key, attempt)
    if budget is not None:
        budget.recovered(billed=False)  # a refused image is not billed


def recover_attempt(
    key: str,
    attempt: Attempt,
    receiver: JourneyWebhookReceiver,
    error: JourneyError,
    budget: CreditBudget | None,
) -> ImagineResult | None:
    """After ``attempt`` failed with ``error``: its delivered image, if it may have been
    billed and the delivery comes within the recovery window.

    Args:
        key: The image's cache key; the caller holds its lock.
        attempt: The failed attempt.
        receiver: Its receiver (and recovery window).
        error: How it failed; only a possibly-billed failure is waited for.
        budget: The run's budget, told when the attempt's fate is known.

    Returns:
        The recovered image; None when the failure is to be handled as usual.

    Raises:
        TaskFailedError: The delivery says the provider refused the image.
    """
    if not error.possibly_billed:
        end_attempt(key, attempt)
        return None
    _waiting(attempt, error, receiver.recovery_window_seconds)
    try:
        found = wait_for_delivery(
            [attempt.record], receiver.deadline(time.time()), charged=CREDITS_PER_IMAGE
        )
    except TaskFailedError:
        _refused(budget, key, attempt)
        raise
    return _settle(budget, key, attempt, found)


async def arecover_attempt(
    key: str,
    attempt: Attempt,
    receiver: JourneyWebhookReceiver,
    error: JourneyError,
    budget: CreditBudget | None,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """Async twin of :func:`recover_attempt`; ``client`` is a Prefect client to reuse."""
    if not error.possibly_billed:
        await asyncio.to_thread(end_attempt, key, attempt)
        return None
    _waiting(attempt, error, receiver.recovery_window_seconds)
    try:
        found = await await_delivery(
            [attempt.record],
            receiver.deadline(time.time()),
            charged=CREDITS_PER_IMAGE,
            client=client,
        )
    except TaskFailedError:
        await asyncio.to_thread(_refused, budget, key, attempt)
        raise
    return await asyncio.to_thread(_settle, budget, key, attempt, found)


def earlier_deadline(record: AttemptRecord, request: ImagineRequest, window: float) -> float:
    """Until when an earlier run's attempt can still be delivered: its call's own deadline
    (the generation may still run) plus the recovery window.

    Args:
        record: The earlier attempt.
        request: Its request (sizes its call's deadline).
        window: The recovery window.

    Returns:
        Epoch seconds.
    """
    return record.sent_at + policy.attempt_timeout(request) + window


def _earlier(
    key: str, request: ImagineRequest, receiver: JourneyWebhookReceiver
) -> tuple[list[AttemptRecord], float]:
    records = recorded_attempts(key)
    window = receiver.recovery_window_seconds
    deadline = max((earlier_deadline(r, request, window) for r in records), default=0.0)
    if records:
        _logger().warning(
            "an earlier run left %d attempt(s) of this image unsettled; looking for their "
            "deliveries (for up to %.0f s) before paying again",
            len(records),
            max(0.0, deadline - time.time()),
        )
    return records, deadline


def _forget_earlier(key: str, found: ImagineResult | None) -> ImagineResult | None:
    save_attempts(key, [])
    if found is not None:
        _logger().info("recovered task %s from an earlier run's attempt", found.task_id)
    return found


def recover_earlier(
    key: str, request: ImagineRequest, receiver: JourneyWebhookReceiver
) -> ImagineResult | None:
    """Before paying: the delivered image of an attempt an earlier run recorded for the same
    request and never settled (it was killed with the call in flight).

    Attempts still inside their window are waited for. The records are forgotten once the
    question is answered (an image, a refusal, or nothing by the deadline); an interrupted
    wait keeps them for the next try.

    Args:
        key: The image's cache key; the caller holds its lock.
        request: The request (sizes the earlier attempts' deadlines).
        receiver: The receiver (and recovery window).

    Returns:
        The recovered image, at no charge to this run; None when there is none.

    Raises:
        TaskFailedError: The delivery says the provider refused the image.
    """
    records, deadline = _earlier(key, request, receiver)
    if not records:
        return None
    try:
        found = wait_for_delivery(records, deadline, charged=0)
    except TaskFailedError:
        _forget_earlier(key, None)
        raise
    return _forget_earlier(key, found)


async def arecover_earlier(
    key: str,
    request: ImagineRequest,
    receiver: JourneyWebhookReceiver,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """Async twin of :func:`recover_earlier`; ``client`` is a Prefect client to reuse."""
    records, deadline = await asyncio.to_thread(_earlier, key, request, receiver)
    if not records:
        return None
    try:
        found = await await_delivery(records, deadline, charged=0, client=client)
    except TaskFailedError:
        await asyncio.to_thread(_forget_earlier, key, None)
        raise
    return await asyncio.to_thread(_forget_earlier, key, found)
