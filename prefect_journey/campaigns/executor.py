"""How a campaign's items are grouped into task runs, and how many run at once: the only
thing that differs between a task run per image and many images per task run.

Every item lives the same life (:func:`~prefect_journey.campaigns.item.run_item`) on the
flow's event loop; a group of items is one ``journey-images`` task run. A task run per image
shows each image as its own run in the UI; each costs the Prefect server a task run's
records and events, which at high demand sets the pace instead of the API
(BENCHMARKS.md). So unless told, a campaign of many images that keeps many calls in flight
groups them by itself (:func:`auto_images_per_task_run`) and logs what it chose.
"""

from __future__ import annotations

import asyncio
import math

from prefect import get_run_logger, task
from prefect.artifacts import ProgressArtifact, aupdate_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run as current_task_run

from prefect_journey._compat import shared_async_client
from prefect_journey.cache import locked_elsewhere, record_store
from prefect_journey.campaigns.item import SharedRun, run_item
from prefect_journey.campaigns.pipeline import Campaign, ItemOutcome, outcome
from prefect_journey.campaigns.plan import CampaignItem
from prefect_journey.campaigns.progress import CampaignProgress
from prefect_journey.credentials import async_journey_client
from prefect_journey.gate import Backpressure
from prefect_journey.generation import PaidCalls
from prefect_journey.models import display_text
from prefect_journey.publishing import (
    PROGRESS_INTERVAL,
    RUN_NAME_PROMPT_CHARS,
    declare_assets,
    progress_key,
    publish_gallery,
    run_artifacts_url,
)
from prefect_journey.storage import async_download_client
from prefect_journey.tasks import imagine

# A task run per image while the run keeps at most this many calls in flight, or has at most
# this many images: then the Prefect server has at most this many task runs under way, which
# it keeps up with beside the calls (docs/campaigns.md has the measurements).
PER_IMAGE_UP_TO = 32
# Beyond, images share task runs so that about this many task runs carry the calls in
# flight: each task run costs the server its records, state events and a tag-slot request,
# which at high demand compete with the images' own artifacts and events for the machine,
# while a few task runs cost next to nothing (at N=400, C=100, 4 s a generation: 25 images
# per task run delivered more images per second than 4, and 50 no more than 25).
TASK_RUNS_IN_FLIGHT = 4


def auto_images_per_task_run(items: int, max_concurrency: int) -> int:
    """How many images share a task run when the campaign is not told.

    Args:
        items: The items to run.
        max_concurrency: Calls in flight at most.

    Returns:
        1 while ``max_concurrency`` or ``items`` is at most :data:`PER_IMAGE_UP_TO`; else
        enough images per task run that about :data:`TASK_RUNS_IN_FLIGHT` task runs carry
        the calls in flight, never more than ``items``.

    Example:
        ```python
        from prefect_journey.campaigns.executor import auto_images_per_task_run

        assert auto_images_per_task_run(items=100, max_concurrency=25) == 1
        assert auto_images_per_task_run(items=400, max_concurrency=100) == 25
        ```
    """
    if max_concurrency <= PER_IMAGE_UP_TO or items <= PER_IMAGE_UP_TO:
        return 1
    return min(items, math.ceil(max_concurrency / TASK_RUNS_IN_FLIGHT))


def run_items(
    todo: list[CampaignItem],
    campaign: Campaign,
    *,
    max_concurrency: int,
    images_per_task_run: int,
    progress: CampaignProgress,
) -> list[ItemOutcome]:
    """Run ``todo`` in task runs of ``images_per_task_run`` items, on one event loop.

    Args:
        todo: The items to generate and store.
        campaign: What every item of the run shares.
        max_concurrency: Calls in flight at most (and stores, separately).
        images_per_task_run: Items per task run.
        progress: Told of each item as it ends.

    Returns:
        One outcome per item, in row order.
    """
    outcomes, shared = asyncio.run(
        _run_groups(todo, campaign, max_concurrency, images_per_task_run, progress)
    )
    # After the loop has ended: the asset task run is sync, and nothing waits for it.
    declare_assets(shared.new_objects)  # one task run for the whole campaign
    gallery = sorted(shared.gallery, key=lambda entry: entry.row)
    publish_gallery(campaign.name, gallery, len(shared.new_objects), run_artifacts_url())
    return sorted(outcomes, key=lambda o: o.row)


