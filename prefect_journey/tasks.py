"""Prefect tasks over the plain client and storage: orchestration only.

- :func:`imagine` / :func:`aimagine`: one generation. Prefect retries what the client marks
  retryable (nothing was billed) or possibly billed (counted on the result); a 400, 401 or
  402 fails at once. ``Retry-After`` is honoured by sleeping inside the failed attempt,
  because Prefect's retry delay cannot read it. Cached across runs by
  :class:`~prefect_journey.cache.ImagineCachePolicy`.
- :func:`store_image` / :func:`astore_image`: stream the result into a destination.
- :func:`presign_references`: ``s3://`` character sheets to https URLs the API can fetch.
- :func:`declare_assets`: record stored objects as Prefect assets (one task run).

The task timeout is a safety net only: a sync task on a worker thread cannot be interrupted,
so the HTTP client's own timeouts are what stop a call. The task timeout is set just above
them (:func:`attempt_timeout`) so the HTTP layer always fails first, with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from datetime import UTC, datetime
from textwrap import shorten
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.client.schemas.objects import State, TaskRun
from prefect.concurrency.asyncio import concurrency as aconcurrency
from prefect.concurrency.sync import concurrency
from prefect.results import ResultStore, get_result_store
from prefect.runtime import task_run as current_task_run
from prefect.tasks import Task, exponential_backoff

from prefect_journey import policy
from prefect_journey.budget import CreditBudget
from prefect_journey.cache import (
    DEFAULT_CACHE_EXPIRATION,
    IMAGINE_CACHE_POLICY,
    STORE_CACHE_POLICY,
    imagine_cache_key,
)
from prefect_journey.client import AsyncJourneyClient, JourneyClient, resolve_base_url
from prefect_journey.credentials import JourneyCredentials
from prefect_journey.destinations import resolve_destination
from prefect_journey.errors import JourneyError, JourneyValidationError, RateLimitedError
from prefect_journey.flowkit import call_sync
from prefect_journey.models import DEFAULT_MODEL, MAX_REFERENCES, ImagineRequest, ImagineResult
from prefect_journey.storage import (
    DEFAULT_KEY_TEMPLATE,
    DEFAULT_MAX_BYTES,
    DEFAULT_PRESIGN_SECONDS,
    StoredImage,
    presign,
)
from prefect_journey.storage import astore_image as _astore_image
from prefect_journey.storage import store_image as _store_image

# Every task that calls the API or writes a destination carries the same tags: Prefect 3.9
# asks the API for tag concurrency slots on each run of a tagged task through one queue per
# distinct tag set, and a second set made a 100-image batch about a quarter slower on 2
# cores (BENCHMARKS.md). The asset declaration (bookkeeping at the end of a run) has none:
# a tag limit meant for API calls never holds it, and it skips that slot request, which a
# busy SQLite server answers with a 503 and Prefect's client retries only after 2 s.
TAGS = ["journey", DEFAULT_MODEL]
# 5 retries at 2, 4, 8, 16, 32 s (+/- 50 % jitter): a 25 % fault rate fails an item with
# probability 0.25**6 = 0.02 %, and the whole ladder stays within a minute.
IMAGINE_RETRIES = 5
IMAGINE_RETRY_DELAYS = exponential_backoff(backoff_factor=2)
RETRY_JITTER_FACTOR = 0.5
# How far above the HTTP deadline the task timeout sits, so the HTTP layer fails first.
TASK_TIMEOUT_MARGIN = 15.0
# Downloads are free: retry them briskly.
STORE_RETRIES = 3
STORE_RETRY_DELAYS = [1, 5, 15]
# 100 MB (the size cap) at a slow 1 MB/s, plus commit time.
STORE_TIMEOUT = 180.0
# A variant is a label (a date, "v2"), not a payload.
MAX_VARIANT_CHARS = 200

# Possibly-billed failures per task run, counted by the retry condition and reported on the
# result. Retries run in the same process as the first attempt, so a module dict suffices.
_possibly_billed: dict[UUID, int] = {}
_possibly_billed_lock = threading.Lock()


_WORKER_THREAD_TIMEOUT_NOTICE = "Timeout of %s seconds configured for this task, but the task"
TASK_NAME_PREFIX = "journey-"


class _WorkerThreadTimeoutNotice(logging.Filter):
    """Drops Prefect's warning, logged on every run of a sync task with a timeout on a worker
    thread, that the timeout cannot interrupt the thread; for this package's tasks only.
    They are built around that fact (see the module docstring), and one such warning per
    task run of a 500-image batch buries the warnings that matter (and each one is a log
    line sent to the Prefect API)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith(_WORKER_THREAD_TIMEOUT_NOTICE)
            and str(getattr(record, "task_name", "")).startswith(TASK_NAME_PREFIX)
        )


