"""Waiting for an attempt's delivery, and judging what comes.

The receiver (``prefect-journey webhooks``) turns each delivery of the provider into a
``journey.attempt.*`` Prefect event. This module reads those events for the attempts waited
for (:func:`wait_for_delivery`, :func:`await_delivery`) and believes a delivery only when it
is proven: the receiver's signature checks (:func:`signed_task`) and the provider's free
``/fetch`` of the task answers the same status and image URL (:func:`proven_result`). The
same proof guards the ``store-on-webhook`` flow (:func:`proven_task_event`). When to wait,
and what a delivery settles: :mod:`prefect_journey.recovery`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.events import EventPage
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from pydantic import ValidationError

from prefect_journey import policy
from prefect_journey.attempts import AttemptRecord
from prefect_journey.client import AsyncJourneyClient, JourneyClient
from prefect_journey.errors import (
    JourneyError,
    NotFoundError,
    TaskFailedError,
    UnverifiedDeliveryError,
)
from prefect_journey.models import ImagineResult, TaskStatus
from prefect_journey.publishing import Logger, run_logger
from prefect_journey.signing import SIGNATURE_FIELD, WebhookKeys
from prefect_journey.tokens import ATTEMPT_EVENT_PREFIX, attempt_resource

# A receiver's clock may run behind ours: deliveries are looked for from this long before the
# attempt was sent.
CLOCK_SKEW = timedelta(minutes=5)
# Deliveries read per page: one per attempt of one image, with room for replays.
DELIVERIES_READ = 50
# Pages read per question. Every page is read, newest first, so that events forged in bulk
# for an attempt cannot push its real delivery off the first page; past this many, the rest
# waits for the next question (each event is judged once, so the forgeries drain).
DELIVERY_PAGES = 20


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


async def await_delivery(
    records: list[AttemptRecord],
    deadline: float,
    *,
    keys: WebhookKeys,
    api: AsyncJourneyClient,
    charged: int,
    client: PrefectClient | None = None,
) -> ImagineResult | None:
    """Ask the Prefect events API for a proven delivery of ``records`` until ``deadline``.

    Args:
        records: The attempts whose delivery would do.
        deadline: When to stop (epoch seconds); asked at least once.
        keys: The keys of the receiver's secret (checks the signatures).
        api: The provider's client (confirms the delivered task with ``/fetch``).
        charged: The credits this run paid for the attempt (0 for an earlier run's).
        client: A Prefect client to reuse; None opens one.

    Returns:
        The recovered image; None when nothing proven came in time.

    Raises:
        TaskFailedError: The delivered task failed, and the provider confirms it.
    """
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
    return run_logger(__name__)


class _Borrowed:
    """A client used as ``async with`` without being closed at the end."""

    def __init__(self, client: PrefectClient) -> None:
        self.client = client

    async def __aenter__(self) -> PrefectClient:
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        return None
