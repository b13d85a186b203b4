"""Store the image of a task that finished elsewhere, announced by a webhook event.

``deployments/prefect.yaml`` triggers this flow on ``journey.task.finished`` events, which
the webhook receiver (``prefect-journey webhooks``) emits, signed, when the provider calls
back. Anyone allowed to write events could emit one, so the flow believes an event only when
it is proven (:func:`~prefect_journey.deliveries.proven_task_event`): the receiver's signature
checks and the provider's ``/fetch`` reports the same finished image. Nothing is downloaded
before that. Deploy by module path:
``prefect_journey.flows.store_finished_task:store_finished_task``.
"""

from __future__ import annotations

from prefect import flow

from prefect_journey.campaigns.pipeline import ItemOutcome, publish_outcomes
from prefect_journey.credentials import journey_client, load_credentials
from prefect_journey.deliveries import proven_task_event
from prefect_journey.destinations import load_destination
from prefect_journey.models import ImagineResult
from prefect_journey.publishing import (
    declare_assets,
    emit_stored_event,
    flow_run_name,
    report_image,
)
from prefect_journey.receiver import webhook_keys
from prefect_journey.storage import StoredImage
from prefect_journey.tasks import store_image


@flow(name="store-finished-task", flow_run_name=flow_run_name("store task", "task_id"))
def store_finished_task(
    task_id: str,
    image_url: str,
    signature: str | None = None,
    destination: str | None = None,
    destination_block: str | None = None,
    credentials_block: str | None = None,
    webhook_block: str | None = None,
) -> StoredImage:
    """Stream ``image_url`` into the destination as ``<task_id>.<ext>``, once the event that
    announced it is proven. The generation was paid by whoever submitted it; this run costs
    no credits (``/fetch`` is free).

    Args:
        task_id: The provider's task id (from the event's payload).
        image_url: The finished image's URL (from the event's payload).
        signature: The receiver's signature (from the event's payload); None is refused.
        destination: An fsspec URL or folder; default ``JOURNEY_DESTINATION`` or ./outputs.
        destination_block: A saved block (wins over ``destination``): an
            ``ImageDestination``'s name, or ``"<block-type-slug>/<name>"`` for any storage
            block docs/blocks.md lists, such as ``s3-bucket/brand-assets``.
        credentials_block: A saved ``JourneyCredentials`` (asks the provider about the
            task); default ``JOURNEY_API_KEY``.
        webhook_block: A saved ``JourneyWebhookReceiver`` whose secret checks the signature;
            default ``JOURNEY_WEBHOOK_SECRET``.

    Returns:
        The stored object.

    Raises:
        UnverifiedDeliveryError: The event is not the receiver's, or the provider does not
            confirm it; nothing was downloaded.
        ConfigurationError: No webhook secret to check the signature with.
        DownloadError: The image could not be fetched.
        StorageError: The destination failed.

    Example:
        Run by the ``store-on-webhook`` deployment's trigger; by hand, with an event's fields:
        ```python
        from prefect_journey.flows import store_finished_task

        store_finished_task(
            "550e8400-e29b-41d4-a716-446655440000",
            "https://cdn.example.com/output.png",
            signature="SIGNATURE_FROM_THE_EVENT",
            destination="./outputs",
        )
        ```
    """
    keys = webhook_keys(webhook_block)
    target = load_destination(destination, destination_block)
    with journey_client(load_credentials(credentials_block)) as api:
        proven_task_event(
            task_id=task_id, image_url=image_url, signature=signature, keys=keys, api=api
        )
    # The fields a webhook does not carry (latency, cost) are unknown here, reported as 0.
    result = ImagineResult(
        task_id=task_id,
        status="finished",
        image_url=image_url,
        elapsed_seconds=0.0,
        credits_charged=0,
    )
    stored = store_image(result, target)
    label = f"task {task_id}"
    declare_assets([(stored, label)])
    report_image(stored, result, target, label)
    emit_stored_event(stored, label)
    stored_row = ItemOutcome(
        row=1, prompt=label, status="stored", task_id=task_id, uri=stored.uri, sha256=stored.sha256
    )
    publish_outcomes("store-finished-task", [stored_row], "items=1 stored=1")
    return stored