logging.getLogger("prefect.task_runs").addFilter(_WorkerThreadTimeoutNotice())


def attempt_timeout(request: ImagineRequest) -> float:
    """Per-attempt task timeout: connect + the request's read timeout + a margin."""
    read = policy.read_timeout_for(len(request.image_urls), request.resolution)
    return policy.CONNECT_TIMEOUT + read + TASK_TIMEOUT_MARGIN


def _worst_case_timeout() -> float:
    worst = ImagineRequest(
        prompt="x",
        resolution="4K",
        image_urls=[f"https://x.invalid/{i}" for i in range(MAX_REFERENCES)],
    )
    return attempt_timeout(worst)


def _failure(state: State[Any]) -> BaseException | None:
    data = state.data
    return data if isinstance(data, BaseException) else None


def retry_safe_or_possibly_billed(
    task: Task[..., Any], task_run: TaskRun, state: State[Any]
) -> bool:
    """Default retry condition of :func:`imagine`: retry what cannot have been billed and,
    counting it, what may have been. Never retries bad input, auth, credits or timeouts of
    the task itself (its thread may still be running the call)."""
    error = _failure(state)
    if isinstance(error, JourneyError) and error.possibly_billed:
        with _possibly_billed_lock:
            _possibly_billed[task_run.id] = _possibly_billed.get(task_run.id, 0) + 1
    return imagine_should_retry(error)


def imagine_should_retry(error: BaseException | None) -> bool:
    """The retry rule of :func:`imagine`, for code that retries by itself: what cannot have
    been billed, and what may have been."""
    return isinstance(error, JourneyError) and (error.retryable or error.possibly_billed)


def store_should_retry(error: BaseException | None) -> bool:
    """The retry rule of the storage tasks (downloads and writes cost no credits)."""
    return isinstance(error, JourneyError) and error.retryable


def retry_safe_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Stricter retry condition: never risk paying twice. Use with
    ``imagine.with_options(retry_condition_fn=retry_safe_only)``."""
    error = _failure(state)
    return isinstance(error, JourneyError) and error.retryable and not error.possibly_billed


def retry_if_retryable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry condition of the storage tasks."""
    return store_should_retry(_failure(state))


def as_request(request: ImagineRequest | Mapping[str, Any]) -> ImagineRequest:
    """Accept a request or its fields (as a deployment parameter would pass them)."""
    if isinstance(request, ImagineRequest):
        return request
    if isinstance(request, Mapping):
        return ImagineRequest(**request)
    raise JourneyValidationError(
        f"request must be an ImagineRequest or a mapping, not {type(request).__name__}"
    )


def _check_variant(variant: str) -> str:
    if not isinstance(variant, str) or len(variant) > MAX_VARIANT_CHARS:
        raise JourneyValidationError(
            f"variant must be a string of at most {MAX_VARIANT_CHARS} characters"
        )
    return variant


def record_store(task: Task[..., Any]) -> ResultStore:
    """The result store the task engine uses for ``task``'s cache records (and its lock
    manager)."""
    return call_sync(get_result_store().update_for_task, task)


