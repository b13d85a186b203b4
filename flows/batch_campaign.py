"""A campaign: hundreds of prompts, fanned out under a concurrency limit and a credit budget.

Everything that can be checked is checked before the first call: every row (with its row
number), every object key, what the batch can cost (cache hits excluded) against
``max_credits`` and the account's balance. During the run no call starts once spent plus
in-flight credits would pass ``max_credits`` (retries count). One failed item never stops
the others; re-running the campaign redoes only what failed, the rest are cache hits.
Every image gets its own task runs, or, with ``images_per_task_run``, images share task
runs (prefect_journey.bulk): the same promises at a fraction of Prefect's per-run cost.

    python flows/batch_campaign.py campaign.csv --campaign spring --max-credits 400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial, wraps
from pathlib import Path
from typing import Any, Literal, TypeVar

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import (
    ProgressArtifact,
    aupdate_progress_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import AsyncClientContext, SyncClientContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner
from prefect.utilities.callables import get_call_parameters
from pydantic import BaseModel

from prefect_journey.budget import BudgetExceededError, CreditBudget
from prefect_journey.bulk import ChunkOutcome, ChunkSettings, SharedRun, imagine_and_store_chunk
from prefect_journey.cache import imagine_cache_key, store_cache_key
from prefect_journey.campaign import DEFAULT_KEY_TEMPLATE, CampaignItem, plan_items, read_items
from prefect_journey.client import AsyncJourneyClient, JourneyClient, resolve_base_url
from prefect_journey.credentials import JourneyCredentials
from prefect_journey.errors import InsufficientCreditsError, JourneyError, JourneyValidationError
from prefect_journey.flowkit import (
    call_sync,
    concurrency_limit_exists,
    emit_stored_event,
    failure_reason,
    load_credentials,
    load_destination,
    make_task_runner,
    report_image,
    resolve_variant,
    task_runner_kind,
)
from prefect_journey.models import CREDITS_PER_IMAGE, ImagineResult
from prefect_journey.storage import Destination, StoredImage, async_download_client, slugify
from prefect_journey.tasks import (
    STORE_OPTIONS,
    attempt_timeout,
    cached_imagine,
    cached_result,
    declare_assets,
    imagine,
    record_store,
    store_image,
)

DEFAULT_CONCURRENCY_LIMIT = "journey-imagine"
# Progress is one API call per update: at most one a second, whatever the batch size.
PROGRESS_INTERVAL = 1.0
BUDGET_DIR_ENV = "JOURNEY_BUDGET_DIR"
# Metadata reads in parallel when looking for objects an earlier run stored (one HEAD each
# on S3).
OBJECT_CHECKS = 16

Status = Literal["stored", "failed", "skipped"]
R = TypeVar("R")


class ItemOutcome(BaseModel):
    row: int
    prompt: str
    status: Status
    task_id: str = ""
    latency_s: float = 0.0
    credits: int = 0
    attempts: int = 0
    cached: bool = False
    uri: str = ""
    sha256: str = ""
    reason: str = ""


class CampaignReport(BaseModel):
    campaign: str
    items: int
    stored: int
    failed: int
    skipped: int
    cache_hits: int
    calls: int
    credits_charged: int
    possibly_billed_retries: int
    outcomes: list[ItemOutcome]

    def ledger_line(self) -> str:
        return (
            f"items={self.items} stored={self.stored} failed={self.failed} skipped={self.skipped} "
            f"cache_hits={self.cache_hits} calls={self.calls} "
            f"credits_charged={self.credits_charged} "
            f"possibly_billed_retries={self.possibly_billed_retries}"
        )


class CampaignFailedError(JourneyError):
    """Some items failed (see the summary artifact); the stored ones are kept."""


def _budget_path() -> Path:
    default = Path(tempfile.gettempdir()) / "prefect-journey"
    folder = Path(os.environ.get(BUDGET_DIR_ENV) or default)
    return folder / f"budget-{flow_run.id or 'local'}.json"


def _finished_items(
    plan: list[CampaignItem],
    generated: dict[int, ImagineResult | None],
    target: Destination,
    key_template: str,
) -> tuple[dict[int, ItemOutcome], set[int]]:
    """Items a previous run finished: their image and their store are both cached and the
    object is still in place. They are reported without a task run, so re-running a
    finished campaign costs seconds, not a task run per item. Also returns the rows whose
    store is cached but whose object is gone: those are stored again."""
    cached: dict[int, tuple[ImagineResult, StoredImage]] = {}
    for item in plan:
        result = generated[item.row]
        if result is None:
            continue
        key = store_cache_key(result.task_id, target, key_template, item.key_fields)
        stored = cached_result(store_and_publish, key)
        if isinstance(stored, StoredImage):
            cached[item.row] = (result, stored)
    if not cached:
        return {}, set()
    with ThreadPoolExecutor(min(OBJECT_CHECKS, len(cached))) as pool:
        present = list(pool.map(target.holds, (stored for _, stored in cached.values())))
    items = {item.row: item for item in plan}
    finished = {
        row: _stored_outcome(items[row], result, stored, cached=True)
        for (row, (result, stored)), there in zip(cached.items(), present, strict=True)
        if there
    }
    return finished, set(cached) - set(finished)


def _preflight(
    plan: list[CampaignItem],
    generated: dict[int, ImagineResult | None],
    *,
    credentials: JourneyCredentials | None,
    max_credits: int | None,
    partial_budget: bool,
) -> int:
    """Credits the items in ``plan`` can cost; raise if that is over the budget or the
    balance."""
    uncached = [item for item in plan if generated[item.row] is None]
    cost = CREDITS_PER_IMAGE * len(uncached)
    logger = get_run_logger()
    logger.info(
        "%d items to run, %d cache hits expected, up to %d credits",
        len(plan),
        len(plan) - len(uncached),
        cost,
    )
    if cost == 0:
        return 0
    if max_credits is not None and cost > max_credits and not partial_budget:
        raise BudgetExceededError(
            f"the batch can cost {cost} credits ({len(uncached)} uncached items x "
            f"{CREDITS_PER_IMAGE}), above max_credits={max_credits}; "
            "raise max_credits or pass partial_budget=True"
        )
    needed = min(cost, max_credits) if max_credits is not None else cost
    with credentials.get_client() if credentials else JourneyClient() as api:
        balance = api.account().credits
    if needed > balance:
        raise InsufficientCreditsError(
            f"the batch needs up to {needed} credits and the account has {balance}: top up first"
        )
    return cost


def _fan_out(
    runner: TaskRunner[Any],
    plan: list[CampaignItem],
    campaign: str,
    key_template: str,
    target: Destination,
    credentials: JourneyCredentials | None,
    variant: str,
    budget: CreditBudget,
    concurrency_limit: str | None,
    max_concurrency: int,
    restore: set[int],
) -> list[ItemOutcome]:
    """Submit every item to ``runner`` (started), report each as it finishes.
    ``restore``: rows whose store is cached but whose object is gone, stored again.

    The task runs belong to the campaign's flow run. ``runner`` is chosen at run time
    (``task_runner``), so tasks go to it directly, as ``Task.submit`` would send them to
    the flow's own runner: a subflow to carry it cost a second flow run per campaign."""
    worst = max(attempt_timeout(item.request) for item in plan)
    generate = imagine.with_options(timeout_seconds=worst)
    items = {item.row: item for item in plan}
    # Workers only announce what finished; this thread submits and reports. Generations are
    # submitted through a window of max_concurrency (the run's bound on calls in flight), so
    # the pool's queue never holds a backlog of them and a finished image's store starts at
    # once instead of waiting behind every generation not yet started.
    finished: queue.Queue[tuple[str, int, Any]] = queue.Queue()
    results: dict[int, PrefectFuture[Any]] = {}
    stores: dict[int, PrefectFuture[Any]] = {}
    values: dict[tuple[str, int], Any] = {}  # what each finished run returned, read once
    waiting = deque(plan)
    generating_elsewhere = _generating_elsewhere(credentials, variant)

    def submit_next_generation() -> None:
        item = _next_to_generate(waiting, generating_elsewhere)
        if item is None:
            return
        results[item.row] = _submit(
            runner,
            generate,
            request=item.request,
            credentials=credentials,
            variant=variant,
            budget=budget,
            concurrency_limit=concurrency_limit,
        )
        results[item.row].add_done_callback(partial(_announce, finished, "generated", item.row))

    for _ in range(max_concurrency):
        submit_next_generation()
    slug = slugify(campaign)
    progress = call_sync(
        create_progress_artifact, 0.0, key=f"{slug}-progress", description=f"campaign {campaign}"
    )
    last_progress = time.monotonic()
    new_objects: list[tuple[StoredImage, str]] = []
    remaining = len(items)
    while remaining:
        stage, row, value = finished.get()
        values[stage, row] = value
        item = items[row]
        if stage == "generated":
            submit_next_generation()
            if value is not None:
                # The value, not the future: the run is named after it; wait_for keeps the
                # dependency in the UI.
                stores[row] = _submit(
                    runner,
                    store_and_publish.with_options(refresh_cache=row in restore),
                    wait_for=[results[row]],
                    result=value,
                    destination=target,
                    key_template=key_template,
                    key_fields=item.key_fields,
                    prompt=item.request.prompt,
                    campaign=campaign,
                )
                stores[row].add_done_callback(partial(_announce, finished, "stored", row))
                continue
        # A cached store was declared by the run that made it.
        elif value is not None and stores[row].state.name != "Cached":
            new_objects.append((value, item.request.prompt))
        remaining -= 1
        if time.monotonic() - last_progress > PROGRESS_INTERVAL or not remaining:
            share = (len(items) - remaining) / len(items)
            call_sync(update_progress_artifact, progress, 100.0 * share)
            last_progress = time.monotonic()
    declare_assets(new_objects)  # one task run for the whole batch
    return [
        _future_outcome(
            items[row],
            results[row],
            stores.get(row),
            values.get(("generated", row)),
            values.get(("stored", row)),
        )
        for row in sorted(items)
    ]


