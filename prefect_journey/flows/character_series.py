"""The same characters across several scenes: references presigned once, scenes in parallel.

Character sheets usually live in a bucket (``s3://brand-assets/characters/ana.png``); they
are presigned once per run and sent as references with every scene.
"""

from __future__ import annotations

from typing import cast

from prefect import flow
from prefect.futures import wait

from prefect_journey import policy
from prefect_journey.credentials import load_credentials
from prefect_journey.destinations import load_destination
from prefect_journey.errors import JourneyError, JourneyValidationError, failure_text
from prefect_journey.models import ImagineRequest, ImagineResult, display_text
from prefect_journey.publishing import image_row, publish_summary, report_image
from prefect_journey.receiver import load_receiver
from prefect_journey.storage import StoredImage, slugify
from prefect_journey.tasks import (
    check_variant,
    declare_assets,
    for_request,
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
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
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
        repay_possibly_billed: How many times an image whose attempt may have been billed
            (read timeout, 500/502/504, dropped or malformed answer: the provider may have
            made and billed it) is paid for again, 0 to 5; default 1. With a webhook
            receiver, only after a recovery window that ended with no delivery. Failures
            that cannot have been billed are retried regardless.

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
    policy.check_repay_possibly_billed(repay_possibly_billed)
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
    # Every scene has the same references and resolution: one timeout fits them all.
    generate = for_request(imagine, requests[0], receiver)
    results = [
        generate.submit(
            request,
            credentials,
            variant,
            webhook=receiver,
            repay_possibly_billed=repay_possibly_billed,
        )
        for request in requests
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
    rows, stored_images = [], []
    failures: list[str] = []
    not_repaid: list[str] = []
    for scene, result, store in zip(scenes, results, stores, strict=True):
        generated = settle(result)
        settled = generated if generated.error is not None else settle(store)
        if settled.error is not None:
            line = f"{display_text(scene, 60)}: {failure_text(settled.error)}"
            left = policy.left_possibly_billed(generated.error)
            (not_repaid if left else failures).append(line)
            continue
        stored = settled.value
        report_image(stored, result.result(), target, scene)
        rows.append(image_row(scene, result.result(), stored))
        stored_images.append(stored)
    declare_assets(
        [(stored, row["prompt"]) for stored, row in zip(stored_images, rows, strict=True)]
    )
    publish_summary(f"character-series {series}", rows, failures, not_repaid=not_repaid)
    if failures or not_repaid:
        lost = failures + [f"{line} (possibly billed, not repaid)" for line in not_repaid]
        raise JourneyError(f"{len(lost)} of {len(scenes)} scenes failed: " + "; ".join(lost))
    return stored_images
