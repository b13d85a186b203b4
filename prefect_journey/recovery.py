"""Recover a possibly-billed generation instead of buying it again, believing only proof.

``imagine`` is a synchronous paid call: the ``task_id`` arrives only with the finished image,
so when the answer is lost (read timeout, dropped connection, 500/502/504, a malformed 2xx)
nobody knows whether an image was made and billed, and a retry may bill again. The provider
also POSTs the finished task to the request's ``webhook_url`` when the generation ends,
whatever happened to the HTTP answer. With a receiver configured
(:class:`JourneyWebhookReceiver`, or ``JOURNEY_WEBHOOK_URL`` and ``JOURNEY_WEBHOOK_SECRET``),
every paid attempt of both campaign executors and of the ``imagine`` tasks:

1. mints a token (:mod:`prefect_journey.tokens`) and sends ``webhook_url=<receiver>/<token>``
   with the provider secret derived from the webhook secret (:mod:`prefect_journey.signing`);
2. records the attempt (:mod:`prefect_journey.attempts`: its id, never the token, when it
   was sent, until when its delivery is waited for) before the request leaves, so a run
   resumed on any worker that shares the result storage finds it;
3. on a possibly-billed failure, waits for the attempt's delivery until the attempt's
   deadline (sent + the attempt's timeout + the recovery window), reading the
   ``journey.attempt.*`` Prefect events the receiver (``prefect-journey webhooks``) emits. A
   delivery is believed only when it is **proven**: the receiver's signature over the
   attempt, task, status and image URL checks (so writing events to Prefect is not enough),
   and the provider's free ``/fetch`` of the task answers the same status and image URL. A
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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast
from uuid import UUID

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
from pydantic import ConfigDict, Field, HttpUrl, SecretStr, ValidationError, field_validator

from prefect_journey import policy, settings
from prefect_journey._compat import call_sync
from prefect_journey.attempts import (
    AttemptRecord,
    check_records_storage,
    recorded_attempts,
    save_attempts,
)
from prefect_journey.budget import CreditBudget
from prefect_journey.client import AsyncJourneyClient, JourneyClient
from prefect_journey.credentials import DOCUMENTATION_URL, LOGO_URL
from prefect_journey.errors import (
    ConfigurationError,
    JourneyError,
    NotFoundError,
    ServiceUnavailableError,
    TaskFailedError,
    UnverifiedDeliveryError,
)
from prefect_journey.models import (
    CREDITS_PER_IMAGE,
    ImagineRequest,
    ImagineResult,
    TaskStatus,
    check_http_url,
)
from prefect_journey.publishing import Logger
from prefect_journey.signing import SIGNATURE_FIELD, WebhookKeys, check_secret
from prefect_journey.tokens import (
    ATTEMPT_EVENT_PREFIX,
    attempt_id,
    attempt_resource,
    delivery_url,
    mint_token,
)

# A receiver's clock may run behind ours: deliveries are looked for from this long before the
# attempt was sent.
CLOCK_SKEW = timedelta(minutes=5)
# Deliveries read per page: one per attempt of one image, with room for replays.
DELIVERIES_READ = 50
# Pages read per question. Every page is read, newest first, so that events forged in bulk
# for an attempt cannot push its real delivery off the first page; past this many, the rest
# waits for the next question (each event is judged once, so the forgeries drain).
DELIVERY_PAGES = 20


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

    # A validation error never echoes what it was given: that could be a secret.
    model_config = ConfigDict(hide_input_in_errors=True)

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
        description=(
            "The receiver's JOURNEY_WEBHOOK_SECRET: 32 random bytes or more "
            "(make one with `prefect-journey new-secret`)."
        ),
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
        check_secret(value.get_secret_value())
        return value

    @property
    def signing_keys(self) -> WebhookKeys:
        """The keys derived from the secret (:mod:`prefect_journey.signing`)."""
        return WebhookKeys.from_secret(self.secret)

    def new_attempt(self, request: ImagineRequest) -> Attempt:
        """A new attempt at ``request``: a fresh token, stamped now, with its deadline.

        Args:
            request: The request it sends (sizes its deadline).

        Returns:
            The attempt, to record and then send with :meth:`Attempt.request`.
        """
        keys = self.signing_keys
        token = mint_token(keys.token_key)
        sent_at = time.time()
        deadline = policy.delivery_deadline(sent_at, request, self.recovery_window_seconds)
        return Attempt(
            record=AttemptRecord(
                id=attempt_id(token),
                sent_at=sent_at,
                deadline=deadline,
                expires_at=policy.attempt_record_expiry(deadline),
            ),
            webhook_url=delivery_url(self.url, token),
            webhook_secret=keys.provider_secret,
        )


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
        ConfigurationError: The URL is set without the secret, or is malformed, the secret
            is too weak, or the result storage cannot keep attempt records
            (:mod:`prefect_journey.attempts`).
    """
    if block_name:
        loaded = cast(JourneyWebhookReceiver, call_sync(JourneyWebhookReceiver.load, block_name))
        check_records_storage()
        return loaded
    url, secret = settings.webhook_url(), settings.webhook_secret()
    if not url:  # the secret alone configures a receiver process, not recovery
        return None
    if not secret:
        raise ConfigurationError(
            f"{settings.WEBHOOK_URL.name} is set without {settings.WEBHOOK_SECRET.name}: "
            "recovery needs both"
        )
    try:
        receiver = JourneyWebhookReceiver(
            url=url,
            secret=SecretStr(secret),
            recovery_window_seconds=settings.recovery_window(),
        )
    except ValueError as exc:
        raise ConfigurationError(f"{settings.WEBHOOK_URL.name}: {exc}") from None
    check_records_storage()
    return receiver


