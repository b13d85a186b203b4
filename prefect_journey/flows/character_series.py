"""The same characters across several scenes: references presigned once, scenes in parallel.

Character sheets usually live in a bucket (``s3://brand-assets/characters/ana.png``); they
are presigned once per run and sent as references with every scene.
"""

from __future__ import annotations

from typing import cast

from prefect import flow
from prefect.futures import wait

from prefect_journey.credentials import load_credentials
from prefect_journey.destinations import load_destination
from prefect_journey.errors import JourneyError, JourneyValidationError, failure_text
from prefect_journey.models import ImagineRequest, ImagineResult, display_text
from prefect_journey.publishing import image_row, publish_summary, report_image
from prefect_journey.recovery import load_receiver, task_timeout
from prefect_journey.storage import StoredImage, slugify
from prefect_journey.tasks import (
    check_variant,
    declare_assets,
    imagine,
    presign_references,
    resolve_variant,
    settle,
    store_image,
)

# The objects of a series sit under its name, in scene order.
SERIES_KEY_TEMPLATE = "{series}/{index:02d}-{slug}.{ext}"


@flow(name="character-series")
def character_series(
    character_refs: list[str],
    scenes: list[str],
    destination: str | None = None,
    series: str = "series",
    aspect_ratio: str = "3:4",
    resolution: str | None = None,
    variant: str = "",
    credentials_block: str | None = None,
    destination_block: str | None = None,
    webhook_block: str | None = None,
) -> list[StoredImage]:
    """One image per scene with the same reference images, scenes in parallel; stored as
    ``{series}/{index:02d}-{scene slug}.{ext}``.

    Args:
        character_refs: The character sheets (https URLs or ``s3://`` objects, presigned
            once for the run), sent with every scene.
        scenes: One prompt per image.
        destination: An fsspec URL or folder; default ``JOURNEY_DESTINATION`` or ./outputs.
        series: The series' name (the first part of every key).
        aspect_ratio: One of 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3.
        resolution: 1K, 2K or 4K.
        variant: Part of every cache key (``"{scheduled_date}"``: new images each day).
        credentials_block: A saved ``JourneyCredentials``; default ``JOURNEY_API_KEY``.
        destination_block: A saved ``ImageDestination`` (wins over ``destination``).
        webhook_block: A saved ``JourneyWebhookReceiver``: a lost answer is recovered from
            its webhook delivery instead of being bought again; default
            ``JOURNEY_WEBHOOK_URL`` and ``JOURNEY_WEBHOOK_SECRET``, else no recovery.

    Returns:
        The stored objects, in scene order.

    Raises:
        JourneyValidationError: No scene, or bad parameters, before any credit is spent.
        JourneyError: Some scenes failed, raised after every other scene is stored.

    Example:
        ```python
        from prefect_journey.flows import character_series

        character_series(
            ["https://example.com/ana.png"],
            ["Ana opening the shop", "Ana closing up"],
            destination="./outputs",
        )
        ```
    """
    if not scenes:
        raise JourneyValidationError("character_series needs at least one scene")
    variant = resolve_variant(check_variant(variant))
    target = load_destination(destination, destination_block)
    credentials = load_credentials(credentials_block)
    references = presign_references(character_refs, target.storage_options)
    requests = [
        ImagineRequest(
            prompt=scene, image_urls=references, aspect_ratio=aspect_ratio, resolution=resolution
        )
        for scene in scenes
    ]
    receiver = load_receiver(webhook_block)
    generate = imagine.with_options(timeout_seconds=task_timeout(requests[0], receiver))
    results = [
        generate.submit(request, credentials, variant, webhook=receiver) for request in requests
    ]
    stores = [
        store_image.submit(
            # Prefect passes the future's value; its overloads only type values.
            cast(ImagineResult, result),
            target,
            key_template=SERIES_KEY_TEMPLATE,
            key_fields={"series": slugify(series), "index": index, "slug": slugify(scene, 40)},
        )
        for index, (scene, result) in enumerate(zip(scenes, results, strict=True))
    ]
    wait(stores)
    rows, failures, stored_images = [], [], []
    for scene, result, store in zip(scenes, results, stores, strict=True):
        settled = settle(store)
        if settled.error is not None:
            failures.append(f"{display_text(scene, 60)}: {failure_text(settled.error)}")
            continue
        stored = settled.value
        report_image(stored, result.result(), target, scene)
        rows.append(image_row(scene, result.result(), stored))
        stored_images.append(stored)
    declare_assets(
        [(stored, row["prompt"]) for stored, row in zip(stored_images, rows, strict=True)]
    )
    publish_summary(f"character-series {series}", rows, failures)
    if failures:
        raise JourneyError(
            f"{len(failures)} of {len(scenes)} scenes failed: " + "; ".join(failures)
        )
    return stored_images
