"""The same characters across several scenes: references presigned once, scenes in parallel.

Character sheets usually live in a bucket (``s3://brand-assets/characters/ana.png``); they
are presigned once per run and sent as references with every scene. A series is a campaign
whose items share their references: the same pipeline, report, summary table, events and
failure text as ``batch_campaign``.
"""

from __future__ import annotations

from prefect import flow

from prefect_journey import policy
from prefect_journey.campaigns.pipeline import CampaignReport
from prefect_journey.campaigns.plan import CAMPAIGN_KEY_TEMPLATE
from prefect_journey.campaigns.run import (
    DEFAULT_MAX_CONCURRENCY,
    check_run_options,
    run_campaign,
)
from prefect_journey.destinations import load_destination
from prefect_journey.errors import JourneyValidationError
from prefect_journey.publishing import flow_run_name
from prefect_journey.tasks import presign_references
from prefect_journey.variants import check_variant, resolve_variant


@flow(name="character-series", flow_run_name=flow_run_name("series", "series", "scenes"))
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
    key_template: str = CAMPAIGN_KEY_TEMPLATE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    overwrite: bool = False,
    max_pause: float = policy.RETRY_AFTER_CAP,
) -> CampaignReport:
    """One image per scene with the same reference images, scenes in parallel; stored as
    ``{series}/{index:04d}-{scene slug}.{ext}`` by default.

    Args:
        character_refs: The character sheets (https URLs or ``s3://`` objects, presigned
            once for the run), sent with every scene.
        scenes: One prompt per image.
        destination: An fsspec URL or folder; default ``JOURNEY_DESTINATION`` or ./outputs.
        series: The series' name (the ``{campaign}`` of the key template).
        aspect_ratio: One of 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3.
        resolution: 1K, 2K or 4K.
        variant: Part of every cache key (``"{scheduled_date}"``: new images each day).
        credentials_block: A saved ``JourneyCredentials``; default ``JOURNEY_API_KEY``.
        destination_block: A saved block (wins over ``destination``): an
            ``ImageDestination``'s name, or ``"<block-type-slug>/<name>"`` for any storage
            block docs/blocks.md lists, such as ``s3-bucket/brand-assets``.
        webhook_block: A saved ``JourneyWebhookReceiver``: a lost answer is recovered from
            its webhook delivery instead of being bought again; default
            ``JOURNEY_WEBHOOK_URL`` and ``JOURNEY_WEBHOOK_SECRET``, else no recovery.
        repay_possibly_billed: How many times an image whose attempt may have been billed
            (read timeout, 500/502/504, dropped or malformed answer: the provider may have
            made and billed it) is paid for again, 0 to 5; default 1. With a webhook
            receiver, only after a recovery window that ended with no delivery. Failures
            that cannot have been billed are retried regardless.
        key_template: Each object's key (``{variant}`` gives each day's series its keys).
        max_concurrency: Scenes generated at once.
        overwrite: Replace the objects already at the series' keys.
        max_pause: The longest ``Retry-After`` waited for, in seconds; a longer one stops
            the series' new calls (those scenes are reported not started, nothing billed).

    Returns:
        The report, one outcome per scene in scene order.

    Raises:
        JourneyValidationError: No scene, or bad parameters, before any credit is spent.
        CampaignFailedError: Some scenes were not stored, raised after every other scene
            is stored; the reason names each.

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
    check_run_options(
        max_concurrency=max_concurrency,
        images_per_task_run=None,
        repay_possibly_billed=repay_possibly_billed,
        max_pause=max_pause,
    )
    variant = resolve_variant(check_variant(variant))
    target = load_destination(destination, destination_block)
    references = presign_references(character_refs, target.storage_options)
    rows = [
        {
            "prompt": scene,
            "references": references,
            "aspect_ratio": aspect_ratio,
            "resolution": resolution,
        }
        for scene in scenes
    ]
    return run_campaign(
        rows,
        campaign=series,
        destination=target,
        key_template=key_template,
        variant=variant,
        credentials_block=credentials_block,
        webhook_block=webhook_block,
        overwrite=overwrite,
        repay_possibly_billed=repay_possibly_billed,
        max_pause=max_pause,
        max_concurrency=max_concurrency,
    )