def _generating_elsewhere(
    credentials: JourneyCredentials | None, variant: str
) -> Callable[[CampaignItem], bool]:
    """Whether another run holds an item's generation lock (it is paying for that image)."""
    locks = record_store(imagine).lock_manager
    base_url = resolve_base_url(credentials.base_url if credentials else None)

    def generating_elsewhere(item: CampaignItem) -> bool:
        key = imagine_cache_key(item.request, variant, base_url)
        return locks is not None and locks.is_locked(key)

    return generating_elsewhere


def _next_to_generate(
    waiting: deque[CampaignItem], generating_elsewhere: Callable[[CampaignItem], bool]
) -> CampaignItem | None:
    """The first waiting item that no other run is generating, else the first one.

    A task run whose image another run is generating waits for that run's lock inside
    Prefect's task engine, holding one of the campaign's slots: with ``max_concurrency=1``
    the whole campaign would wait for the other run. Passed over, the item is taken as
    soon as its lock is free, and is then a cache hit. The search stops at the first free
    item: it reads as many lock files as other runs hold at the front, plus one.
    """
    for position, item in enumerate(waiting):
        if not generating_elsewhere(item):
            del waiting[position]
            return item
    return waiting.popleft() if waiting else None


def _submit(
    runner: TaskRunner[Any],
    task: Task[..., Any],
    wait_for: list[PrefectFuture[Any]] | None = None,
    **parameters: Any,
) -> PrefectFuture[Any]:
    """``task.submit(**parameters)`` on ``runner`` instead of the flow's task runner."""
    future: PrefectFuture[Any] = runner.submit(
        task, get_call_parameters(task.fn, (), parameters), wait_for
    )
    return future