def cached_result(task: Task[..., Any], key: str, *, holder: str | None = None) -> Any | None:
    """The value ``task`` cached under ``key``, read from the same result store as the task
    engine would; None when there is none, it has expired, a run is computing it right now
    (the task itself would wait for that run) or it cannot be read. ``holder``: the caller
    holds the key's lock under that name (it is the run computing it)."""
    store = record_store(task)
    if holder is None and store.lock_manager is not None and store.is_locked(key):
        return None
    try:
        record = store.read(key, holder=holder)
    except Exception as exc:  # missing or unreadable: the task will find out properly
        logging.getLogger(__name__).debug("no usable cache record %s: %r", key, exc)
        return None
    expiration = record.metadata.expiration
    if expiration is not None and expiration <= datetime.now(UTC):
        return None
    return record.result


def cache_result(task: Task[..., Any], key: str, value: Any, holder: str | None = None) -> None:
    """Record ``value`` as ``task``'s result under ``key``, with the expiry a run of
    ``task`` would give it: for code that does a task's work outside its task runs.
    ``holder``: who holds the key's lock, when the task's cache policy has a lock manager."""
    expiration = datetime.now(UTC) + (task.cache_expiration or DEFAULT_CACHE_EXPIRATION)
    record_store(task).write(
        value,
        key=key,
        expiration=expiration,  # type: ignore[arg-type]  # Prefect's engine passes a datetime too
        holder=holder,
    )


def cached_imagine(
    request: ImagineRequest, credentials: JourneyCredentials | None = None, variant: str = ""
) -> ImagineResult | None:
    """What :func:`imagine` would answer from its cache for ``request`` (no call, no
    credit), or None."""
    base_url = resolve_base_url(credentials.base_url if credentials else None)
    result = cached_result(imagine, imagine_cache_key(request, variant, base_url))
    return result if isinstance(result, ImagineResult) else None


def _imagine_run_name() -> str:
    request = current_task_run.parameters.get("request")
    prompt = getattr(request, "prompt", None) or (request or {}).get("prompt", "?")
    return "imagine: " + shorten(str(prompt), width=50, placeholder="...")


def _client_options() -> dict[str, Any]:
    # One retry mechanism per layer: Prefect retries, so every attempt shows in the UI.
    return {"max_retries": 0}


def retry_after_pause(error: JourneyError) -> float:
    """How long the server's Retry-After asks us to wait (capped); 0 without one."""
    if isinstance(error, RateLimitedError) and error.retry_after:
        return min(error.retry_after, policy.RETRY_AFTER_CAP)
    return 0.0


def _note_failure(
    logger: logging.LoggerAdapter[Any] | logging.Logger, error: JourneyError
) -> float:
    """Log a failed attempt; return how long Retry-After asks us to wait (capped)."""
    logger.warning("imagine attempt failed: %s", error)
    return retry_after_pause(error)


def _finish(
    result: ImagineResult, logger: logging.LoggerAdapter[Any] | logging.Logger
) -> ImagineResult:
    run_id = current_task_run.id
    with _possibly_billed_lock:
        possibly_billed = _possibly_billed.pop(UUID(run_id), 0) if run_id else 0
    # Inside a task the client makes one HTTP attempt per Prefect attempt.
    return log_generation(
        logger,
        result.model_copy(
            update={
                "possibly_billed_attempts": possibly_billed,
                "attempts": current_task_run.run_count,
            }
        ),
    )


def log_generation(
    logger: logging.LoggerAdapter[Any] | logging.Logger, result: ImagineResult
) -> ImagineResult:
    """The log line of one finished generation (never the key); returns ``result``."""
    # Host and pid say which worker made the call when a batch is spread over processes.
    logger.info(
        "task_id=%s latency=%.1fs credits=%d attempts=%d possibly_billed_retries=%d worker=%s/%d",
        result.task_id,
        result.elapsed_seconds,
        result.credits_charged,
        result.attempts,
        result.possibly_billed_attempts,
        socket.gethostname(),
        os.getpid(),
    )
    return result


