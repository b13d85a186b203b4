"""Prefect tasks over the plain client and storage: orchestration only.

- :func:`imagine` / :func:`aimagine`: one generation. Prefect retries what
  :class:`~prefect_journey.policy.RepayAllowance` allows (what cannot have been billed, and
  what may have been within ``repay_possibly_billed``, counted on the result); a 400, 401 or
  402 fails at once. ``Retry-After`` is honoured by waiting inside the failed attempt,
  because Prefect's retry delay cannot read it. Cached across runs by
  :class:`~prefect_journey.cache.ImagineCachePolicy`. :func:`for_request` gives them the
  timeout of one request.
- :func:`store_image` / :func:`astore_image`: stream the result into a destination.
- :func:`presign_references`: ``s3://`` character sheets to https URLs the API can fetch.
- :func:`declare_assets`: record stored objects as Prefect assets (one task run).

Every retry count, delay and timeout comes from :mod:`prefect_journey.policy`. The task
timeout is a safety net only: a sync task on a worker thread cannot be interrupted, so the
HTTP client's own timeouts are what stop a call; the task timeout sits just above them
(:func:`~prefect_journey.receiver.task_timeout` of the request) so the HTTP layer always
fails first. A Prefect task's timeout is fixed when the task is built, before its arguments
are known: the package's flows and executors size it per request with :func:`for_request`,
and a direct call of the decorated task gets the slowest request's, with recovery waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.client.schemas.objects import State, TaskRun
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.runtime import task_run as current_task_run
from prefect.tasks import Task

from prefect_journey import policy
from prefect_journey._compat import is_cached, quiet_worker_thread_timeout_notice
from prefect_journey.budget import CreditBudget
from prefect_journey.cache import (
    DEFAULT_CACHE_EXPIRATION,
    IMAGINE_CACHE_POLICY,
    STORE_CACHE_POLICY,
    imagine_cache_key,
)
from prefect_journey.credentials import (
    JourneyCredentials,
    api_base_url,
    async_journey_client,
    journey_client,
)
from prefect_journey.destinations import resolve_destination
from prefect_journey.errors import JourneyError, JourneyValidationError
from prefect_journey.gate import apaid_attempt, paid_attempt
from prefect_journey.models import (
    DEFAULT_MODEL,
    MAX_REFERENCES,
    ImagineRequest,
    ImagineResult,
    display_text,
)
from prefect_journey.publishing import (
    DESCRIPTION_PROMPT_CHARS,
    RUN_NAME_PROMPT_CHARS,
    Logger,
    log_generation,
    log_stored,
)
from prefect_journey.receiver import (
    JourneyWebhookReceiver,
    load_receiver,
    receiver_for,
    task_timeout,
)
from prefect_journey.recovery import (
    arecover_attempt,
    arecover_earlier,
    begin_attempt,
    end_attempt,
    recover_attempt,
    recover_earlier,
)
from prefect_journey.settings import DEFAULT_DESTINATION
from prefect_journey.storage import (
    DEFAULT_KEY_TEMPLATE,
    DEFAULT_MAX_BYTES,
    DEFAULT_PRESIGN_SECONDS,
    StoredImage,
    presign,
)
from prefect_journey.storage import astore_image as _astore_image
from prefect_journey.storage import store_image as _store_image

# Every task that calls the API or writes a destination carries the same tags: Prefect asks
# the API for tag concurrency slots on each run of a tagged task through one queue per
# distinct tag set, and a second set slows a campaign measurably (BENCHMARKS.md). The asset
# declaration (bookkeeping at the end of a run) has none: a tag limit meant for API calls
# never holds it.
TAGS = ["journey", DEFAULT_MODEL]
# Every task name of the package starts so; Prefect's worker-thread timeout notice is
# silenced for these tasks only (see prefect_journey._compat).
TASK_NAME_PREFIX = "journey-"
# A variant is a label (a date, "v2"), not a payload.
MAX_VARIANT_CHARS = 200

quiet_worker_thread_timeout_notice(TASK_NAME_PREFIX)

R = TypeVar("R")

# The repay allowance of the ``imagine`` task run in progress, with its run id. Prefect runs
# every attempt of a task run, and its retry condition between them, in one context (one
# thread, or one coroutine), which a task runner copies for each run it starts: the value
# lives exactly as long as the run, and a later run in the same context replaces it.
_RUN_REPAYS: ContextVar[tuple[str, policy.RepayAllowance] | None] = ContextVar(
    "journey_run_repays", default=None
)


def _run_repays(allowed: int | None = None) -> policy.RepayAllowance:
    """This task run's allowance: the one its first attempt made, else a new one of
    ``allowed`` repays (the default when None)."""
    run_id = current_task_run.id or ""
    found = _RUN_REPAYS.get()
    if found is not None and found[0] == run_id:
        return found[1]
    repays = policy.RepayAllowance(
        policy.DEFAULT_REPAY_POSSIBLY_BILLED if allowed is None else allowed
    )
    _RUN_REPAYS.set((run_id, repays))
    return repays


class Settled:
    """A finished task run, read once: its value (None unless it completed), whether that
    came from the cache, and why it failed."""

    __slots__ = ("cached", "error", "value")

    def __init__(
        self, value: Any = None, *, cached: bool = False, error: BaseException | None = None
    ) -> None:
        self.value = value
        self.cached = cached
        self.error = error


def settle(future: PrefectFuture[Any]) -> Settled:
    """Wait for ``future`` and read its outcome without raising.

    Args:
        future: A submitted task run.

    Returns:
        The value and whether it was a cache hit, or the run's own exception (a
        :class:`~prefect_journey.errors.JourneyError` with the state's message when the
        exception cannot be read).
    """
    future.wait()  # pins the final state; reading .state before can see a stale one
    state = future.state
    if state.is_completed():
        return Settled(future.result(), cached=is_cached(state))
    try:
        future.result()
    except Exception as error:  # the run's own failure, kept for its reason
        return Settled(error=error)
    return Settled(error=JourneyError(state.message or state.type.value))


def _failure(state: State[Any]) -> BaseException | None:
    data = state.data
    return data if isinstance(data, BaseException) else None


def retry_within_repays(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Default retry condition of :func:`imagine`: the run's
    :class:`~prefect_journey.policy.RepayAllowance` (``repay_possibly_billed`` of the run),
    which counts the possibly-billed failures it pays again.

    Args:
        task: The task (Prefect's retry-condition signature).
        task_run: The run that failed.
        state: Its failed state.

    Returns:
        Whether Prefect retries the run.
    """
    return _run_repays().should_retry(_failure(state))