async def _run_groups(
    todo: list[CampaignItem],
    campaign: Campaign,
    max_concurrency: int,
    size: int,
    progress: CampaignProgress,
) -> tuple[list[ItemOutcome], SharedRun]:
    # Images another run is generating right now go last: their task runs would wait for
    # that run's locks while holding places under way, and by the time they start they are
    # most likely cache hits.
    locks = record_store(imagine).lock_manager
    todo = sorted(todo, key=lambda item: locked_elsewhere(locks, campaign.generation_key(item)))
    groups = [todo[start : start + size] for start in range(0, len(todo), size)]
    # One connection per call in flight: a slow call never waits for a pooled connection.
    api = async_journey_client(campaign.credentials, max_retries=0, max_connections=max_concurrency)
    downloads = async_download_client(max_connections=max_concurrency)  # one per store
    # Task runs under way: enough groups to fill every slot twice over (the window's
    # depth) and one more, so a group waiting on one slow image never leaves a slot idle,
    # while the rest are not yet task runs in the UI.
    under_way = asyncio.Semaphore(math.ceil(2 * max_concurrency / size) + 1)
    # One Prefect client on this loop for the task runs, the deliveries and every artifact.
    async with api, downloads, shared_async_client() as prefect:
        shared = SharedRun(
            PaidCalls(
                api,
                budget=campaign.budget,
                concurrency_limit=campaign.concurrency_limit,
                receiver=campaign.receiver,
                repay_possibly_billed=campaign.repay_possibly_billed,
                slots=asyncio.Semaphore(max_concurrency),
                pause=Backpressure(campaign.max_pause),
                prefect=prefect,
            ),
            downloads,
            prefect,
            stores=asyncio.Semaphore(max_concurrency),
            window=asyncio.Semaphore(2 * max_concurrency),
            finished=progress.finished,
        )

        async def group_run(items: list[CampaignItem]) -> list[ItemOutcome]:
            async with under_way:
                return await run_images(items, campaign, shared)

        running = asyncio.gather(*(group_run(g) for g in groups), return_exceptions=True)
        # Created while the first items start, not before: their calls do not wait for it.
        title = f"campaign {display_text(campaign.name)}"
        progress_artifact = await ProgressArtifact(
            progress=100.0 * progress.share,
            key=progress_key(campaign.slug),
            description=f"{title}: {progress.summary()}",
        ).acreate(client=prefect)
        over = False
        while not over:
            await asyncio.wait([running], timeout=PROGRESS_INTERVAL)
            over = running.done()  # read before the update, so the last one says 100
            share = 1.0 if over else progress.share
            # The counts and the credits read the budget (a file or Redis): off the loop.
            counts = await asyncio.to_thread(progress.summary)
            await aupdate_progress_artifact(
                progress_artifact.id,
                100.0 * share,
                description=f"{title}: {counts}",
                client=prefect,
            )
        results = running.result()
    outcomes: list[ItemOutcome] = []
    for group, result in zip(groups, results, strict=True):
        if isinstance(result, BaseException):  # the task run itself broke
            broken = [outcome(item, None, None, cached=False, error=result) for item in group]
            for item_outcome in broken:
                progress.finished(item_outcome)
            outcomes += broken
        else:
            outcomes += result
    return outcomes, shared


def _images_run_name() -> str:
    items: list[CampaignItem] = current_task_run.parameters.get("items") or []
    if len(items) == 1:
        prompt = display_text(items[0].request.prompt, RUN_NAME_PROMPT_CHARS)
        return f"image {items[0].row}: {prompt}"
    if not items:
        return "images: none"
    return f"images: rows {items[0].row}-{items[-1].row}"


# Untagged: a tag concurrency limit counts task runs, and a task run here carries several
# images, so it could not bound calls (max_concurrency and the campaign's global concurrency
# limit do, per attempt); and Prefect asks its API for tag slots at every tagged task run's
# start, which a SQLite-backed server busy with the campaign's first events refuses (503)
# and Prefect's client retries after about 2 s, delaying every first call.
@task(
    name="journey-images",
    cache_policy=NO_CACHE,  # each image has its own cache records; the task run has none
    task_run_name=_images_run_name,
)
async def run_images(
    items: list[CampaignItem], campaign: Campaign, shared: SharedRun
) -> list[ItemOutcome]:
    """Generate and store ``items`` concurrently, bounded by ``shared``'s slots.

    Args:
        items: The task run's items.
        campaign: What every item of the run shares.
        shared: The run's connections and slots.

    Returns:
        One outcome per item; one image's failure is its outcome's reason, never the
        others' or the task run's.
    """
    return list(await asyncio.gather(*(run_item(item, campaign, shared) for item in items)))


def log_grouping(items: int, max_concurrency: int, images_per_task_run: int | None) -> int:
    """The images per task run for this run, chosen if not given, and logged.

    Args:
        items: The items to run.
        max_concurrency: Calls in flight at most.
        images_per_task_run: The campaign's choice; None lets it choose.

    Returns:
        Images per task run.
    """
    if images_per_task_run is not None:
        return images_per_task_run
    size = auto_images_per_task_run(items, max_concurrency)
    get_run_logger().info(
        "%s (max_concurrency=%d; pass images_per_task_run to choose)",
        "a task run per image"
        if size == 1
        else f"{size} images per task run, to keep the Prefect server's load per image low",
        max_concurrency,
    )
    return size