def _announce(
    finished: queue.Queue[tuple[str, int, Any]], stage: str, row: int, future: PrefectFuture[Any]
) -> None:
    """Runs on the worker that finished ``future``: pins its final state and reads its value
    there (Prefect's sync ``result()`` costs tens of milliseconds), so the thread that
    submits work never spends that time. The value is None unless the run completed."""
    value = None
    try:
        future.wait()
        if future.state.is_completed():
            value = future.result()
    finally:
        finished.put((stage, row, value))


@task(name="journey-store-and-publish", **STORE_OPTIONS)
def store_and_publish(
    result: ImagineResult,
    destination: Destination,
    key_template: str,
    key_fields: dict[str, Any],
    prompt: str,
    campaign: str,
) -> StoredImage:
    """``store_image`` plus the image artifact and the ``journey.image.stored`` event, in
    one task run: a cached re-run skips all three, and publishing never waits on the thread
    that submits the work. (Same cache key as ``store_image``; prompt and campaign are not
    part of it.)"""
    stored = store_image.fn(result, destination, key_template=key_template, key_fields=key_fields)
    report_image(stored, result, destination, prompt)
    emit_stored_event(stored, prompt, campaign)
    return stored


def _generation_fields(
    item: CampaignItem, generated: ImagineResult, *, cached: bool
) -> dict[str, Any]:
    return {
        "row": item.row,
        "prompt": item.request.prompt[:120],
        "task_id": generated.task_id,
        "latency_s": round(generated.elapsed_seconds, 2),
        "credits": 0 if cached else generated.credits_charged,
        "attempts": 0 if cached else generated.attempts,
        "cached": cached,
    }


