"""Generate one image and store it: the main flow of prefect-journey.

Deploy by module path: ``prefect_journey.flows.generate_and_store:generate_and_store``.
``make demo`` runs it against the local emulator. It is a campaign of one item: the same
pipeline, report, summary table, events and failure text as ``batch_campaign``.
"""

from __future__ import annotations

from prefect import flow

from prefect_journey import policy
from prefect_journey.campaigns.pipeline import CampaignReport
from prefect_journey.campaigns.plan import CAMPAIGN_KEY_TEMPLATE
from prefect_journey.campaigns.run import (
    check_run_options,
    run_campaign,
)
from prefect_journey.destinations import load_destination
from prefect_journey.publishing import flow_run_name
from prefect_journey.tasks import presign_references
from prefect_journey.variants import check_variant, resolve_variant


@flow(name="generate-and-store", log_prints=True, flow_run_name=flow_run_name("image", "prompt"))
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
    campaign: str = "images",
    key_template: str = CAMPAIGN_KEY_TEMPLATE,
    overwrite: bool = False,
    max_pause: float = policy.RETRY_AFTER_CAP,
) -> CampaignReport:
    """imagine -> store, with an image artifact, a summary, an event and the object as an
    asset.

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
        campaign: The ``{campaign}`` of the key template.
        key_template: The object's key; default ``{campaign}/{index:04d}-{slug}.{ext}``. A
            scheduled flow with a ``variant`` puts ``{variant}`` in it, so each day's image
            has its own key.
        overwrite: Replace the object already at the key; by default another request's
            object there fails the run before its call.
        max_pause: The longest ``Retry-After`` waited for, in seconds; a longer one ends the
            run with the image not started (nothing billed).

    Returns:
        The report; ``outcomes[0].uri`` is the stored object.

    Raises:
        JourneyValidationError: Bad parameters, before any credit is spent.
        CampaignFailedError: The image was not stored; the reason names its failure.

    Example:
        ```python
        from prefect_journey.flows import generate_and_store

        report = generate_and_store("a lighthouse at dusk", destination="./outputs")
        print(report.outcomes[0].uri)
        ```
    """
    check_run_options(
        max_concurrency=1,
        images_per_task_run=1,
        repay_possibly_billed=repay_possibly_billed,
        max_pause=max_pause,
    )
    variant = resolve_variant(check_variant(variant))
    target = load_destination(destination, destination_block)
    reference_urls = presign_references(references, target.storage_options) if references else []
    row = {
        "prompt": prompt,
        "references": reference_urls,
        "aspect_ratio": aspect_ratio,
        "resolution": resolution,
    }
    report = run_campaign(
        [row],
        campaign=campaign,
        destination=target,
        key_template=key_template,
        variant=variant,
        credentials_block=credentials_block,
        webhook_block=webhook_block,
        overwrite=overwrite,
        repay_possibly_billed=repay_possibly_billed,
        max_pause=max_pause,
        max_concurrency=1,
        images_per_task_run=1,
    )
    print(f"image stored at {report.outcomes[0].uri}")
    return report
