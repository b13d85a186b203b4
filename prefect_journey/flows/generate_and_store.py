"""Generate one image and store it: the main flow of prefect-journey.

Deploy by module path: ``prefect_journey.flows.generate_and_store:generate_and_store``.
``make demo`` runs it against the local emulator.
"""

from __future__ import annotations

from prefect import flow

from prefect_journey import policy
from prefect_journey.credentials import load_credentials
from prefect_journey.destinations import load_destination
from prefect_journey.models import ImagineRequest
from prefect_journey.publishing import image_row, publish_summary, report_image
from prefect_journey.receiver import load_receiver
from prefect_journey.storage import StoredImage
from prefect_journey.tasks import (
    check_variant,
    declare_assets,
    for_request,
    imagine,
    presign_references,
    resolve_variant,
    store_image,
)


@flow(name="generate-and-store", log_prints=True)
def generate_and_store(
    prompt: str,
    destination: str | None = None,
    references: list[str] | None = None,
    aspect_ratio: str = "1:1",
    resolution: str | None = None,
    variant: str = "",
    credentials_block: str | None = None,
    destination_block: str | None = None,
    webhook_block: str | None = None,
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
) -> StoredImage:
    """imagine -> store, with an image artifact, a summary and the object as an asset.

    Args:
        prompt: What the image should show.
        destination: An fsspec URL or folder; default ``JOURNEY_DESTINATION`` or ./outputs.
        references: Up to 14 reference images: https URLs or ``s3://`` objects (presigned
            for this run with the destination's storage options).
        aspect_ratio: One of 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3.
        resolution: 1K, 2K or 4K (default 1K).
        variant: Part of the cache key only: ``"{scheduled_date}"`` (the run's scheduled
            date) gives a new image each day while a re-run of the same day costs nothing.
        credentials_block: A saved ``JourneyCredentials``; default ``JOURNEY_API_KEY``.
        destination_block: A saved ``ImageDestination`` (wins over ``destination``).
        webhook_block: A saved ``JourneyWebhookReceiver``: a lost answer is recovered from
            its webhook delivery instead of being bought again; default
            ``JOURNEY_WEBHOOK_URL`` and ``JOURNEY_WEBHOOK_SECRET``, else no recovery.
        repay_possibly_billed: How many times an image whose attempt may have been billed
            (read timeout, 500/502/504, dropped or malformed answer: the provider may have
            made and billed it) is paid for again, 0 to 5; default 1. With a webhook
            receiver, only after a recovery window that ended with no delivery. Failures
            that cannot have been billed are retried regardless.

    Returns:
        The stored object.

    Raises:
        JourneyValidationError: Bad parameters, before any credit is spent.
        JourneyError: The generation or the store failed (see the run's logs).

    Example:
        ```python
        from prefect_journey.flows import generate_and_store

        stored = generate_and_store("a lighthouse at dusk", destination="./outputs")
        print(stored.uri)
        ```
    """
    variant = resolve_variant(check_variant(variant))
    policy.check_repay_possibly_billed(repay_possibly_billed)
    target = load_destination(destination, destination_block)
    credentials = load_credentials(credentials_block)
    reference_urls = presign_references(references, target.storage_options) if references else []
    # Built before any call, so a bad parameter fails the run before a credit is spent.
    request = ImagineRequest(
        prompt=prompt, image_urls=reference_urls, aspect_ratio=aspect_ratio, resolution=resolution
    )
    receiver = load_receiver(webhook_block)
    result = for_request(imagine, request, receiver)(
        request, credentials, variant, webhook=receiver, repay_possibly_billed=repay_possibly_billed
    )
    stored = store_image(result, target)
    declare_assets([(stored, prompt)])
    report_image(stored, result, target, prompt)
    publish_summary("generate-and-store", [image_row(prompt, result, stored)])
    print(f"image stored at {stored.uri}")
    return stored
