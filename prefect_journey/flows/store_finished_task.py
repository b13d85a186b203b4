"""Store the image of a task that finished elsewhere, announced by a webhook event.

``deployments/prefect.yaml`` triggers this flow on ``journey.task.finished`` events, which
the webhook receiver (``prefect-journey webhooks``) emits when the provider calls back.
Deploy by module path: ``prefect_journey.flows.store_finished_task:store_finished_task``.
"""

from __future__ import annotations

from prefect import flow

from prefect_journey.destinations import load_destination
from prefect_journey.models import ImagineResult
from prefect_journey.publishing import image_row, publish_summary, report_image
from prefect_journey.storage import StoredImage
from prefect_journey.tasks import declare_assets, store_image


@flow(name="store-finished-task")
def store_finished_task(
    task_id: str,
    image_url: str,
    destination: str | None = None,
    destination_block: str | None = None,
) -> StoredImage:
    """Stream ``image_url`` into the destination as ``<task_id>.<ext>``. The generation was
    paid by whoever submitted it; this run costs no credits.

    Args:
        task_id: The provider's task id (from the event's payload).
        image_url: The finished image's URL (from the event's payload).
        destination: An fsspec URL or folder; default ``JOURNEY_DESTINATION`` or ./outputs.
        destination_block: A saved ``ImageDestination`` (wins over ``destination``).

    Returns:
        The stored object.

    Raises:
        DownloadError: The image could not be fetched.
        StorageError: The destination failed.

    Example:
        ```python
        from prefect_journey.flows import store_finished_task

        store_finished_task("550e8400-e29b-41d4-a716-446655440000",
                            "https://cdn.example.com/output.png", destination="./outputs")
        ```
    """
    target = load_destination(destination, destination_block)
    # The fields a webhook does not carry (latency, cost) are unknown here, reported as 0.
    result = ImagineResult(
        task_id=task_id,
        status="finished",
        image_url=image_url,
        elapsed_seconds=0.0,
        credits_charged=0,
    )
    stored = store_image(result, target)
    declare_assets([(stored, f"task {task_id}")])
    report_image(stored, result, target, f"task {task_id}")
    publish_summary("store-finished-task", [image_row(f"task {task_id}", result, stored)])
    return stored