def _stored_outcome(
    item: CampaignItem, generated: ImagineResult, stored: StoredImage, *, cached: bool
) -> ItemOutcome:
    return ItemOutcome(
        **_generation_fields(item, generated, cached=cached),
        status="stored",
        uri=stored.uri,
        sha256=stored.sha256,
    )


def _outcome(
    item: CampaignItem,
    generated: ImagineResult | None,
    stored: StoredImage | None,
    *,
    cached: bool,
    reason: str,
) -> ItemOutcome:
    """One item's row in the summary: what it produced, or why it did not."""
    reason = reason or "its result could not be read"
    if generated is None:
        return ItemOutcome(
            row=item.row,
            prompt=item.request.prompt[:120],
            status="skipped" if "BudgetExceededError" in reason else "failed",
            reason=reason,
        )
    if stored is None:
        return ItemOutcome(
            **_generation_fields(item, generated, cached=cached), status="failed", reason=reason
        )
    return _stored_outcome(item, generated, stored, cached=cached)


def _future_outcome(
    item: CampaignItem,
    result: PrefectFuture[Any],
    store: PrefectFuture[Any] | None,
    generated: ImagineResult | None,
    stored: StoredImage | None,
) -> ItemOutcome:
    """:func:`_outcome` from an item's task runs and the values they returned."""
    failed = result if store is None else store
    reason = "" if stored is not None else failure_reason(failed) or ""
    cached = generated is not None and result.state.name == "Cached"
    return _outcome(item, generated, stored, cached=cached, reason=reason)


def _chunked(
    todo: list[CampaignItem],
    settings: ChunkSettings,
    credentials: JourneyCredentials | None,
    max_concurrency: int,
    images_per_task_run: int,
) -> list[ItemOutcome]:
    """Run ``todo`` in task runs of ``images_per_task_run`` images (prefect_journey.bulk)."""
    outcomes = asyncio.run(
        _run_chunks(todo, settings, credentials, max_concurrency, images_per_task_run)
    )
    items = {item.row: item for item in todo}
    declare_assets(
        [
            (o.stored, items[o.row].request.prompt)
            for o in outcomes
            if o.stored is not None and not o.store_cached
        ]
    )
    return [
        _outcome(items[o.row], o.generated, o.stored, cached=o.generation_cached, reason=o.reason)
        for o in outcomes
    ]