_IMAGINE_OPTIONS: dict[str, Any] = {
    "retries": IMAGINE_RETRIES,
    "retry_delay_seconds": IMAGINE_RETRY_DELAYS,
    "retry_jitter_factor": RETRY_JITTER_FACTOR,
    "retry_condition_fn": retry_safe_or_possibly_billed,
    "cache_policy": IMAGINE_CACHE_POLICY,
    "cache_expiration": DEFAULT_CACHE_EXPIRATION,
    "persist_result": True,
    "timeout_seconds": _worst_case_timeout(),
    "tags": TAGS,
    "task_run_name": _imagine_run_name,
}


@contextmanager
def _paid_attempt(budget: CreditBudget | None, concurrency_limit: str | None) -> Iterator[None]:
    # The slot is taken before the credits are reserved, so waiting for a slot does not
    # hold budget that running calls could use.
    with ExitStack() as stack:
        if concurrency_limit:
            stack.enter_context(concurrency(concurrency_limit, occupy=1, strict=True))
        if budget is not None:
            stack.enter_context(budget.attempt())
        yield


@asynccontextmanager
async def apaid_attempt(
    budget: CreditBudget | None, concurrency_limit: str | None
) -> AsyncIterator[None]:
    """One paid attempt: a slot of the global concurrency limit, then the budget's
    reservation (async twin of the sync gate the ``imagine`` task uses)."""
    async with AsyncExitStack() as stack:
        if concurrency_limit:
            await stack.enter_async_context(aconcurrency(concurrency_limit, occupy=1, strict=True))
        if budget is not None:
            stack.enter_context(budget.attempt())
        yield


@task(name="journey-imagine", **_IMAGINE_OPTIONS)
def imagine(
    request: ImagineRequest | Mapping[str, Any],
    credentials: JourneyCredentials | None = None,
    variant: str = "",
    budget: CreditBudget | None = None,
    concurrency_limit: str | None = None,
) -> ImagineResult:
    """Generate one image.

    ``credentials`` default to ``$JOURNEY_API_KEY``. ``variant`` is part of the cache key
    only (see :mod:`prefect_journey.cache`). ``budget`` gates every attempt on a shared
    :class:`~prefect_journey.budget.CreditBudget`; ``concurrency_limit`` names a Prefect
    global concurrency limit held for the duration of each attempt.
    """
    request, variant = as_request(request), _check_variant(variant)
    logger = get_run_logger()
    options = _client_options()
    client = credentials.get_client(**options) if credentials else JourneyClient(**options)
    with client:
        try:
            with _paid_attempt(budget, concurrency_limit):
                result = client.imagine(request)
        except JourneyError as error:
            time.sleep(_note_failure(logger, error))
            raise
    return _finish(result, logger)


@task(name="journey-aimagine", **_IMAGINE_OPTIONS)
async def aimagine(
    request: ImagineRequest | Mapping[str, Any],
    credentials: JourneyCredentials | None = None,
    variant: str = "",
    budget: CreditBudget | None = None,
    concurrency_limit: str | None = None,
) -> ImagineResult:
    """Async twin of :func:`imagine`."""
    request, variant = as_request(request), _check_variant(variant)
    logger = get_run_logger()
    options = _client_options()
    client = (
        credentials.get_async_client(**options) if credentials else AsyncJourneyClient(**options)
    )
    async with client:
        try:
            async with apaid_attempt(budget, concurrency_limit):
                result = await client.imagine(request)
        except JourneyError as error:
            await asyncio.sleep(_note_failure(logger, error))
            raise
    return _finish(result, logger)


def _store_run_name() -> str:
    result = current_task_run.parameters.get("result")
    return f"store: {getattr(result, 'task_id', '?')}"


STORE_OPTIONS: dict[str, Any] = {
    "retries": STORE_RETRIES,
    "retry_delay_seconds": STORE_RETRY_DELAYS,
    "retry_jitter_factor": RETRY_JITTER_FACTOR,
    "retry_condition_fn": retry_if_retryable,
    "cache_policy": STORE_CACHE_POLICY,
    "cache_expiration": DEFAULT_CACHE_EXPIRATION,
    "persist_result": True,
    "timeout_seconds": STORE_TIMEOUT,
    "tags": TAGS,
    "task_run_name": _store_run_name,
}


