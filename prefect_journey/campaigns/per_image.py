"""Executor 1 of the campaign pipeline: a task run per image.

Each item is an ``imagine`` task run (Prefect's retries, cache policy and SERIALIZABLE
lock) followed by a ``store_and_publish`` task run, on a thread pool or on Dask. Every
attempt and every image is a task run in the UI; that costs Prefect's per-run overhead,
which :mod:`~prefect_journey.campaigns.chunked` avoids for large campaigns.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import Task

from prefect_journey import settings
from prefect_journey._compat import call_sync, submit_to
from prefect_journey.cache import locked_elsewhere, record_store
from prefect_journey.campaigns.pipeline import (
    Campaign,
    ItemOutcome,
    outcome,
    store_and_publish,
)
from prefect_journey.campaigns.plan import CampaignItem
from prefect_journey.campaigns.progress import CampaignProgress
from prefect_journey.errors import ConfigurationError
from prefect_journey.models import display_text
from prefect_journey.publishing import PROGRESS_INTERVAL, progress_key
from prefect_journey.receiver import task_timeout
from prefect_journey.storage import StoredImage
from prefect_journey.tasks import Settled, declare_assets, imagine, settle


def make_task_runner(kind: str | None, workers: int) -> TaskRunner[Any]:
    """The campaign's task runner.

    Args:
        kind: ``"thread"`` or ``"dask"``; None reads ``JOURNEY_TASK_RUNNER`` (default thread).
        workers: Threads of the pool (with Dask: shared by its worker processes).

    Returns:
        A pool of ``workers`` threads, or prefect-dask on ``JOURNEY_DASK_ADDRESS`` or on a
        local cluster of ``JOURNEY_DASK_WORKERS`` processes.

    Raises:
        ConfigurationError: An unknown kind, or Dask without prefect-dask installed.
    """
    kind = settings.task_runner(kind)
    if workers < 1:
        raise ConfigurationError("a task runner needs at least one worker")
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask.task_runners import DaskTaskRunner
    except ImportError:
        raise ConfigurationError(
            "task_runner='dask' needs prefect-dask: pip install 'prefect-journey[dask]'"
        ) from None
    address = settings.dask_address()
    if address:
        return DaskTaskRunner(address=address)
    processes = min(settings.dask_workers(), workers)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": processes,
            "processes": True,
            "threads_per_worker": max(1, workers // processes),
            "dashboard_address": None,
        }
    )


def run_per_image(
    todo: list[CampaignItem],
    campaign: Campaign,
    runner: TaskRunner[Any],
    max_concurrency: int,
    progress: CampaignProgress,
) -> list[ItemOutcome]:
    """Run ``todo`` as task runs on ``runner`` and report each item as it ends.

    The task runs belong to the campaign's flow run. ``runner`` is chosen at run time, so
    tasks go to it directly, as ``Task.submit`` would send them to the flow's own runner.
    Generations are submitted through a window of ``max_concurrency`` (the run's bound on
    calls in flight), so the pool's queue never holds a backlog of them and a finished
    image's store starts at once instead of waiting behind every generation not yet started.
    Workers only announce what finished; this thread submits and reports.

    Args:
        todo: The items to generate and store.
        campaign: What every item of the run shares.
        runner: A started task runner (threads or Dask).
        max_concurrency: Generations in flight at most.
        progress: Told of each item as it ends.

    Returns:
        One outcome per item, in row order.
    """
    # One sized task per distinct timeout (a few: resolutions x reference counts), each
    # item's run with its own request's timeout.
    sized: dict[float, Task[..., Any]] = {}
    items = {item.row: item for item in todo}
    finished: queue.Queue[tuple[str, int, Settled]] = queue.Queue()
    generations: dict[int, PrefectFuture[Any]] = {}
    settled: dict[tuple[str, int], Settled] = {}
    waiting = deque(todo)
    busy_elsewhere = _generating_elsewhere(campaign)

    def submit_next_generation() -> None:
        item = _next_to_generate(waiting, busy_elsewhere)
        if item is None:
            return
        timeout = task_timeout(item.request, campaign.receiver)
        if timeout not in sized:
            sized[timeout] = imagine.with_options(timeout_seconds=timeout)
        generations[item.row] = submit_to(
            runner,
            sized[timeout],
            request=item.request,
            credentials=campaign.credentials,
            variant=campaign.variant,
            budget=campaign.budget,
            concurrency_limit=campaign.concurrency_limit,
            webhook=campaign.receiver,
            repay_possibly_billed=campaign.repay_possibly_billed,
        )
        generations[item.row].add_done_callback(partial(_announce, finished, "generated", item.row))

    for _ in range(max_concurrency):
        submit_next_generation()
    progress_artifact = call_sync(
        create_progress_artifact,
        100.0 * progress.share,
        key=progress_key(campaign.slug),
        description=f"campaign {display_text(campaign.name)}",
    )
    last_progress = time.monotonic()
    new_objects: list[tuple[StoredImage, str]] = []
    outcomes: dict[int, ItemOutcome] = {}
    while len(outcomes) < len(items):
        stage, row, result = finished.get()
        settled[stage, row] = result
        item = items[row]
        if stage == "generated":
            submit_next_generation()
            if result.value is not None:
                # The value, not the future: the run is named after it; wait_for keeps the
                # dependency in the UI.
                store = submit_to(
                    runner,
                    store_and_publish.with_options(refresh_cache=row in campaign.restore),
                    wait_for=[generations[row]],
                    result=result.value,
                    destination=campaign.destination,
                    key_template=campaign.key_template,
                    key_fields=item.key_fields,
                    prompt=item.request.prompt,
                    campaign=campaign.name,
                    origin=campaign.generation_key(item),
                    overwrite=campaign.overwrite,
                )
                store.add_done_callback(partial(_announce, finished, "stored", row))
                continue
        # A cached store was declared by the run that made it.
        elif result.value is not None and not result.cached:
            new_objects.append((result.value, item.request.prompt))
        generated = settled["generated", row]
        stored = settled.get(("stored", row))
        outcomes[row] = outcome(
            item,
            generated.value,
            stored.value if stored else None,
            cached=generated.value is not None and generated.cached,
            error=(stored or generated).error,
        )
        progress.finished(outcomes[row])
        over = len(outcomes) == len(items)
        if time.monotonic() - last_progress > PROGRESS_INTERVAL or over:
            call_sync(update_progress_artifact, progress_artifact, 100.0 * progress.share)
            last_progress = time.monotonic()
    declare_assets(new_objects)  # one task run for the whole campaign
    return [outcomes[row] for row in sorted(items)]


def _announce(
    finished: queue.Queue[tuple[str, int, Settled]],
    stage: str,
    row: int,
    future: PrefectFuture[Any],
) -> None:
    """Runs on the worker that finished ``future``: settles it there (Prefect's sync
    ``result()`` costs tens of milliseconds), so the thread that submits work never spends
    that time."""
    settled = Settled()
    try:
        settled = settle(future)
    finally:
        finished.put((stage, row, settled))


def _generating_elsewhere(campaign: Campaign) -> Callable[[CampaignItem], bool]:
    """Whether another run holds an item's generation lock (it is paying for that image)."""
    locks = record_store(imagine).lock_manager
    return lambda item: locked_elsewhere(locks, campaign.generation_key(item))


def _next_to_generate(
    waiting: deque[CampaignItem], generating_elsewhere: Callable[[CampaignItem], bool]
) -> CampaignItem | None:
    """The first waiting item that no other run is generating, else the first one.

    A task run whose image another run is generating waits for that run's lock inside
    Prefect's task engine, holding one of the campaign's slots: with ``max_concurrency=1``
    the whole campaign would wait for the other run. Passed over, the item is taken as soon
    as its lock is free, and is then a cache hit. The search stops at the first free item:
    it reads as many lock files as other runs hold at the front, plus one.
    """
    for position, item in enumerate(waiting):
        if not generating_elsewhere(item):
            del waiting[position]
            return item
    return waiting.popleft() if waiting else None