@dataclass(frozen=True)
class Attempt:
    """One paid attempt: its record, and the webhook it sends (never recorded or logged)."""

    record: AttemptRecord
    webhook_url: str = field(repr=False)
    webhook_secret: SecretStr = field(repr=False)

    @property
    def id(self) -> str:
        """The attempt's id (a digest of its token)."""
        return self.record.id

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


def webhook_keys(block_name: str | None = None) -> WebhookKeys:
    """The keys of the receiver's secret: the named block's, else ``JOURNEY_WEBHOOK_SECRET``'s.

    Args:
        block_name: A saved :class:`JourneyWebhookReceiver`; None reads the environment.

    Returns:
        The keys.

    Raises:
        ConfigurationError: No secret is configured, or it is too weak.
    """
    if block_name:
        return cast(
            JourneyWebhookReceiver, call_sync(JourneyWebhookReceiver.load, block_name)
        ).signing_keys
    secret = settings.webhook_secret()
    if not secret:
        raise ConfigurationError(
            f"checking the receiver's signature needs its secret: set "
            f"{settings.WEBHOOK_SECRET.name} or name a JourneyWebhookReceiver block"
        )
    try:
        return WebhookKeys.from_secret(secret)
    except ValueError as exc:
        raise ConfigurationError(f"{settings.WEBHOOK_SECRET.name}: {exc}") from None


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


@dataclass(frozen=True)
class Delivery:
    """One ``journey.attempt.*`` event as read: which attempt it is about and what it says."""

    event_id: UUID
    attempt: str
    payload: dict[str, object]


def deliveries(page: EventPage) -> list[Delivery]:
    """The deliveries of an events page.

    Args:
        page: What the events API answered.

    Returns:
        One :class:`Delivery` per event.
    """
    return [
        Delivery(
            event_id=event.id,
            attempt=event.resource.id.removeprefix(ATTEMPT_EVENT_PREFIX),
            payload=dict(event.payload),
        )
        for event in page.events
    ]


def signed_task(delivery: Delivery, keys: WebhookKeys) -> TaskStatus | None:
    """The finished or failed task ``delivery`` carries, if the receiver signed it.

    Args:
        delivery: The delivery.
        keys: The keys of the receiver's secret.

    Returns:
        The task; None (with a warning naming the attempt) for anything else.
    """
    try:
        task = TaskStatus.model_validate(delivery.payload)
    except ValidationError:
        _refused(delivery, "it is not a task")
        return None
    if task.status not in ("finished", "failed"):
        _refused(delivery, f"its task is {task.status}, not finished or failed")
        return None
    if not keys.signed(
        delivery.payload.get(SIGNATURE_FIELD),
        attempt=delivery.attempt,
        task_id=task.task_id,
        status=task.status,
        image_url=task.image_url,
    ):
        _refused(delivery, "its signature is not the receiver's")
        return None
    return task


