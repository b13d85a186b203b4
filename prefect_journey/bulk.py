"""Many images in one task run: how ``batch_campaign`` runs large campaigns at API speed.

Prefect 3.9 records every task run through its server's event pipeline: on the 2-core
benchmark machine that is about 65 ms of server CPU per task run, and with two task runs,
an artifact and an event per image the server's work, not the API, set the pace of a
campaign (BENCHMARKS.md). Here a chunk of images runs inside one task run, on one event
loop, and the package gives each image what the per-image tasks get from Prefect:

- the same cache records: same keys, result store, lock and expiry as
  :func:`~prefect_journey.tasks.imagine` and :func:`~prefect_journey.tasks.store_image`, so
  a campaign can switch between the two ways and a re-run is free either way, and two runs
  asking for the same image at once pay once;
- the same retry rules and delays (``Retry-After`` honoured: the longer of it and the
  delay), every attempt gated by the credit budget and the global concurrency limit, and a
  per-attempt timeout that really interrupts the call (it is a coroutine, not a thread);
- per image: the same log lines, image artifact and ``journey.image.stored`` event.

What it gives up: a task run per image. An image's attempts and timing are in its chunk's
logs and in the summary table, not task-run states of their own; the chunk's task run
completes even when some of its images failed (they are reported, as in the other mode).
Chunks run on the flow's event loop, in its process: there is nothing to hand to Dask.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import PrefectClient
from prefect.locking.protocol import LockManager
from prefect.runtime import task_run as current_task_run
from prefect.utilities.math import clamped_poisson_interval

from prefect_journey.budget import CreditBudget
from prefect_journey.cache import imagine_cache_key, store_cache_key
from prefect_journey.campaign import CampaignItem
from prefect_journey.client import AsyncJourneyClient
from prefect_journey.errors import JourneyError
from prefect_journey.flowkit import emit_stored_event, image_artifact
from prefect_journey.models import ImagineResult
from prefect_journey.storage import Destination, StoredImage, astore_image
from prefect_journey.tasks import (
    IMAGINE_RETRIES,
    IMAGINE_RETRY_DELAYS,
    RETRY_JITTER_FACTOR,
    STORE_RETRY_DELAYS,
    TAGS,
    apaid_attempt,
    attempt_timeout,
    cache_result,
    cached_result,
    imagine,
    imagine_should_retry,
    log_generation,
    log_stored,
    record_store,
    retry_after_pause,
    store_image,
    store_should_retry,
)

T = TypeVar("T")

# What the README and the benchmarks suggest for large campaigns (batch_campaign's default
# stays one image per task run): enough that Prefect's per-run cost vanishes (1,000 images
# are 20 task runs), few enough that a chunk's logs stay readable in the UI.
RECOMMENDED_IMAGES_PER_TASK_RUN = 50


@dataclass(frozen=True)
class ChunkSettings:
    """What every image of a campaign shares. ``restore``: rows whose store is cached but
    whose object is gone (stored again)."""

    destination: Destination
    key_template: str
    campaign: str
    variant: str
    budget: CreditBudget | None
    concurrency_limit: str | None
    restore: frozenset[int] = frozenset()


@dataclass
class SharedRun:
    """Connections and slots the chunks of one run share (one event loop, one process).

    ``generations`` bounds calls in flight (the run's ``max_concurrency``); ``stores``
    bounds downloads the same way, so stores run beside generations as in the per-image
    mode. ``window`` bounds the images between their cache lookup and the end of their
    generation: twice ``generations`` keeps the next image for every slot looked up and
    waiting, while the others neither hold cache locks nor crowd the loop and its threads
    at the start (with all 200 images of a campaign looking up at once, some runs' first
    calls went out 0.1-0.3 s late). ``finished`` is told about every image as it ends
    (progress reporting).
    """

    api: AsyncJourneyClient
    downloads: httpx.AsyncClient  # one pool for every CDN download of the run
    # One Prefect client for every artifact: each new one builds an SSL context (~50 ms).
    prefect: PrefectClient
    generations: asyncio.Semaphore
    stores: asyncio.Semaphore
    window: asyncio.Semaphore
    finished: Callable[[ChunkOutcome], None] = field(default=lambda outcome: None)


@dataclass
class ChunkOutcome:
    """One image: what it produced, whether that came from the cache, or why it failed."""

    row: int
    generated: ImagineResult | None = None
    generation_cached: bool = False
    stored: StoredImage | None = None
    store_cached: bool = False
    reason: str = ""


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
    items: list[CampaignItem], settings: ChunkSettings, shared: SharedRun
) -> list[ChunkOutcome]:
    """Generate and store ``items`` concurrently (bounded by ``shared``'s slots). One
    image's failure is its outcome's ``reason``; it never fails the others or the chunk."""
    return list(await asyncio.gather(*(_one(item, settings, shared) for item in items)))


async def _one(item: CampaignItem, settings: ChunkSettings, shared: SharedRun) -> ChunkOutcome:
    outcome = ChunkOutcome(item.row)
    try:
        outcome.generated, outcome.generation_cached = await _generate(item, settings, shared)
        outcome.stored, outcome.store_cached = await _store(
            item, outcome.generated, settings, shared
        )
    except Exception as error:  # reported per image, like a failed task run
        outcome.reason = f"{type(error).__name__}: {error}"
    shared.finished(outcome)
    return outcome


async def _generate(
    item: CampaignItem, settings: ChunkSettings, shared: SharedRun
) -> tuple[ImagineResult, bool]:
    key = imagine_cache_key(item.request, settings.variant, shared.api.base_url)
    # Under the key's lock, as the task engine does (SERIALIZABLE): a run computing this
    # image elsewhere finishes first and its record is read instead of paying again. The
    # holder names this image's work, which hops between threads. The lock is taken inside
    # the run's window, so it is held from shortly before the call, not from the run's start.
    locks = record_store(imagine).lock_manager
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    try:
        async with shared.window:
            found = await asyncio.to_thread(_lock_if_free_and_read, locks, key, holder)
            if found is not _LOCKED_ELSEWHERE:
                return await _cached_or_generated(found, key, holder, item, settings, shared)
        # Another run is generating this image: wait outside the window, so that the run's
        # other images go on meanwhile.
        if locks is not None:
            await locks.aacquire_lock(key, holder)  # waits on the loop, not on a thread
        async with shared.window:
            found = await asyncio.to_thread(cached_result, imagine, key, holder=holder)
            return await _cached_or_generated(found, key, holder, item, settings, shared)
    finally:
        if locks is not None:
            # Off the loop: removing a lock file waits on the filesystem's journal, which
            # the stores' fsyncs keep busy (up to milliseconds each, measured), and every
            # image's answer waits for the loop.
            await asyncio.to_thread(_release_if_held, locks, key, holder)


async def _cached_or_generated(
    found: object,
    key: str,
    holder: str,
    item: CampaignItem,
    settings: ChunkSettings,
    shared: SharedRun,
) -> tuple[ImagineResult, bool]:
    """The cached result ``found`` under ``key``'s lock, or a new one, paid and cached."""
    if isinstance(found, ImagineResult):
        return found, True
    async with shared.generations:
        result, attempts, possibly_billed = await _retrying(
            lambda: _paid_call(item, settings, shared),
            IMAGINE_RETRY_DELAYS(IMAGINE_RETRIES),
            imagine_should_retry,
            "imagine",
        )
    result = result.model_copy(
        update={"attempts": attempts, "possibly_billed_attempts": possibly_billed}
    )
    await asyncio.to_thread(cache_result, imagine, key, result, holder)
    return log_generation(get_run_logger(), result), False


# Waiting for another run's lock belongs on the event loop: a thread blocked on it would
# hold one of the few workers every image's reads and writes need.
_LOCKED_ELSEWHERE = object()
# FileSystemLockManager polls every 0.1 s, and waits for ever when given 0.
_LOCK_TRY_SECONDS = 0.01


def _lock_if_free_and_read(locks: LockManager | None, key: str, holder: str) -> object:
    """Take ``key``'s lock if it is free and read its record, in one thread hop: Prefect's
    async acquire makes six, and with a campaign's images all starting at once, every image
    queued behind the others' (the first lock took 0.15 s of a 200-image campaign, now
    1-3 ms). :data:`_LOCKED_ELSEWHERE` when another holder has the lock."""
    if locks is not None and not locks.acquire_lock(key, holder, acquire_timeout=_LOCK_TRY_SECONDS):
        return _LOCKED_ELSEWHERE
    return cached_result(imagine, key, holder=holder)


def _release_if_held(locks: LockManager, key: str, holder: str) -> None:
    if locks.is_lock_holder(key, holder):
        locks.release_lock(key, holder)


async def _paid_call(
    item: CampaignItem, settings: ChunkSettings, shared: SharedRun
) -> ImagineResult:
    limit = attempt_timeout(item.request)
    async with apaid_attempt(settings.budget, settings.concurrency_limit):
        try:
            return await asyncio.wait_for(shared.api.imagine(item.request), limit)
        except TimeoutError:
            # Like a task timeout: possibly billed, never retried (the HTTP read timeout,
            # set below this, normally fires first with a clearer error).
            raise TimeoutError(f"no answer within the attempt timeout ({limit:.0f} s)") from None


async def _store(
    item: CampaignItem, generated: ImagineResult, settings: ChunkSettings, shared: SharedRun
) -> tuple[StoredImage, bool]:
    key = store_cache_key(
        generated.task_id, settings.destination, settings.key_template, item.key_fields
    )
    if item.row not in settings.restore:
        found = await asyncio.to_thread(cached_result, store_image, key)
        if isinstance(found, StoredImage):
            return found, True
    async with shared.stores:
        stored, _, _ = await _retrying(
            lambda: astore_image(
                generated.image_url,
                settings.destination,
                task_id=generated.task_id,
                key_template=settings.key_template,
                key_fields=item.key_fields,
                http=shared.downloads,
            ),
            STORE_RETRY_DELAYS,
            store_should_retry,
            "store",
        )
    await asyncio.to_thread(cache_result, store_image, key, stored)
    log_stored(stored)
    artifact = image_artifact(stored, generated, settings.destination, item.request.prompt)
    await artifact.acreate(client=shared.prefect)
    emit_stored_event(stored, item.request.prompt, settings.campaign)
    return stored, False


async def _retrying(
    attempt: Callable[[], Awaitable[T]],
    delays: Sequence[float],
    should_retry: Callable[[BaseException], bool],
    what: str,
) -> tuple[T, int, int]:
    """``attempt()`` until it succeeds, ``should_retry`` says no, or ``delays`` run out;
    waits as Prefect would between task-run retries (same jitter), or longer if the server
    asked. Returns the value, the attempts made and how many failures may have been
    billed."""
    number = possibly_billed = 0
    while True:
        number += 1
        try:
            return await attempt(), number, possibly_billed
        except JourneyError as error:
            if number > len(delays) or not should_retry(error):
                raise
            possibly_billed += error.possibly_billed
            get_run_logger().warning("%s attempt %d failed: %s", what, number, error)
            delay = clamped_poisson_interval(delays[number - 1], RETRY_JITTER_FACTOR)
            await asyncio.sleep(max(delay, retry_after_pause(error)))
