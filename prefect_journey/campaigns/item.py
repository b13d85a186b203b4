"""A campaign item's life, written once, whichever way items are grouped into task runs:

    look up (its image's cache record, under the image's lock) -> the paid generation
      -> look up (its store's record) -> store -> publish (artifact, event) -> outcome

The records are the ``imagine`` and store tasks' own (same keys, result store, lock and
expiry, :mod:`prefect_journey.cache`), so a campaign's images are cache hits for those
tasks and theirs for the campaign; the paid generation is
:func:`~prefect_journey.generation.generate`, as for the tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prefect import get_run_logger
from prefect.client.orchestration import PrefectClient
from prefect.locking.protocol import LockManager

from prefect_journey.cache import (
    LOCKED_ELSEWHERE,
    cache_result,
    cached_result,
    lock_if_free_and_read,
    new_holder,
    record_store,
    release_if_held,
)
from prefect_journey.campaigns.pipeline import Campaign, ItemOutcome, outcome
from prefect_journey.campaigns.plan import CampaignItem
from prefect_journey.generation import PaidCalls, generate
from prefect_journey.models import ImagineResult
from prefect_journey.publishing import (
    GALLERY_SIZE,
    GalleryEntry,
    browser_url,
    emit_stored_event,
    image_artifact,
    log_stored,
)
from prefect_journey.recovery import settle_image
from prefect_journey.retrying import store_with_retries
from prefect_journey.storage import StoredImage
from prefect_journey.storage.thumbnails import read_thumbnail
from prefect_journey.tasks import astore_image, imagine


@dataclass
class SharedRun:
    """What the items of one run share (one event loop, one process).

    ``calls`` holds the run's paid-call slots (its ``max_concurrency``), its pause and its
    clients; ``stores`` bounds downloads the same way, so stores run beside generations.
    ``window`` bounds the images between their cache lookup and the end of their
    generation: twice the slots keeps the next image for every slot looked up and waiting,
    while the others neither hold cache locks nor crowd the loop and its threads.
    ``finished`` is told about every item as it ends (progress); ``new_objects`` collects
    what this run stored (declared as assets at the end), ``gallery`` the first pictures of
    it (the campaign's gallery).
    """

    calls: PaidCalls
    downloads: httpx.AsyncClient  # one pool for every CDN download of the run
    # One Prefect client for every artifact: each new one builds a TLS context.
    prefect: PrefectClient
    stores: asyncio.Semaphore
    window: asyncio.Semaphore
    finished: Callable[[ItemOutcome], None] = field(default=lambda outcome: None)
    new_objects: list[tuple[StoredImage, str]] = field(default_factory=list)
    gallery: list[GalleryEntry] = field(default_factory=list)


async def run_item(item: CampaignItem, campaign: Campaign, shared: SharedRun) -> ItemOutcome:
    """Generate and store one item; its failure is its outcome's reason, never raised.

    Args:
        item: The item.
        campaign: What every item of the run shares.
        shared: The run's connections and slots.

    Returns:
        The item's outcome (also told to ``shared.finished``).
    """
    generated: ImagineResult | None = None
    cached = False
    try:
        generated, cached = await _image(item, campaign, shared)
        stored = await _store(item, generated, campaign, shared, cached=cached)
        result = outcome(item, generated, stored, cached=cached)
    except Exception as error:  # reported per item, like a failed task run
        result = outcome(item, generated, None, cached=cached, error=error)
    shared.finished(result)
    return result


@dataclass
class _ImageLock:
    """An item's hold on its image's lock; ``released`` once let go."""

    locks: LockManager | None
    key: str
    holder: str = field(default_factory=new_holder)
    released: bool = False


async def _image(
    item: CampaignItem, campaign: Campaign, shared: SharedRun
) -> tuple[ImagineResult, bool]:
    """The item's image under its key's lock, as the task engine takes it (SERIALIZABLE): a
    run computing this image elsewhere finishes first and its record is read instead of
    paying again. The lock is taken inside the run's window, so it is held from shortly
    before the call, not from the run's start."""
    lock = _ImageLock(record_store(imagine).lock_manager, campaign.generation_key(item))
    locks, key, holder = lock.locks, lock.key, lock.holder
    try:
        async with shared.window:
            found = await asyncio.to_thread(lock_if_free_and_read, imagine, locks, key, holder)
            if found is not LOCKED_ELSEWHERE:
                return await _cached_or_generated(found, lock, item, shared)
        # Another run is generating this image: wait outside the window, so that the run's
        # other images go on meanwhile.
        if locks is not None:
            await locks.aacquire_lock(key, holder)  # waits on the loop, not on a thread
        async with shared.window:
            found = await asyncio.to_thread(cached_result, imagine, key, holder=holder)
            return await _cached_or_generated(found, lock, item, shared)
    finally:
        # Off the loop: removing a lock file waits on the filesystem's journal, and every
        # image's answer waits for the loop.
        if not lock.released:
            await asyncio.to_thread(release_if_held, locks, key, holder)


async def _cached_or_generated(
    found: object, lock: _ImageLock, item: CampaignItem, shared: SharedRun
) -> tuple[ImagineResult, bool]:
    """The cached result ``found`` under ``lock``, or a new one, paid and recorded."""
    if isinstance(found, ImagineResult):
        return found, True
    result = await generate(item.request, shared.calls, key=lock.key, logger=get_run_logger())
    settle = shared.calls.receiver is not None
    # One thread hop for the three, in this order: every hop costs the loop a wake-up that
    # a campaign's other answers wait behind.
    await asyncio.to_thread(_record_and_release, result, lock, settle=settle)
    return result, False


def _record_and_release(result: ImagineResult, lock: _ImageLock, *, settle: bool) -> None:
    """The image's cache record; then its attempt records settled (only now: the image is in
    its record); then its lock released."""
    cache_result(imagine, lock.key, result, lock.holder)
    if settle:
        settle_image(lock.key)
    release_if_held(lock.locks, lock.key, lock.holder)
    lock.released = True


async def _store(
    item: CampaignItem,
    generated: ImagineResult,
    campaign: Campaign,
    shared: SharedRun,
    *,
    cached: bool,
) -> StoredImage:
    """The item's object: its store's record, or a new store, recorded and published. Only a
    cached image can have a store record: the record's key holds the image's task id, and an
    image paid for (or recovered) now has never been stored."""
    key = campaign.store_key(item, generated)
    if cached and item.row not in campaign.restore:
        found = await asyncio.to_thread(cached_result, astore_image, key)
        if isinstance(found, StoredImage):
            return found
    async with shared.stores:
        stored = await store_with_retries(
            generated.image_url,
            campaign.destination,
            logger=get_run_logger(),
            http=shared.downloads,
            task_id=generated.task_id,
            key_template=campaign.key_template,
            key_fields=item.key_fields,
            overwrite=campaign.overwrite,
            origin=campaign.generation_key(item),
        )
    await asyncio.to_thread(cache_result, astore_image, key, stored)
    log_stored(stored)
    # Read back and shrunk in a thread (Pillow decodes without the GIL).
    thumbnail = await asyncio.to_thread(read_thumbnail, stored, campaign.destination)
    prompt = item.request.prompt
    link = browser_url(stored, campaign.destination, generated)
    await image_artifact(stored, link, prompt, thumbnail).acreate(client=shared.prefect)
    if thumbnail is not None and len(shared.gallery) < GALLERY_SIZE:
        shared.gallery.append(GalleryEntry(item.row, prompt, thumbnail, link))
    emit_stored_event(stored, item.request.prompt, campaign.name)
    shared.new_objects.append((stored, item.request.prompt))
    return stored