def retry_safe_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Stricter retry condition: never risk paying twice, whatever the run's
    ``repay_possibly_billed`` (the same as passing ``repay_possibly_billed=0``).

    Args:
        task: The task (Prefect's retry-condition signature).
        task_run: The run that failed.
        state: Its failed state.

    Returns:
        True only for failures that cannot have been billed.

    Example:
        ```python
        from prefect_journey.tasks import imagine, retry_safe_only

        careful_imagine = imagine.with_options(retry_condition_fn=retry_safe_only)
        ```
    """
    return policy.should_retry_generation(_failure(state), allowed=0)


def retry_if_retryable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry condition of the storage tasks (:func:`~prefect_journey.policy
    .should_retry_store`).

    Args:
        task: The task (Prefect's retry-condition signature).
        task_run: The run that failed.
        state: Its failed state.

    Returns:
        Whether Prefect retries the run.
    """
    return policy.should_retry_store(_failure(state))


def as_request(request: ImagineRequest | Mapping[str, Any]) -> ImagineRequest:
    """Accept a request or its fields (as a deployment parameter would pass them).

    Args:
        request: An :class:`~prefect_journey.models.ImagineRequest` or its fields.

    Returns:
        The checked request.

    Raises:
        JourneyValidationError: Neither, or fields that break a rule.
    """
    if isinstance(request, ImagineRequest):
        return request
    if isinstance(request, Mapping):
        return ImagineRequest(**request)
    raise JourneyValidationError(
        f"request must be an ImagineRequest or a mapping, not {type(request).__name__}"
    )


def check_variant(variant: str) -> str:
    """``variant`` if it is a short string.

    Args:
        variant: A label that is part of the cache key.

    Returns:
        ``variant``, unchanged.

    Raises:
        JourneyValidationError: Not a string, or longer than :data:`MAX_VARIANT_CHARS`.
    """
    if not isinstance(variant, str) or len(variant) > MAX_VARIANT_CHARS:
        raise JourneyValidationError(
            f"variant must be a string of at most {MAX_VARIANT_CHARS} characters"
        )
    return variant


# A deployment's parameters are fixed, yet a daily schedule wants a new image per day: this
# placeholder in a variant becomes the run's scheduled date, so a re-run of the same day hits
# the cache.
SCHEDULED_DATE = "{scheduled_date}"


def resolve_variant(variant: str) -> str:
    """``variant`` with :data:`SCHEDULED_DATE` replaced by the flow run's scheduled date (UTC).

    Args:
        variant: A label that may contain ``{scheduled_date}``.

    Returns:
        The label for this run.

    Example:
        ``resolve_variant("daily-{scheduled_date}")`` is ``"daily-2026-12-02"`` in a run
        scheduled for that day.
    """
    if SCHEDULED_DATE not in variant:
        return variant
    scheduled = flow_run.scheduled_start_time.astimezone(UTC).date().isoformat()
    return variant.replace(SCHEDULED_DATE, scheduled)


def _imagine_run_name() -> str:
    request = current_task_run.parameters.get("request")
    prompt = getattr(request, "prompt", None) or (request or {}).get("prompt", "?")
    return "imagine: " + display_text(str(prompt), RUN_NAME_PROMPT_CHARS)


# One retry mechanism per layer: Prefect retries, so every attempt shows in the UI.
_CLIENT_OPTIONS: dict[str, Any] = {"max_retries": 0}


def _note_failure(logger: Logger, error: JourneyError) -> float:
    """Log a failed attempt; return how long Retry-After asks us to wait (capped)."""
    logger.warning("imagine attempt failed: %s", error)
    return policy.retry_after_pause(error)


def _finish(result: ImagineResult, repays: policy.RepayAllowance, logger: Logger) -> ImagineResult:
    # Inside a task the client makes one HTTP attempt per Prefect attempt.
    return log_generation(
        logger,
        result.model_copy(
            update={
                "possibly_billed_attempts": repays.used,
                "attempts": current_task_run.run_count,
            }
        ),
    )


IMAGINE_OPTIONS: dict[str, Any] = {
    "retries": policy.GENERATION_RETRIES,
    "retry_delay_seconds": list(policy.GENERATION_RETRY_DELAYS),
    "retry_jitter_factor": policy.RETRY_JITTER_FACTOR,
    "retry_condition_fn": retry_within_repays,
    "cache_policy": IMAGINE_CACHE_POLICY,
    "cache_expiration": DEFAULT_CACHE_EXPIRATION,
    "persist_result": True,
    # Only a direct call that was not sized with for_request runs with this one.
    "timeout_seconds": policy.worst_case_attempt_timeout(recovering=True),
    "tags": TAGS,
    "task_run_name": _imagine_run_name,
}


@task(name="journey-imagine", **IMAGINE_OPTIONS)
def imagine(
    request: ImagineRequest | Mapping[str, Any],
    credentials: JourneyCredentials | None = None,
    variant: str = "",
    budget: CreditBudget | None = None,
    concurrency_limit: str | None = None,
    webhook: JourneyWebhookReceiver | None = None,
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
) -> ImagineResult:
    """Generate one image (``POST /api/v1/imagine``), paid once per identical request.

    With a webhook receiver (``webhook``, or ``JOURNEY_WEBHOOK_URL`` and
    ``JOURNEY_WEBHOOK_SECRET``), an attempt whose answer is lost is recovered from its
    webhook delivery instead of being bought again, and an attempt an earlier run left in
    flight is recovered before paying (see :mod:`prefect_journey.recovery`).

    Args:
        request: The request, or its fields as a mapping (as a deployment passes them).
        credentials: A ``JourneyCredentials`` block; default ``JOURNEY_API_KEY``.
        variant: Part of the cache key only (see :mod:`prefect_journey.cache`): a new
            variant buys a new image of the same request.
        budget: A shared :class:`~prefect_journey.budget.CreditBudget` gating every attempt.
        concurrency_limit: A Prefect global concurrency limit held during each attempt.
        webhook: The webhook receiver that turns on recovery; None reads the environment.
        repay_possibly_billed: How many times a possibly-billed failure of this image (its
            outcome unknown, so it may be billed already) is paid again, 0 to 5; with a
            receiver, only after a recovery window that ended with nothing. Failures that
            cannot have been billed are retried regardless.

    Returns:
        The finished image, with its attempts and possibly-billed retries counted, and
        ``recovered`` when it came from a webhook delivery.

    Raises:
        JourneyValidationError: Bad input, before any call.
        AuthenticationError: The key is wrong (not retried).
        InsufficientCreditsError: The account is empty (not retried).
        TaskFailedError: The provider refused the image (not retried).
        PossiblyBilledError: The last attempt's outcome is unknown, and no repay is left.

    Example:
        ```python
        from prefect import flow
        from prefect_journey.models import ImagineRequest
        from prefect_journey.tasks import for_request, imagine

        @flow
        def poster() -> str:
            request = ImagineRequest(prompt="a lighthouse at dusk", aspect_ratio="16:9")
            # Sized for this request: its timeout is its own, not the slowest one's.
            return for_request(imagine, request)(request).image_url
        ```
    """
    request, variant = as_request(request), check_variant(variant)
    repays = _run_repays(policy.check_repay_possibly_billed(repay_possibly_billed))
    receiver = receiver_for(request, webhook or load_receiver())
    key = imagine_cache_key(request, variant, api_base_url(credentials)) if receiver else ""
    logger = get_run_logger()
    with journey_client(credentials, **_CLIENT_OPTIONS) as client:
        earlier = recover_earlier(key, receiver, client) if receiver else None
        if earlier is not None:
            return _finish(earlier, repays, logger)
        attempt = None
        try:
            with paid_attempt(budget, concurrency_limit):
                attempt = begin_attempt(key, receiver, request) if receiver else None
                result = client.imagine(attempt.request(request) if attempt else request)
        except JourneyError as error:
            recovered = (
                recover_attempt(key, attempt, receiver, error, budget, client)
                if attempt and receiver
                else None
            )
            if recovered is None:
                time.sleep(_note_failure(logger, error))
                raise
            result = recovered
        else:
            end_attempt(key, attempt)
    return _finish(result, repays, logger)


@task(name="journey-aimagine", **IMAGINE_OPTIONS)
async def aimagine(
    request: ImagineRequest | Mapping[str, Any],
    credentials: JourneyCredentials | None = None,
    variant: str = "",
    budget: CreditBudget | None = None,
    concurrency_limit: str | None = None,
    webhook: JourneyWebhookReceiver | None = None,
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
) -> ImagineResult:
    """Async twin of :func:`imagine`."""
    request, variant = as_request(request), check_variant(variant)
    repays = _run_repays(policy.check_repay_possibly_billed(repay_possibly_billed))
    receiver = receiver_for(request, webhook or load_receiver())
    key = imagine_cache_key(request, variant, api_base_url(credentials)) if receiver else ""
    logger = get_run_logger()
    async with async_journey_client(credentials, **_CLIENT_OPTIONS) as client:
        earlier = await arecover_earlier(key, receiver, client) if receiver else None
        if earlier is not None:
            return _finish(earlier, repays, logger)
        attempt = None
        try:
            async with apaid_attempt(budget, concurrency_limit):
                if receiver is not None:
                    attempt = await asyncio.to_thread(begin_attempt, key, receiver, request)
                result = await client.imagine(attempt.request(request) if attempt else request)
        except JourneyError as error:
            recovered = (
                await arecover_attempt(key, attempt, receiver, error, budget, client)
                if attempt and receiver
                else None
            )
            if recovered is None:
                await asyncio.sleep(_note_failure(logger, error))
                raise
            result = recovered
        else:
            if attempt is not None:
                await asyncio.to_thread(end_attempt, key, attempt)
    return _finish(result, repays, logger)


def for_request(
    task: Task[..., R],
    request: ImagineRequest | Mapping[str, Any],
    webhook: JourneyWebhookReceiver | None = None,
) -> Task[..., R]:
    """``task`` (:func:`imagine` or :func:`aimagine`) with the timeout of ``request``.

    The timeout is :func:`~prefect_journey.receiver.task_timeout`: the request's attempt
    deadline (its read timeout, ``JOURNEY_READ_TIMEOUT`` when set, plus connect time and a
    margin), and with a receiver the waits for deliveries too. A Prefect task's timeout is
    fixed before its arguments are known; this is how a call gets its own.

    Args:
        task: The task to size.
        request: The request it will run, or its fields.
        webhook: The receiver the call is given; None reads the environment, as the task
            does.

    Returns:
        A copy of ``task`` with that timeout (``Task.with_options``).

    Raises:
        JourneyValidationError: ``request`` is not a valid request.
        ConfigurationError: The environment's receiver or read timeout is malformed.

    Example:
        ```python
        from prefect import flow
        from prefect_journey.models import ImagineRequest
        from prefect_journey.tasks import for_request, imagine

        @flow
        def poster() -> str:
            request = ImagineRequest(prompt="a lighthouse at dusk")
            return for_request(imagine, request).submit(request).result().image_url
        ```
    """
    request = as_request(request)
    return task.with_options(timeout_seconds=task_timeout(request, webhook or load_receiver()))


def _store_run_name() -> str:
    result = current_task_run.parameters.get("result")
    return f"store: {getattr(result, 'task_id', '?')}"


STORE_OPTIONS: dict[str, Any] = {
    "retries": policy.STORE_RETRIES,
    "retry_delay_seconds": list(policy.STORE_RETRY_DELAYS),
    "retry_jitter_factor": policy.RETRY_JITTER_FACTOR,
    "retry_condition_fn": retry_if_retryable,
    "cache_policy": STORE_CACHE_POLICY,
    "cache_expiration": DEFAULT_CACHE_EXPIRATION,
    "persist_result": True,
    "timeout_seconds": policy.STORE_TIMEOUT,
    "tags": TAGS,
    "task_run_name": _store_run_name,
}


@task(name="journey-store-image", **STORE_OPTIONS)
def store_image(
    result: ImagineResult,
    destination: Any = DEFAULT_DESTINATION,
    storage_options: Mapping[str, Any] | None = None,
    key_template: str = DEFAULT_KEY_TEMPLATE,
    key_fields: Mapping[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
    origin: str | None = None,
) -> StoredImage:
    """Stream ``result.image_url`` into ``destination``, verified, or write nothing.

    Args:
        result: The generation to store.
        destination: An fsspec URL or folder, an ``ImageDestination``, a ``RemoteFileSystem``
            / ``LocalFileSystem`` or a prefect-aws ``S3Bucket`` block.
        storage_options: fsspec options for a plain URL (blocks carry their own).
        key_template: The object key, from ``task_id``, ``ext`` and ``key_fields``.
        key_fields: More fields for the key template.
        max_bytes: Refuse images larger than this.
        overwrite: Replace a different object at the key instead of failing.
        origin: The cache key of the request that made the image, recorded on the object
            (see :func:`prefect_journey.storage.store_image`); None records nothing. Not
            part of the task's cache key.

    Returns:
        What was written: URI, format, size, sha256, whether it was created.

    Raises:
        DownloadError: The image could not be fetched or is corrupt.
        StorageError: The destination failed.
        ObjectConflictError: Another object holds the key (and not ``overwrite``).

    Example:
        ```python
        from prefect import flow
        from prefect_journey.tasks import imagine, store_image

        @flow
        def poster() -> str:
            result = imagine({"prompt": "a lighthouse at dusk"})
            return store_image(result, "s3://my-bucket/posters").uri
        ```
    """
    stored = _store_image(
        result.image_url,
        resolve_destination(destination, storage_options),
        task_id=result.task_id,
        key_template=key_template,
        key_fields=key_fields,
        max_bytes=max_bytes,
        overwrite=overwrite,
        origin=origin,
    )
    log_stored(stored)
    return stored


@task(name="journey-astore-image", **STORE_OPTIONS)
async def astore_image(
    result: ImagineResult,
    destination: Any = DEFAULT_DESTINATION,
    storage_options: Mapping[str, Any] | None = None,
    key_template: str = DEFAULT_KEY_TEMPLATE,
    key_fields: Mapping[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
    origin: str | None = None,
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
        origin=origin,
    )
    log_stored(stored)
    return stored


@task(name="journey-presign-references", tags=TAGS, retries=2, retry_delay_seconds=1)
def presign_references(
    urls: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    expires_in: int = DEFAULT_PRESIGN_SECONDS,
) -> list[str]:
    """Turn ``s3://`` references into time-limited https URLs; http(s) URLs pass through.

    Args:
        urls: Up to 14 reference images.
        storage_options: fsspec options of the bucket that holds them.
        expires_in: Seconds each presigned URL stays valid.

    Returns:
        One URL per reference, in order.

    Raises:
        JourneyValidationError: More than 14 references, or one that is not a URL.
    """
    if len(urls) > MAX_REFERENCES:
        raise JourneyValidationError(f"at most {MAX_REFERENCES} references, got {len(urls)}")
    return [presign(url, storage_options, expires_in) for url in urls]


def declare_assets(images: Sequence[tuple[StoredImage, str]]) -> None:
    """Declare stored objects (with their prompts) as Prefect assets materialized by the
    current flow run, all in one task run.

    An object's key is only known after its bytes arrive (the extension comes from them),
    so the materializing task is built here rather than decorated in advance. A URI that
    is not a valid asset key (a local path with spaces) is logged and skipped.

    Args:
        images: Each stored object with the prompt that made it.
    """
    assets: list[tuple[Asset, StoredImage]] = []
    for stored, prompt in images:
        try:
            asset = Asset(
                key=stored.uri,
                properties=AssetProperties(
                    name=stored.uri.rsplit("/", 1)[-1],
                    description=(
                        display_text(prompt, DESCRIPTION_PROMPT_CHARS) if prompt else None
                    ),
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
