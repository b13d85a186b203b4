"""The package's Prefect tasks: thin wrappers over the plain core, for users' own flows.

- :func:`aimagine` / :func:`imagine`: one generation, paid once per identical request
  (:func:`~prefect_journey.generation.generate`: the gate, the attempt, the recovery of a
  lost answer, the retry rule). Cached across runs by
  :class:`~prefect_journey.cache.ImagineCachePolicy`; its SERIALIZABLE lock makes two runs
  asking for the same image at once pay once.
- :func:`astore_image` / :func:`store_image`: stream the result into a destination,
  verified, under the store's retry rule.
- :func:`presign_references`: ``s3://`` character sheets to https URLs the API can fetch.

Retries happen inside the task run, by the package's one rule (see
docs/retries-and-timeouts.md), not by Prefect's ``retries``: a provider's ``Retry-After``
is honoured as given, and a possibly-billed failure is paid again only within
``repay_possibly_billed``; each failed attempt is a warning in the run's logs. Every attempt
has its own deadline, sized for its request; the task's timeout only bounds the whole ladder.
The sync twins run the async task's body to its end; nothing is written twice.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.runtime import task_run as current_task_run

from prefect_journey import policy
from prefect_journey._compat import quiet_worker_thread_timeout_notice
from prefect_journey.attempts import check_shared_setup
from prefect_journey.budget import CreditBudget
from prefect_journey.cache import (
    DEFAULT_CACHE_EXPIRATION,
    IMAGINE_CACHE_POLICY,
    STORE_CACHE_POLICY,
    imagine_cache_key,
)
from prefect_journey.credentials import JourneyCredentials, api_base_url, async_journey_client
from prefect_journey.destinations import resolve_destination
from prefect_journey.errors import JourneyValidationError
from prefect_journey.gate import Backpressure
from prefect_journey.generation import PaidCalls, generate
from prefect_journey.models import (
    DEFAULT_MODEL,
    MAX_REFERENCES,
    ImagineRequest,
    ImagineResult,
    as_request,
    display_text,
)
from prefect_journey.publishing import RUN_NAME_PROMPT_CHARS, log_stored
from prefect_journey.receiver import JourneyWebhookReceiver, load_receiver
from prefect_journey.recovery import settle_image
from prefect_journey.retrying import store_with_retries
from prefect_journey.settings import DEFAULT_DESTINATION
from prefect_journey.storage import (
    DEFAULT_KEY_TEMPLATE,
    DEFAULT_MAX_BYTES,
    DEFAULT_PRESIGN_SECONDS,
    StoredImage,
    presign,
)
from prefect_journey.variants import check_variant

# Every task that calls the API or writes a destination carries the same tags: Prefect asks
# the API for tag concurrency slots on each run of a tagged task through one queue per
# distinct tag set, and a second set slows a campaign measurably (BENCHMARKS.md).
TAGS = ["journey", DEFAULT_MODEL]
# Every task name of the package starts so; Prefect's worker-thread timeout notice is
# silenced for these tasks only (see prefect_journey._compat).
TASK_NAME_PREFIX = "journey-"

quiet_worker_thread_timeout_notice(TASK_NAME_PREFIX)

R = TypeVar("R")


def _to_the_end(coroutine: Coroutine[Any, Any, R]) -> R:
    """Run an async task's body from its sync twin: on this thread's own event loop, or,
    when a loop already runs here (a sync task called from an async flow), on a thread of
    its own. The run's context goes with it either way."""
    context = contextvars.copy_context()
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop_here = False
    else:
        loop_here = True
    if not loop_here:
        return context.run(asyncio.run, coroutine)
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(context.run, asyncio.run, coroutine).result()


def _imagine_run_name() -> str:
    request = current_task_run.parameters.get("request")
    prompt = getattr(request, "prompt", None) or (request or {}).get("prompt", "?")
    return "imagine: " + display_text(str(prompt), RUN_NAME_PROMPT_CHARS)


IMAGINE_OPTIONS: dict[str, Any] = {
    "cache_policy": IMAGINE_CACHE_POLICY,
    "cache_expiration": DEFAULT_CACHE_EXPIRATION,
    "persist_result": True,
    "timeout_seconds": policy.generation_time_limit(),
    "tags": TAGS,
    "task_run_name": _imagine_run_name,
}


