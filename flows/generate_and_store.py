"""Generate one image and store it: the main flow of prefect-journey.

Run it: ``python flows/generate_and_store.py "a lighthouse at dusk"`` (with
``JOURNEY_API_KEY`` set, or ``make demo`` for the local emulator).
"""

from __future__ import annotations

import sys

from prefect import flow

from prefect_journey.flowkit import (
    image_row,
    load_credentials,
    load_destination,
    publish_summary,
    report_image,
    resolve_variant,
)
from prefect_journey.models import ImagineRequest
from prefect_journey.storage import StoredImage
from prefect_journey.tasks import (
    attempt_timeout,
    declare_assets,
    imagine,
    presign_references,
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
) -> StoredImage:
    """imagine -> store, with an image artifact, a summary and the object as an asset.

    ``references`` may be https URLs or ``s3://`` objects (presigned for this run).
    ``variant`` goes into the cache key only: ``"{scheduled_date}"`` (the run's scheduled
    date) gives a new image each day while a re-run of the same day costs nothing.
    """
    variant = resolve_variant(variant)
    target = load_destination(destination, destination_block)
    credentials = load_credentials(credentials_block)
    reference_urls = presign_references(references, target.storage_options) if references else []
    # Built before any call, so a bad parameter fails the run before a credit is spent.
    request = ImagineRequest(
        prompt=prompt, image_urls=reference_urls, aspect_ratio=aspect_ratio, resolution=resolution
    )
    result = imagine.with_options(timeout_seconds=attempt_timeout(request))(
        request, credentials, variant
    )
    stored = store_image(result, target)
    declare_assets([(stored, prompt)])
    report_image(stored, result, target, prompt)
    publish_summary("generate-and-store", [image_row(prompt, result, stored)])
    print(f"image stored at {stored.uri}")
    return stored


if __name__ == "__main__":
    generate_and_store(" ".join(sys.argv[1:]) or "a lighthouse at dusk, watercolor")