# What the provider's /fetch answered about a delivered task: the task, or the failure.
Confirmation = TaskStatus | JourneyError
# Asked again at the next question: the provider could not be asked, or not yet.
AGAIN = "again"


def proven_result(
    delivery: Delivery,
    task: TaskStatus,
    confirmation: Confirmation,
    records: list[AttemptRecord],
    *,
    charged: int,
) -> ImagineResult | str | None:
    """What a signed delivery proves, once the provider was asked about its task.

    Args:
        delivery: The delivery.
        task: Its signed task (:func:`signed_task`).
        confirmation: The provider's ``/fetch`` of ``task.task_id``, or how it failed.
        records: The attempts waited for (the first one dates the result).
        charged: The credits this run paid for the attempt (0 for an earlier run's).

    Returns:
        The delivered image, marked ``recovered``, when the provider reports the same
        finished image; :data:`AGAIN` when the provider does not know the task yet or could
        not be asked; None
        (with a warning) when it contradicts the delivery.

    Raises:
        TaskFailedError: The delivery and the provider both say the task failed.
    """
    if isinstance(confirmation, TaskFailedError):
        if task.status == "failed":
            raise confirmation
        _refused(delivery, f"the provider reports task {task.task_id} failed")
        return None
    if isinstance(confirmation, JourneyError):
        # Not known yet (the provider's /fetch may lag its delivery), or not reachable: asked
        # again at the next question, never believed unconfirmed.
        return AGAIN
    if confirmation.status != "finished" or task.status != "finished":
        if confirmation.status in ("finished", "failed"):
            _refused(delivery, f"the provider reports task {task.task_id} {confirmation.status}")
            return None
        return AGAIN  # the provider has not finished it yet: no delivery is due before
    if confirmation.image_url != task.image_url or task.image_url is None:
        _refused(delivery, f"its image URL is not the one the provider reports for {task.task_id}")
        return None
    return ImagineResult(
        task_id=task.task_id,
        status="finished",
        image_url=task.image_url,
        elapsed_seconds=round(time.time() - records[0].sent_at, 3),
        credits_charged=charged,
        recovered=True,
    )


def proven_task_event(
    *, task_id: str, image_url: str, signature: object, keys: WebhookKeys, api: JourneyClient
) -> TaskStatus:
    """The finished task a ``journey.task.finished`` event announces, once proven: the
    receiver signed it, and the provider's ``/fetch`` reports the same finished image.

    Args:
        task_id: The task the event names.
        image_url: The image URL it names.
        signature: The signature it carries (anything: events come from outside).
        keys: The keys of the receiver's secret.
        api: The provider's client.

    Returns:
        The task, as the provider reports it.

    Raises:
        UnverifiedDeliveryError: The signature does not check, or the provider does not
            know the task, reports it failed or unfinished, or with another image URL.
        JourneyError: The provider could not be asked (the client's errors).
    """
    if not keys.signed(
        signature, attempt=None, task_id=task_id, status="finished", image_url=image_url
    ):
        raise UnverifiedDeliveryError(
            f"the event for task {task_id} is not signed by the webhook receiver: refused, "
            "nothing downloaded",
            task_id=task_id,
        )
    try:
        task = api.fetch(task_id)
    except (NotFoundError, TaskFailedError) as error:
        raise UnverifiedDeliveryError(
            f"the provider does not confirm task {task_id} ({type(error).__name__}): refused, "
            "nothing downloaded",
            task_id=task_id,
        ) from None
    if task.status != "finished" or task.image_url != image_url:
        raise UnverifiedDeliveryError(
            f"the provider reports task {task_id} {task.status} with another image than the "
            "event's: refused, nothing downloaded",
            task_id=task_id,
        )
    return task


def _refused(delivery: Delivery, why: str) -> None:
    _logger().warning(
        "refused a delivery for attempt %s: %s; waiting for a proven one", delivery.attempt, why
    )


def _unanswered(error: Exception) -> None:
    # The events API may be briefly unreachable (a restart, a busy database): the delivery
    # may still be there at the next question, so waiting goes on.
    _logger().warning(
        "could not ask Prefect for deliveries (%s); asking again", type(error).__name__
    )


def _confirm(api: JourneyClient, task_id: str) -> Confirmation:
    try:
        return api.fetch(task_id)
    except JourneyError as error:
        return error