@task(name="journey-aimagine", **IMAGINE_OPTIONS)
async def aimagine(
    request: ImagineRequest | Mapping[str, Any],
    credentials: JourneyCredentials | None = None,
    variant: str = "",
    budget: CreditBudget | None = None,
    concurrency_limit: str | None = None,
    webhook: JourneyWebhookReceiver | None = None,
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
    max_pause: float = policy.RETRY_AFTER_CAP,
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
        max_pause: The longest ``Retry-After`` waited for, in seconds; a longer one ends
            the run with ``NotStartedError`` (nothing billed).

    Returns:
        The finished image, with its attempts and possibly-billed retries counted, and
        ``recovered`` when it came from a webhook delivery.

    Raises:
        JourneyValidationError: Bad input, before any call.
        AuthenticationError: The key is wrong (not retried).
        InsufficientCreditsError: The account is empty (not retried).
        TaskFailedError: The provider refused the image (not retried).
        PossiblyBilledError: The last attempt's outcome is unknown, and no repay is left.
        NotStartedError: The provider asked to wait longer than ``max_pause``.
        ConfigurationError: ``JOURNEY_REDIS_URL`` is set while the result storage is
            local to the worker (before any call).
        RedisUnavailableError: ``JOURNEY_REDIS_URL``'s Redis does not answer (before any
            call).

    Example:
        ```python
        import asyncio

        from prefect import flow
        from prefect_journey.tasks import aimagine

        @flow
        async def poster() -> str:
            result = await aimagine({"prompt": "a lighthouse at dusk", "aspect_ratio": "16:9"})
            return result.image_url

        asyncio.run(poster())
        ```
    """
    request, variant = as_request(request), check_variant(variant)
    repays = policy.check_repay_possibly_billed(repay_possibly_billed)
    receiver = webhook or load_receiver()
    check_shared_setup()
    key = imagine_cache_key(request, variant, api_base_url(credentials))
    async with async_journey_client(credentials, max_retries=0) as api:
        calls = PaidCalls(
            api,
            budget=budget,
            concurrency_limit=concurrency_limit,
            receiver=receiver,
            repay_possibly_billed=repays,
            pause=Backpressure(max_pause),
        )
        result = await generate(request, calls, key=key, logger=get_run_logger())
    if receiver is not None:
        # Prefect's engine writes the cache record as the task returns, right after this.
        await asyncio.to_thread(settle_image, key)
    return result


@task(name="journey-imagine", **IMAGINE_OPTIONS)
def imagine(
    request: ImagineRequest | Mapping[str, Any],
    credentials: JourneyCredentials | None = None,
    variant: str = "",
    budget: CreditBudget | None = None,
    concurrency_limit: str | None = None,
    webhook: JourneyWebhookReceiver | None = None,
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
    max_pause: float = policy.RETRY_AFTER_CAP,
) -> ImagineResult:
    """Sync twin of :func:`aimagine` (same arguments, same cache records).

    Example:
        ```python
        from prefect import flow
        from prefect_journey.tasks import imagine

        @flow
        def poster() -> str:
            return imagine({"prompt": "a lighthouse at dusk", "aspect_ratio": "16:9"}).image_url
        ```
    """
    return _to_the_end(
        aimagine.fn(
            request,
            credentials,
            variant,
            budget,
            concurrency_limit,
            webhook,
            repay_possibly_billed,
            max_pause,
        )
    )


def _store_run_name() -> str:
    result = current_task_run.parameters.get("result")
    return f"store: {getattr(result, 'task_id', '?')}"


STORE_OPTIONS: dict[str, Any] = {
    "cache_policy": STORE_CACHE_POLICY,
    "cache_expiration": DEFAULT_CACHE_EXPIRATION,
    "persist_result": True,
    "timeout_seconds": policy.store_time_limit(),
    "tags": TAGS,
    "task_run_name": _store_run_name,
}


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
    """Stream ``result.image_url`` into ``destination``, verified, or write nothing.

    Args:
        result: The generation to store.
        destination: An fsspec URL or folder, an ``ImageDestination``, or a storage block
            :func:`~prefect_journey.destinations.resolve_destination` reads (prefect-aws
            ``S3Bucket``, prefect-gcp ``GcsBucket``, ``RemoteFileSystem``, ...).
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
        import asyncio

        from prefect import flow
        from prefect_journey.tasks import aimagine, astore_image

        @flow
        async def poster() -> str:
            result = await aimagine({"prompt": "a lighthouse at dusk"})
            return (await astore_image(result, "s3://my-bucket/posters")).uri

        asyncio.run(poster())
        ```
    """
    stored = await store_with_retries(
        result.image_url,
        resolve_destination(destination, storage_options),
        logger=get_run_logger(),
        task_id=result.task_id,
        key_template=key_template,
        key_fields=key_fields,
        max_bytes=max_bytes,
        overwrite=overwrite,
        origin=origin,
    )
    log_stored(stored)
    return stored


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
    """Sync twin of :func:`astore_image` (same arguments, same cache records).

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
    return _to_the_end(
        astore_image.fn(
            result,
            destination,
            storage_options,
            key_template,
            key_fields,
            max_bytes,
            overwrite,
            origin,
        )
    )


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
