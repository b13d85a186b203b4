"""Executor 2 of the campaign pipeline: many images per task run, at API speed.

Prefect records every task run through its server's event pipeline; with two task runs, an
artifact and an event per image, the server's work, not the API, sets the pace of a large
campaign (BENCHMARKS.md). Here a chunk of images runs inside one task run, on one event
loop, and each image gets what the per-image executor gets from Prefect:

- the same cache records: same keys, result store, lock and expiry as the ``imagine`` and
  store tasks (:mod:`prefect_journey.cache`), so a campaign can switch executors and a
  re-run is free either way, and two runs asking for the same image at once pay once;
- the same retry rules and delays (:mod:`prefect_journey.policy`), every attempt gated by
  the credit budget and the global concurrency limit (:mod:`prefect_journey.gate`), and a
  per-attempt timeout that really interrupts the call (it is a coroutine, not a thread);
- per image: the same log lines, image artifact and ``journey.image.stored`` event.

What it gives up: a task run per image. An image's attempts and timing are in its chunk's
logs and in the summary table; the chunk's task run completes even when some of its images
failed (they are reported, as in the other executor). Chunks run on the flow's event loop,
in its process: there is nothing to hand to Dask.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import ProgressArtifact, aupdate_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import PrefectClient
from prefect.runtime import task_run as current_task_run

from prefect_journey import policy
from prefect_journey._compat import shared_async_client
from prefect_journey.attempts import Attempt
from prefect_journey.cache import (
    LOCKED_ELSEWHERE,
    cache_result,
    cached_result,
    lock_if_free_and_read,
    new_holder,
    record_store,
    release_if_held,
)
from prefect_journey.campaigns.pipeline import (
    Campaign,
    ItemOutcome,
    outcome,
    store_and_publish,
)
from prefect_journey.campaigns.plan import CampaignItem
from prefect_journey.campaigns.progress import CampaignProgress
from prefect_journey.client import AsyncJourneyClient
from prefect_journey.credentials import async_journey_client
from prefect_journey.errors import JourneyError, JourneyTimeoutError
from prefect_journey.gate import apaid_attempt
from prefect_journey.models import ImagineResult, display_text
from prefect_journey.publishing import (
    PROGRESS_INTERVAL,
    emit_stored_event,
    image_artifact,
    log_generation,
    log_stored,
    progress_key,
)
from prefect_journey.receiver import attempt_timeout, receiver_for
from prefect_journey.recovery import (
    arecover_attempt,
    arecover_earlier,
    begin_attempt,
    end_attempt,
)
from prefect_journey.storage import StoredImage, astore_image, async_download_client
from prefect_journey.tasks import TAGS, declare_assets, imagine

T = TypeVar("T")

# What the docs and the benchmarks suggest for large campaigns (batch_campaign's default
# stays one image per task run): enough that Prefect's per-run cost vanishes (1,000 images
# are 20 task runs), few enough that a chunk's logs stay readable in the UI.
RECOMMENDED_IMAGES_PER_TASK_RUN = 50


@dataclass
class SharedRun:
    """Connections and slots the chunks of one run share (one event loop, one process).

    ``generations`` bounds calls in flight (the run's ``max_concurrency``); ``stores`` bounds
    downloads the same way, so stores run beside generations as in the per-image executor.
    ``window`` bounds the images between their cache lookup and the end of their
    generation: twice ``generations`` keeps the next image for every slot looked up and
    waiting, while the others neither hold cache locks nor crowd the loop and its threads at
    the start. ``finished`` is told about every image as it ends (progress); ``new_objects``
    collects what this run stored (declared as assets at the end).
    """

    api: AsyncJourneyClient
    downloads: httpx.AsyncClient  # one pool for every CDN download of the run
    # One Prefect client for every artifact: each new one builds a TLS context.
    prefect: PrefectClient
    generations: asyncio.Semaphore
    stores: asyncio.Semaphore
    window: asyncio.Semaphore
    finished: Callable[[ItemOutcome], None] = field(default=lambda outcome: None)
    new_objects: list[tuple[StoredImage, str]] = field(default_factory=list)


def run_chunked(
    todo: list[CampaignItem],
    campaign: Campaign,
    max_concurrency: int,
    images_per_task_run: int,
    progress: CampaignProgress,
) -> list[ItemOutcome]:
    """Run ``todo`` in task runs of ``images_per_task_run`` images.

    Args:
        todo: The items to generate and store.
        campaign: What every item of the run shares.
        max_concurrency: Calls in flight at most (and stores, separately).
        images_per_task_run: Images per chunk, each chunk one task run.
        progress: Told of each item as it ends.

    Returns:
        One outcome per item.
    """
    outcomes, new_objects = asyncio.run(
        _run_chunks(todo, campaign, max_concurrency, images_per_task_run, progress)
    )
    # After the loop has ended: the asset task run is sync, and nothing waits for it.
    declare_assets(new_objects)  # one task run for the whole campaign
    return outcomes


async def _run_chunks(
    todo: list[CampaignItem],
    campaign: Campaign,
    max_concurrency: int,
    images_per_task_run: int,
    progress: CampaignProgress,
) -> tuple[list[ItemOutcome], list[tuple[StoredImage, str]]]:
    chunks = [
        todo[start : start + images_per_task_run]
        for start in range(0, len(todo), images_per_task_run)
    ]
    # One connection per call in flight: a slow call never waits for a pooled connection.
    api = async_journey_client(campaign.credentials, max_retries=0, max_connections=max_concurrency)
    downloads = async_download_client(max_connections=max_concurrency)  # one per store
    # One Prefect client on this loop for the chunks' task runs and every artifact: without
    # it, each chunk's task run opens a client of its own as it starts, on the loop the
    # first calls are waiting for.
    async with api, downloads, shared_async_client() as prefect:
        shared = SharedRun(
            api,
            downloads,
            prefect,
            generations=asyncio.Semaphore(max_concurrency),
            stores=asyncio.Semaphore(max_concurrency),
            window=asyncio.Semaphore(2 * max_concurrency),
            finished=progress.finished,
        )
        # Every chunk starts at once: the slots, not the chunks, bound the work, so a chunk
        # waiting on one slow image never leaves a slot idle.
        running = asyncio.gather(
            *(imagine_and_store_chunk(chunk, campaign, shared) for chunk in chunks),
            return_exceptions=True,
        )
        # Created while the chunks start, not before: the first calls do not wait for it.
        progress_artifact = await ProgressArtifact(
            progress=100.0 * progress.share,
            key=progress_key(campaign.slug),
            description=f"campaign {display_text(campaign.name)}",
        ).acreate(client=prefect)
        over = False
        while not over:
            await asyncio.wait([running], timeout=PROGRESS_INTERVAL)
            over = running.done()  # read before the update, so the last one says 100
            share = 1.0 if over else progress.share
            await aupdate_progress_artifact(progress_artifact.id, 100.0 * share, client=prefect)
        results = running.result()
    outcomes: list[ItemOutcome] = []
    for chunk, result in zip(chunks, results, strict=True):
        if isinstance(result, BaseException):  # the task run itself broke
            broken = [outcome(item, None, None, cached=False, error=result) for item in chunk]
            for item_outcome in broken:
                progress.finished(item_outcome)
            outcomes += broken
        else:
            outcomes += result
    return outcomes, shared.new_objects


def _chunk_run_name() -> str:
    items: list[CampaignItem] = current_task_run.parameters.get("items") or []
    if not items:
        return "images: none"
    return f"images: rows {items[0].row}-{items[-1].row}"


@task(
    name="journey-imagine-and-store-chunk",
    tags=TAGS,
    cache_policy=NO_CACHE,  # each image has its own cache records; the chunk has none
    task_run_name=_chunk_run_name,
)
async def imagine_and_store_chunk(
    items: list[CampaignItem], campaign: Campaign, shared: SharedRun
) -> list[ItemOutcome]:
    """Generate and store ``items`` concurrently, bounded by ``shared``'s slots.

    Args:
        items: The chunk's items.
        campaign: What every item of the run shares.
        shared: Connections and slots of the run.

    Returns:
        One outcome per item; one image's failure is its outcome's reason, never the
        others' or the chunk's.
    """
    return list(await asyncio.gather(*(_one(item, campaign, shared) for item in items)))


async def _one(item: CampaignItem, campaign: Campaign, shared: SharedRun) -> ItemOutcome:
    generated: ImagineResult | None = None
    cached = False
    try:
        generated, cached = await _generate(item, campaign, shared)
        stored = await _store(item, generated, campaign, shared)
        result = outcome(item, generated, stored, cached=cached)
    except Exception as error:  # reported per image, like a failed task run
        result = outcome(item, generated, None, cached=cached, error=error)
    shared.finished(result)
    return result


async def _generate(
    item: CampaignItem, campaign: Campaign, shared: SharedRun
) -> tuple[ImagineResult, bool]:
    """The item's image under its key's lock, as the task engine does (SERIALIZABLE): a run
    computing this image elsewhere finishes first and its record is read instead of paying
    again. The lock is taken inside the run's window, so it is held from shortly before the
    call, not from the run's start."""
    key = campaign.generation_key(item)
    locks = record_store(imagine).lock_manager
    holder = new_holder()
    try:
        async with shared.window:
            found = await asyncio.to_thread(lock_if_free_and_read, imagine, locks, key, holder)
            if found is not LOCKED_ELSEWHERE:
                return await _cached_or_generated(found, key, holder, item, campaign, shared)
        # Another run is generating this image: wait outside the window, so that the run's
        # other images go on meanwhile.
        if locks is not None:
            await locks.aacquire_lock(key, holder)  # waits on the loop, not on a thread
        async with shared.window:
            found = await asyncio.to_thread(cached_result, imagine, key, holder=holder)
            return await _cached_or_generated(found, key, holder, item, campaign, shared)
    finally:
        # Off the loop: removing a lock file waits on the filesystem's journal, and every
        # image's answer waits for the loop.
        await asyncio.to_thread(release_if_held, locks, key, holder)


async def _cached_or_generated(
    found: object,
    key: str,
    holder: str,
    item: CampaignItem,
    campaign: Campaign,
    shared: SharedRun,
) -> tuple[ImagineResult, bool]:
    """The cached result ``found`` under ``key``'s lock, or a new one, paid and cached."""
    if isinstance(found, ImagineResult):
        return found, True
    repays = policy.RepayAllowance(campaign.repay_possibly_billed)
    result, attempts = await _retrying(
        lambda: _paid_call(item, key, campaign, shared),
        policy.GENERATION_RETRY_DELAYS,
        repays.should_retry,
        "imagine",
    )
    result = result.model_copy(
        update={"attempts": attempts, "possibly_billed_attempts": repays.used}
    )
    await asyncio.to_thread(cache_result, imagine, key, result, holder)
    return log_generation(get_run_logger(), result), False


async def _paid_call(
    item: CampaignItem, key: str, campaign: Campaign, shared: SharedRun
) -> ImagineResult:
    """One paid attempt, holding one of the run's generation slots for its call only: the
    wait for a lost answer's delivery, and the pause before a retry, leave the slot to the
    run's other images."""
    # The client's own read timeout, so the deadline never cuts its call short.
    limit = attempt_timeout(item.request, shared.api.read_timeout)
    receiver = receiver_for(item.request, campaign.receiver)
    if receiver is not None:
        # Before every paid attempt, as the per-image task does on each of its tries: an
        # earlier run's attempt, or a 503 of this one, may have been delivered after all.
        earlier = await arecover_earlier(key, receiver, shared.api, shared.prefect)
        if earlier is not None:
            return earlier
    attempt = None
    try:
        async with shared.generations, apaid_attempt(campaign.budget, campaign.concurrency_limit):
            if receiver is not None:
                attempt = await asyncio.to_thread(begin_attempt, key, receiver, item.request)
            result = await asyncio.wait_for(
                shared.api.imagine(attempt.request(item.request) if attempt else item.request),
                limit,
            )
    except JourneyError as error:
        return await _recovered_or_raise(key, attempt, campaign, shared, error)
    except TimeoutError:
        # Like a task timeout: possibly billed, never retried (the HTTP read timeout, set
        # below this, normally fires first with a clearer error); its delivery may come.
        lost = JourneyTimeoutError(f"no answer within the attempt timeout ({limit:.0f} s)")
        try:
            return await _recovered_or_raise(key, attempt, campaign, shared, lost)
        except JourneyTimeoutError:
            raise TimeoutError(str(lost)) from None
    if attempt is not None:
        await asyncio.to_thread(end_attempt, key, attempt)
    return result


async def _recovered_or_raise(
    key: str, attempt: Attempt | None, campaign: Campaign, shared: SharedRun, error: JourneyError
) -> ImagineResult:
    """The delivered image of a failed attempt, else ``error`` raised."""
    if attempt is not None and campaign.receiver is not None:
        recovered = await arecover_attempt(
            key, attempt, campaign.receiver, error, campaign.budget, shared.api, shared.prefect
        )
        if recovered is not None:
            return recovered
    raise error


async def _store(
    item: CampaignItem, generated: ImagineResult, campaign: Campaign, shared: SharedRun
) -> StoredImage:
    key = campaign.store_key(item, generated)
    if item.row not in campaign.restore:
        found = await asyncio.to_thread(cached_result, store_and_publish, key)
        if isinstance(found, StoredImage):
            return found
    async with shared.stores:
        stored, _ = await _retrying(
            lambda: astore_image(
                generated.image_url,
                campaign.destination,
                task_id=generated.task_id,
                key_template=campaign.key_template,
                key_fields=item.key_fields,
                http=shared.downloads,
                overwrite=campaign.overwrite,
                origin=campaign.generation_key(item),
            ),
            policy.STORE_RETRY_DELAYS,
            policy.should_retry_store,
            "store",
        )
    await asyncio.to_thread(cache_result, store_and_publish, key, stored)
    log_stored(stored)
    artifact = image_artifact(stored, generated, campaign.destination, item.request.prompt)
    await artifact.acreate(client=shared.prefect)
    emit_stored_event(stored, item.request.prompt, campaign.name)
    shared.new_objects.append((stored, item.request.prompt))
    return stored


async def _retrying(
    attempt: Callable[[], Awaitable[T]],
    delays: tuple[float, ...],
    should_retry: Callable[[BaseException], bool],
    what: str,
) -> tuple[T, int]:
    """``attempt()`` until it succeeds, ``should_retry`` says no, or ``delays`` run out,
    waiting :func:`~prefect_journey.policy.pipeline_retry_delay` between attempts.

    Returns:
        The value and the attempts made.
    """
    failures = 0
    while True:
        try:
            return await attempt(), failures + 1
        except JourneyError as error:
            failures += 1
            if failures > len(delays) or not should_retry(error):
                raise
            get_run_logger().warning("%s attempt %d failed: %s", what, failures, error)
            await asyncio.sleep(policy.pipeline_retry_delay(error, failures, delays))