async def _aconfirm(api: AsyncJourneyClient, task_id: str) -> Confirmation:
    try:
        return await api.fetch(task_id)
    except JourneyError as error:
        return error


class _Judge:
    """Judges each delivery once (a refused one stays refused), across the questions of one
    wait, and says what the wait should do next."""

    def __init__(self, records: list[AttemptRecord], keys: WebhookKeys, charged: int) -> None:
        self.records, self.keys, self.charged = records, keys, charged
        self.judged: set[UUID] = set()
        self.unconfirmed: set[UUID] = set()  # warned about once

    def new(self, pages: list[EventPage]) -> list[tuple[Delivery, TaskStatus]]:
        """The signed deliveries of ``pages`` not judged yet (unsigned ones are refused)."""
        found = []
        for delivery in (d for page in pages for d in deliveries(page)):
            if delivery.event_id in self.judged:
                continue
            task = signed_task(delivery, self.keys)
            if task is None:
                self.judged.add(delivery.event_id)
            else:
                found.append((delivery, task))
        return found

    def verdict(
        self, delivery: Delivery, task: TaskStatus, confirmation: Confirmation
    ) -> ImagineResult | None:
        """The proven result, if the provider confirms ``delivery``."""
        verdict = proven_result(delivery, task, confirmation, self.records, charged=self.charged)
        if verdict == AGAIN:
            if delivery.event_id not in self.unconfirmed:
                self.unconfirmed.add(delivery.event_id)
                _logger().warning(
                    "the provider does not confirm task %s delivered for attempt %s yet (%s); "
                    "asking again until the attempt's deadline",
                    task.task_id,
                    delivery.attempt,
                    type(confirmation).__name__,
                )
            return None
        self.judged.add(delivery.event_id)
        return verdict if isinstance(verdict, ImagineResult) else None


def wait_for_delivery(
    records: list[AttemptRecord],
    deadline: float,
    *,
    keys: WebhookKeys,
    api: JourneyClient,
    charged: int,
) -> ImagineResult | None:
    """Ask the Prefect events API for a proven delivery of ``records`` until ``deadline``.

    Args:
        records: The attempts whose delivery would do.
        deadline: When to stop (epoch seconds); asked at least once.
        keys: The keys of the receiver's secret (checks the signatures).
        api: The provider's client (confirms the delivered task with ``/fetch``).
        charged: The credits this run paid for the attempt (0 for an earlier run's).

    Returns:
        The recovered image; None when nothing proven came in time.

    Raises:
        TaskFailedError: The delivered task failed, and the provider confirms it.
    """
    judge = _Judge(records, keys, charged)
    with get_client(sync_client=True) as client:
        while True:
            try:
                pages = [client.read_events(filter=delivery_filter(records), limit=DELIVERIES_READ)]
                while pages[-1].next_page and len(pages) < DELIVERY_PAGES:
                    pages.append(client.read_events_page(str(pages[-1].next_page)))
            except Exception as error:  # any failure to ask is "nothing yet"
                _unanswered(error)
            else:
                for delivery, task in judge.new(pages):
                    found = judge.verdict(delivery, task, _confirm(api, task.task_id))
                    if found is not None:
                        return found
            if time.time() >= deadline:
                return None
            time.sleep(min(policy.RECOVERY_POLL_INTERVAL, max(0.0, deadline - time.time())))