async def _run_chunks(
    todo: list[CampaignItem],
    settings: ChunkSettings,
    credentials: JourneyCredentials | None,
    max_concurrency: int,
    images_per_task_run: int,
) -> list[ChunkOutcome]:
    done = 0

    def finished(_: ChunkOutcome) -> None:
        nonlocal done
        done += 1

    # One connection per call in flight: a slow call never waits for a pooled connection.
    options: dict[str, Any] = {"max_retries": 0, "max_connections": max_concurrency}
    api = credentials.get_async_client(**options) if credentials else AsyncJourneyClient(**options)
    chunks = [
        todo[start : start + images_per_task_run]
        for start in range(0, len(todo), images_per_task_run)
    ]
    downloads = async_download_client(max_connections=max_concurrency)  # one per store
    # One Prefect client on this loop for the chunks' task runs and every artifact: without
    # a client context here, each chunk's task run opens a client of its own as it starts
    # (an SSL context and a connection each), on the loop the first calls are waiting for.
    async with api, downloads, AsyncClientContext.get_or_create() as prefect_context:
        prefect = prefect_context.client
        shared = SharedRun(
            api,
            downloads,
            prefect,
            generations=asyncio.Semaphore(max_concurrency),
            stores=asyncio.Semaphore(max_concurrency),
            window=asyncio.Semaphore(2 * max_concurrency),
            finished=finished,
        )
        # Every chunk starts at once: the slots, not the chunks, bound the work, so a chunk
        # waiting on one slow image never leaves a slot idle.
        running = asyncio.gather(
            *(imagine_and_store_chunk(chunk, settings, shared) for chunk in chunks),
            return_exceptions=True,
        )
        # Created while the chunks start, not before: the first calls do not wait for it.
        progress = await ProgressArtifact(
            progress=0.0,
            key=f"{slugify(settings.campaign)}-progress",
            description=f"campaign {settings.campaign}",
        ).acreate(client=prefect)
        over = False
        while not over:
            await asyncio.wait([running], timeout=PROGRESS_INTERVAL)
            over = running.done()  # read before the update, so the last one says 100
            share = 1.0 if over else done / len(todo)
            await aupdate_progress_artifact(progress.id, 100.0 * share, client=prefect)
        results = running.result()
    outcomes: list[ChunkOutcome] = []
    for chunk, result in zip(chunks, results, strict=True):
        if isinstance(result, BaseException):  # the task run itself broke
            reason = f"{type(result).__name__}: {result}"
            outcomes += [ChunkOutcome(item.row, reason=reason) for item in chunk]
        else:
            outcomes += result
    return outcomes


@flow(name="batch-campaign")
def batch_campaign(
    items: list[dict[str, Any]] | None = None,
    source: str | None = None,
    campaign: str = "campaign",
    key_template: str = DEFAULT_KEY_TEMPLATE,
    destination: str | None = None,
    destination_block: str | None = None,
    credentials_block: str | None = None,
    variant: str = "",
    max_concurrency: int = 8,
    concurrency_limit: str | None = DEFAULT_CONCURRENCY_LIMIT,
    max_credits: int | None = None,
    partial_budget: bool = False,
    allow_failures: bool = False,
    task_runner: str | None = None,
    images_per_task_run: int = 1,
) -> CampaignReport:
    """Generate and store every item of a campaign.

    ``items`` (a list of mappings) or ``source`` (a CSV/JSONL path or fsspec URL).
    ``concurrency_limit``: a Prefect global concurrency limit shared with other flows, used
    when it exists; ``max_concurrency`` bounds the run either way. ``max_credits``: the
    run's budget (``partial_budget=True`` runs until it is spent instead of refusing to
    start). ``task_runner``: ``"thread"`` or ``"dask"`` (default ``$JOURNEY_TASK_RUNNER``).
    ``images_per_task_run``: 1 (default) gives every image its own task runs; more runs
    that many images per task run (:mod:`prefect_journey.bulk`: the same caching, retries,
    budget and reporting, a fraction of Prefect's per-run cost; thread runner only).
    The run fails if any item failed, unless ``allow_failures``.
    """
    if (items is None) == (source is None):
        raise JourneyValidationError("pass either items or source")
    rows = items if items is not None else read_items(source or "")
    plan = plan_items(rows, campaign=campaign, key_template=key_template)
    variant = resolve_variant(variant)
    if max_concurrency < 1:
        raise JourneyValidationError("max_concurrency must be at least 1")
    if images_per_task_run < 1:
        raise JourneyValidationError("images_per_task_run must be at least 1")
    if images_per_task_run > 1 and task_runner_kind(task_runner) != "thread":
        raise JourneyValidationError(
            "images_per_task_run > 1 runs images on the flow's event loop, not on a task "
            "runner: use task_runner='thread' (or 1 image per task run on Dask)"
        )
    # _fan_out keeps at most max_concurrency generations in flight; the other half of the
    # pool lets stores run beside them.
    runner = make_task_runner(task_runner, 2 * max_concurrency)
    target = load_destination(destination, destination_block)  # fails before spending
    credentials = load_credentials(credentials_block)
    generated = {item.row: cached_imagine(item.request, credentials, variant) for item in plan}
    finished, restore = _finished_items(plan, generated, target, key_template)
    todo = [item for item in plan if item.row not in finished]
    logger = get_run_logger()
    if finished:
        logger.info("%d of %d items were stored by an earlier run", len(finished), len(plan))
    _preflight(
        todo,
        generated,
        credentials=credentials,
        max_credits=max_credits,
        partial_budget=partial_budget,
    )
    budget = CreditBudget.create(_budget_path(), max_credits)
    outcomes = list(finished.values())
    if todo:
        limit = concurrency_limit if concurrency_limit_exists(concurrency_limit) else None
        if concurrency_limit and limit is None:
            logger.info(
                "no global concurrency limit %r: bounded by max_concurrency=%d",
                concurrency_limit,
                max_concurrency,
            )
        if images_per_task_run > 1:
            settings = ChunkSettings(
                target, key_template, campaign, variant, budget, limit, frozenset(restore)
            )
            outcomes += _chunked(todo, settings, credentials, max_concurrency, images_per_task_run)
        else:
            with runner:
                outcomes += _fan_out(
                    runner,
                    todo,
                    campaign,
                    key_template,
                    target,
                    credentials,
                    variant,
                    budget,
                    limit,
                    max_concurrency,
                    restore,
                )
    outcomes.sort(key=lambda outcome: outcome.row)
    ledger = budget.snapshot()
    report = CampaignReport(
        campaign=campaign,
        items=len(plan),
        stored=sum(o.status == "stored" for o in outcomes),
        failed=sum(o.status == "failed" for o in outcomes),
        skipped=sum(o.status == "skipped" for o in outcomes),
        cache_hits=sum(o.cached for o in outcomes),
        calls=ledger["calls"],
        credits_charged=ledger["spent"],
        possibly_billed_retries=ledger["possibly_billed"],
        outcomes=outcomes,
    )
    call_sync(
        create_table_artifact,
        [o.model_dump() for o in outcomes],
        key=f"{slugify(campaign)}-summary",
        description=f"campaign {campaign}: {report.ledger_line()}",
    )
    logger.info("campaign %s: %s", campaign, report.ledger_line())
    not_stored = [o for o in outcomes if o.status != "stored"]
    if not_stored and not allow_failures:
        reasons = "; ".join(f"row {o.row}: {o.reason}" for o in not_stored[:10])
        raise CampaignFailedError(f"{len(not_stored)} of {len(plan)} items not stored: {reasons}")
    return report