def log_stored(stored: StoredImage) -> None:
    """The log line of one stored image."""
    get_run_logger().info(
        "stored task_id=%s at %s (%s %dx%d, %d bytes, sha256 %s%s)",
        stored.task_id,
        stored.uri,
        stored.format,
        stored.width,
        stored.height,
        stored.bytes,
        stored.sha256[:12],
        "" if stored.created else ", already there",
    )


@task(name="journey-store-image", **STORE_OPTIONS)
def store_image(
    result: ImagineResult,
    destination: Any = "./outputs",
    storage_options: Mapping[str, Any] | None = None,
    key_template: str = DEFAULT_KEY_TEMPLATE,
    key_fields: Mapping[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
) -> StoredImage:
    """Stream ``result.image_url`` into ``destination`` (an fsspec URL, an
    ``ImageDestination``, a ``RemoteFileSystem`` or an ``S3Bucket`` block)."""
    stored = _store_image(
        result.image_url,
        resolve_destination(destination, storage_options),
        task_id=result.task_id,
        key_template=key_template,
        key_fields=key_fields,
        max_bytes=max_bytes,
        overwrite=overwrite,
    )
    log_stored(stored)
    return stored


@task(name="journey-astore-image", **STORE_OPTIONS)
async def astore_image(
    result: ImagineResult,
    destination: Any = "./outputs",
    storage_options: Mapping[str, Any] | None = None,
    key_template: str = DEFAULT_KEY_TEMPLATE,
    key_fields: Mapping[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
) -> StoredImage:
    """Async twin of :func:`store_image`."""
    stored = await _astore_image(
        result.image_url,
        resolve_destination(destination, storage_options),
        task_id=result.task_id,
        key_template=key_template,
        key_fields=key_fields,
        max_bytes=max_bytes,
        overwrite=overwrite,
    )
    log_stored(stored)
    return stored


@task(name="journey-presign-references", tags=TAGS, retries=2, retry_delay_seconds=1)
def presign_references(
    urls: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    expires_in: int = DEFAULT_PRESIGN_SECONDS,
) -> list[str]:
    """Turn ``s3://`` references into time-limited https URLs; http(s) URLs pass through."""
    if len(urls) > MAX_REFERENCES:
        raise JourneyValidationError(f"at most {MAX_REFERENCES} references, got {len(urls)}")
    return [presign(url, storage_options, expires_in) for url in urls]


def declare_assets(images: Sequence[tuple[StoredImage, str]]) -> None:
    """Declare stored objects (with their prompts) as Prefect assets materialized by the
    current flow run, all in one task run.

    An object's key is only known after its bytes arrive (the extension comes from them),
    so the materializing task is built here rather than decorated in advance. A URI that
    is not a valid asset key (a local path with spaces) is logged and skipped.
    """
    assets: list[tuple[Asset, StoredImage]] = []
    for stored, prompt in images:
        try:
            asset = Asset(
                key=stored.uri,
                properties=AssetProperties(
                    name=stored.uri.rsplit("/", 1)[-1],
                    description=shorten(prompt, width=200, placeholder="...") if prompt else None,
                ),
            )
        except ValueError as exc:
            get_run_logger().warning("not declaring %s as an asset: %s", stored.uri, exc)
            continue
        assets.append((asset, stored))
    if not assets:
        return

    def record() -> None:
        for asset, stored in assets:
            add_asset_metadata(asset, stored.model_dump(exclude={"uri"}))

    first = assets[0][0].properties
    more = f" and {len(assets) - 1} more" if len(assets) > 1 else ""
    materialize(
        *(asset for asset, _ in assets),
        by="prefect-journey",
        name="journey-declare-assets",
        task_run_name=f"assets: {first.name if first else '?'}{more}",
    )(record)()