async def await_delivery(
    records: list[AttemptRecord],
    deadline: float,
    *,
    keys: WebhookKeys,
    api: AsyncJourneyClient,
    charged: int,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """Async twin of :func:`wait_for_delivery`; ``client`` is a Prefect client to reuse."""
    judge = _Judge(records, keys, charged)
    async with get_client() if client is None else _Borrowed(client) as events:
        while True:
            try:
                pages = [
                    await events.read_events(filter=delivery_filter(records), limit=DELIVERIES_READ)
                ]
                while pages[-1].next_page and len(pages) < DELIVERY_PAGES:
                    pages.append(await events.read_events_page(str(pages[-1].next_page)))
            except Exception as error:  # any failure to ask is "nothing yet"
                _unanswered(error)
            else:
                for delivery, task in judge.new(pages):
                    found = judge.verdict(delivery, task, await _aconfirm(api, task.task_id))
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


def end_attempt(key: str, attempt: Attempt | None, error: JourneyError | None = None) -> None:
    """Settle an attempt by how it ended.

    Args:
        key: The image's cache key; the caller holds its lock.
        attempt: The attempt; None (no receiver) does nothing.
        error: How it failed. None (it brought the image) settles every attempt of the
            image; the provider's refusal (:class:`TaskFailedError`) those past their
            deadline too. A 503/408
            (:class:`ServiceUnavailableError`) should have made nothing, but its record stays
            until its deadline, so that a check before paying still asks for a late delivery
            (a gateway may have answered for a provider at work). Any other failure forgets
            the attempt.
    """
    if attempt is None:
        return
    now = time.time()
    others = [
        r
        for r in recorded_attempts(key)
        # The image settles every attempt; a refusal those past their deadline (an attempt
        # of a killed run may still deliver an image, already billed).
        if error is not None
        and r.id != attempt.id
        and (not isinstance(error, TaskFailedError) or r.deadline > now)
    ]
    if isinstance(error, ServiceUnavailableError):
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
    end_attempt(key, attempt)
    _logger().info("recovered task %s from attempt %s's delivery", found.task_id, attempt.id)
    if budget is not None:
        budget.recovered(billed=True)
    return found


def _refusal(budget: CreditBudget | None, key: str, attempt: Attempt) -> None:
    end_attempt(key, attempt)  # the provider's answer settles the image
    if budget is not None:
        budget.recovered(billed=False)  # a refused image is not billed


def recover_attempt(
    key: str,
    attempt: Attempt,
    receiver: JourneyWebhookReceiver,
    error: JourneyError,
    budget: CreditBudget | None,
    api: JourneyClient,
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

    Returns:
        The recovered image; None when the failure is to be handled as usual.

    Raises:
        TaskFailedError: The provider confirms the delivery's refusal of the image.
    """
    if not error.possibly_billed:
        end_attempt(key, attempt, error)
        return None
    _waiting(attempt, error)
    try:
        found = wait_for_delivery(
            [attempt.record],
            attempt.record.deadline,
            keys=receiver.signing_keys,
            api=api,
            charged=CREDITS_PER_IMAGE,
        )
    except TaskFailedError:
        _refusal(budget, key, attempt)
        raise
    return _settle(budget, key, attempt, error, found)


async def arecover_attempt(
    key: str,
    attempt: Attempt,
    receiver: JourneyWebhookReceiver,
    error: JourneyError,
    budget: CreditBudget | None,
    api: AsyncJourneyClient,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """Async twin of :func:`recover_attempt`; ``client`` is a Prefect client to reuse."""
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


def _forget_earlier(key: str, found: ImagineResult | None) -> ImagineResult | None:
    now = time.time()
    # An image found settles every attempt; else (nothing, or a refusal) a record before its
    # deadline stays: a killed run's attempt may still deliver, and a 503/408's is asked for
    # again by the next check.
    kept = [] if found is not None else [r for r in recorded_attempts(key) if r.deadline > now]
    save_attempts(key, kept)
    if found is not None:
        _logger().info("recovered task %s from an earlier attempt", found.task_id)
    return found


def recover_earlier(
    key: str, receiver: JourneyWebhookReceiver, api: JourneyClient
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

    Returns:
        The recovered image, at no charge to this run; None when there is none.

    Raises:
        TaskFailedError: The provider confirms the delivery's refusal of the image.
    """
    records, deadline = _earlier(key)
    if not records:
        return None
    try:
        found = wait_for_delivery(records, deadline, keys=receiver.signing_keys, api=api, charged=0)
    except TaskFailedError:
        _forget_earlier(key, None)
        raise
    return _forget_earlier(key, found)


async def arecover_earlier(
    key: str,
    receiver: JourneyWebhookReceiver,
    api: AsyncJourneyClient,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """Async twin of :func:`recover_earlier`; ``client`` is a Prefect client to reuse."""
    records, deadline = await asyncio.to_thread(_earlier, key)
    if not records:
        return None
    try:
        found = await await_delivery(
            records, deadline, keys=receiver.signing_keys, api=api, charged=0, client=client
        )
    except TaskFailedError:
        await asyncio.to_thread(_forget_earlier, key, None)
        raise
    return await asyncio.to_thread(_forget_earlier, key, found)
