"""The same characters across several scenes: references presigned once, scenes in parallel.

Character sheets usually live in a bucket (``s3://brand-assets/characters/ana.png``); they
are presigned once per run and sent as references with every scene.
"""

from __future__ import annotations

from typing import cast

from prefect import flow
from prefect.futures import wait

from prefect_journey.errors import JourneyError
from prefect_journey.flowkit import (
    failure_reason,
    image_row,
    load_credentials,
    load_destination,
    publish_summary,
    report_image,
    resolve_variant,
)
from prefect_journey.models import ImagineRequest, ImagineResult
from prefect_journey.storage import StoredImage, slugify
from prefect_journey.tasks import (
    attempt_timeout,
    declare_assets,
    imagine,
    presign_references,
    store_image,
)


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
) -> list[StoredImage]:
    """One image per scene with the same reference images; stored as
    ``{series}/{index:02d}-{scene slug}.{ext}``. Fails at the end if any scene failed,
    after every other scene is stored."""
    if not scenes:
        raise JourneyError("character_series needs at least one scene")
    variant = resolve_variant(variant)
    target = load_destination(destination, destination_block)
    credentials = load_credentials(credentials_block)
    references = presign_references(character_refs, target.storage_options)
    requests = [
        ImagineRequest(
            prompt=scene, image_urls=references, aspect_ratio=aspect_ratio, resolution=resolution
        )
        for scene in scenes
    ]
    generate = imagine.with_options(timeout_seconds=attempt_timeout(requests[0]))
    results = [generate.submit(request, credentials, variant) for request in requests]
    stores = [
        store_image.submit(
            # Prefect passes the future's value; its overloads only type values.
            cast(ImagineResult, result),
            target,
            key_template="{series}/{index:02d}-{slug}.{ext}",
            key_fields={"series": slugify(series), "index": index, "slug": slugify(scene, 40)},
        )
        for index, (scene, result) in enumerate(zip(scenes, results, strict=True))
    ]
    wait(stores)
    rows, failures, stored_images = [], [], []
    for scene, result, store in zip(scenes, results, stores, strict=True):
        reason = failure_reason(store)
        if reason:
            failures.append(f"{scene[:60]}: {reason}")
            continue
        stored = store.result()
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