@flow(name="batch-campaign-async")
@wraps(batch_campaign.fn, assigned=("__module__", "__annotations__"))
async def abatch_campaign(*args: Any, **kwargs: Any) -> CampaignReport:
    """``batch_campaign`` (same parameters, same run) as an async flow, for async callers
    and deployments. A sync flow run ends by joining Prefect's heartbeat thread, which
    sleeps in 1 s steps (Prefect 3.9): up to a second per run, a whole second for a re-run
    whose items are all cached. An async flow run does not wait for it.

    The campaign's own code is sync (a thread pool of task runs, blocking stores) and runs
    on a worker thread, so the flow's event loop stays free. A thread cannot be
    interrupted: cancelling the awaiting coroutine (not the flow run) leaves the campaign
    running to its end, within its budget."""
    return await asyncio.to_thread(_with_sync_client, batch_campaign.fn, *args, **kwargs)


def _with_sync_client(function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``function(*args, **kwargs)`` with one sync Prefect client for it and the task runs
    it starts. A sync flow run provides one; without it, under an async flow run, every
    sync task run opens a client of its own (a new connection and an extra request each:
    a 200-image campaign took 32 s instead of 26 s on SQLite)."""
    with SyncClientContext.get_or_create():
        return function(*args, **kwargs)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a .csv or .jsonl file (local path or fsspec URL)")
    parser.add_argument("--campaign", default="campaign")
    parser.add_argument("--destination")
    parser.add_argument("--max-credits", type=int)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--task-runner", choices=["thread", "dask"])
    parser.add_argument("--images-per-task-run", type=int, default=1)
    args = parser.parse_args()
    report = batch_campaign(
        source=args.source,
        campaign=args.campaign,
        destination=args.destination,
        max_credits=args.max_credits,
        max_concurrency=args.max_concurrency,
        task_runner=args.task_runner,
        images_per_task_run=args.images_per_task_run,
    )
    print(report.ledger_line())


if __name__ == "__main__":
    _main()
