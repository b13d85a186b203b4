"""Cache policies: what makes two imagine calls "the same image", so the second is free.

Prefect's default policy (inputs + task source + run id) never hits across flow runs, and a
policy over all inputs would hash credentials. These policies hash exactly the fields that
define the result, and nothing secret:

- imagine: the API host, model, prompt, references (with any presigning query parameters
  removed, since those change on every run), aspect ratio, resolution, and an explicit
  ``variant`` string. Not the key, not webhook fields, not the task's source code: a
  library upgrade must not re-bill everyone.
- store: the task id of the image, the destination URL and endpoint, the key template and
  fields, and the overwrite flag. Not the storage credentials.

A scheduled flow that wants a fresh image each day passes its scheduled date as
``variant``; re-running the same day then costs nothing.

The imagine policy runs under SERIALIZABLE isolation with leased locks
(:mod:`prefect_journey.locking`): concurrent identical requests are billed once. The locks
are files under the Prefect home (one machine), or keys in the Redis of
``JOURNEY_REDIS_URL`` (several machines): :func:`image_lock_manager` decides, at each lock,
for the task engine and the campaigns alike.

The record functions at the end (:func:`cached_result`, :func:`cache_result`,
:func:`lock_if_free_and_read`, ...) read and write the very records, under the very locks,
that the task engine uses for a task: the campaign pipeline calls them when it does a task's
work outside that task's runs, so both ways of running a campaign share one cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.results import ResultStore
from prefect.settings import PREFECT_HOME
from prefect.tasks import Task

from prefect_journey import settings
from prefect_journey._compat import result_store_for, run_result_store
from prefect_journey.client import resolve_base_url
from prefect_journey.errors import RedisUnavailableError
from prefect_journey.locking import LeasedFileSystemLockManager, SelectedLockManager
from prefect_journey.models import ImagineRequest
from prefect_journey.redis_block import apply_redis_block
from prefect_journey.storage import Destination

# Output URLs expire after 14 days; a cached result must never outlive its image.
DEFAULT_CACHE_EXPIRATION = timedelta(days=7)
# Query parameters that sign a URL (S3 v2/v4, GCS, Azure SAS) rather than name the object.
_SIGNING_PARAMETERS = frozenset(
    {
        "awsaccesskeyid",
        "signature",
        "expires",
        "x-amz-algorithm",
        "x-amz-credential",
        "x-amz-date",
        "x-amz-expires",
        "x-amz-signedheaders",
        "x-amz-signature",
        "x-amz-security-token",
        "x-goog-algorithm",
        "x-goog-credential",
        "x-goog-date",
        "x-goog-expires",
        "x-goog-signedheaders",
        "x-goog-signature",
        "sv",
        "se",
        "st",
        "sr",
        "sp",
        "sig",
        "spr",
        "skoid",
        "sktid",
        "skt",
        "ske",
        "sks",
        "skv",
    }
)


def canonical_reference(url: str) -> str:
    """The reference URL without presigning parameters: the same object, the same key.

    Args:
        url: A reference image URL, possibly presigned (S3 v2/v4, GCS, Azure SAS).

    Returns:
        ``url`` with its signing query parameters removed and the others kept in order.
    """
    parts = urlsplit(url)
    kept = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in _SIGNING_PARAMETERS
    ]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def _digest(prefix: str, identity: dict[str, Any]) -> str:
    encoded = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return f"{prefix}-{hashlib.sha256(encoded).hexdigest()}"


def imagine_cache_key(request: ImagineRequest, variant: str, base_url: str) -> str:
    """The cache key of one image; exposed so tools (budgets, dry runs) can predict hits.

    It covers exactly what defines the image (see the module docstring): the API host,
    model, prompt, references without presigning parameters, aspect ratio, resolution and
    ``variant``; not the API key, the webhook fields or the task's source code.

    Args:
        request: The generation request.
        variant: Any string that makes an otherwise identical request a new image (a
            scheduled flow passes its date); ``""`` for none.
        base_url: The API root; only its host and port count.

    Returns:
        ``"journey-imagine-"`` followed by a SHA-256 hex digest.

    Example:
        ```python
        from prefect_journey import ImagineRequest
        from prefect_journey.cache import imagine_cache_key

        request = ImagineRequest(prompt="a lighthouse at dusk")
        today = imagine_cache_key(request, "2025-06-01", "https://api.journeyapi.com")
        tomorrow = imagine_cache_key(request, "2025-06-02", "https://api.journeyapi.com")
        assert today != tomorrow
        ```
    """
    return _digest(
        "journey-imagine",
        {
            "api": urlsplit(base_url).netloc,
            "model": request.model,
            "prompt": request.prompt,
            "references": [canonical_reference(url) for url in request.image_urls],
            "aspect_ratio": request.aspect_ratio,
            "resolution": request.resolution,
            "variant": variant,
        },
    )


@dataclass
class ImagineCachePolicy(CachePolicy):
    """Cache key of the ``imagine`` tasks (see the module docstring)."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        """The task run's cache key: :func:`imagine_cache_key` of its inputs.

        Args:
            task_ctx: The task run's context (not used).
            inputs: The task's arguments: ``request`` (an ``ImagineRequest`` or its fields as
                a dict), ``credentials`` (whose ``base_url`` names the API; None for the
                default) and ``variant`` (None for ``""``).
            flow_parameters: The flow run's parameters (not used).
            **kwargs: Whatever else Prefect passes (not used).

        Returns:
            The cache key.

        Raises:
            JourneyValidationError: ``request`` is a dict that is not a valid request.
            ConfigurationError: The credentials' ``base_url`` is malformed.
        """
        request = inputs["request"]
        if not isinstance(request, ImagineRequest):
            request = ImagineRequest(**request)
        credentials = inputs.get("credentials")
        base_url = resolve_base_url(getattr(credentials, "base_url", None))
        return imagine_cache_key(request, str(inputs.get("variant") or ""), base_url)


def store_cache_key(
    task_id: str,
    destination: Destination,
    key_template: str,
    key_fields: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """The cache key of storing one image; exposed so a flow can find finished items.

    It covers the image's task id, the destination's URL and endpoint, the key template and
    fields, and the overwrite flag; not the storage credentials.

    Args:
        task_id: The provider's id of the task whose image is stored.
        destination: Where it is stored; its canonical URL and endpoint count.
        key_template: The object key template.
        key_fields: Values of the template's fields, compared as strings; None for none.
        overwrite: Whether the store replaces an existing object; False by default.

    Returns:
        ``"journey-store-"`` followed by a SHA-256 hex digest.

    Raises:
        StorageError: The destination's filesystem cannot be built.
    """
    return _digest(
        "journey-store",
        {
            "task_id": task_id,
            "destination": destination.canonical_url,
            "endpoint": destination.endpoint,
            "key_template": key_template,
            "key_fields": {k: str(v) for k, v in (key_fields or {}).items()},
            "overwrite": bool(overwrite),
        },
    )


@dataclass
class StoreCachePolicy(CachePolicy):
    """Cache key of the ``store_image`` tasks (see the module docstring)."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        """The task run's cache key: :func:`store_cache_key` of its inputs.

        Args:
            task_ctx: The task run's context (not used).
            inputs: The task's arguments: ``result`` (the ``ImagineResult`` whose image is
                stored), ``destination`` (anything
                :func:`~prefect_journey.destinations.resolve_destination` accepts),
                ``storage_options``, ``key_template``, ``key_fields`` and ``overwrite``.
            flow_parameters: The flow run's parameters (not used).
            **kwargs: Whatever else Prefect passes (not used).

        Returns:
            The cache key.

        Raises:
            JourneyValidationError: The destination is not a supported kind.
            StorageError: The destination's filesystem cannot be built.
        """
        from prefect_journey.destinations import resolve_destination

        return store_cache_key(
            inputs["result"].task_id,
            resolve_destination(inputs["destination"], inputs.get("storage_options")),
            inputs.get("key_template") or "",
            inputs.get("key_fields"),
            bool(inputs.get("overwrite")),
        )


def image_lock_manager() -> LockManager:
    """The manager of the image locks under the current settings: leased keys in Redis when
    ``JOURNEY_REDIS_URL`` is set (workers on several machines), else leased lock files under
    ``$PREFECT_HOME/locks/journey`` (one machine). The one place that chooses.

    Returns:
        The manager, the same object for the same settings.

    Raises:
        ConfigurationError: A malformed ``JOURNEY_REDIS_URL`` or lease, or the URL is set
            without the ``redis`` extra installed.
    """
    apply_redis_block()
    lease = settings.lock_lease_seconds()
    url = settings.redis_url()
    if url is not None:
        return _redis_locks(url, settings.redis_prefix(), lease)
    return _file_locks(Path(PREFECT_HOME.value()) / "locks" / "journey", lease)


@functools.cache
def _file_locks(directory: Path, lease: float) -> LockManager:
    return LeasedFileSystemLockManager(directory, lease_seconds=lease)


@functools.cache
def _redis_locks(url: str, prefix: str, lease: float) -> LockManager:
    from prefect_journey.redis_locking import LeasedRedisLockManager

    return LeasedRedisLockManager(url, prefix=prefix, lease_seconds=lease)


# SERIALIZABLE: a second run asking for the same image waits for the first and reads its
# result instead of paying again.
IMAGINE_CACHE_POLICY = ImagineCachePolicy().configure(
    isolation_level="SERIALIZABLE", lock_manager=SelectedLockManager(image_lock_manager)
)
STORE_CACHE_POLICY = StoreCachePolicy()


# --- Records ---------------------------------------------------------------------------------


def record_store(task: Task[..., Any]) -> ResultStore:
    """The result store (and lock manager) the task engine uses for ``task``'s records.

    Args:
        task: The task whose records are read or written.

    Returns:
        The result store; its ``lock_manager`` is None when the task's cache policy has none.
    """
    return result_store_for(task)


def imagine_record_store() -> ResultStore:
    """The result store (and lock manager) of the ``imagine`` tasks' records, built from
    :data:`IMAGINE_CACHE_POLICY` without the task object: the current run's result storage
    under the policy's lock manager, which is what :func:`record_store` gives for ``imagine``
    (it sets no result storage of its own). The attempt records
    (:mod:`prefect_journey.attempts`) use it, so they need not import the tasks.

    Returns:
        The result store; its ``result_storage`` is None when the run sets none (Prefect's
        default storage then applies, as for the task).
    """
    return run_result_store(IMAGINE_CACHE_POLICY.lock_manager)


def cached_result(task: Task[..., Any], key: str, *, holder: str | None = None) -> Any | None:
    """The value ``task`` cached under ``key``, read from the same result store as the task
    engine would.

    Args:
        task: The task whose records to read (``imagine``, ``store_image``, ...).
        key: The record's cache key.
        holder: The caller holds the key's lock under this name (it is the one computing it).

    Returns:
        The cached value; None when there is none, it has expired, another holder is
        computing it right now (the task itself would wait for that one) or it cannot be read.
    """
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
    """Record ``value`` as ``task``'s result under ``key``, with the expiry a run of ``task``
    would give it.

    Args:
        task: The task whose work was done.
        key: The record's cache key.
        value: The result to record.
        holder: Who holds the key's lock, when the task's cache policy has a lock manager.
    """
    expiration = datetime.now(UTC) + (task.cache_expiration or DEFAULT_CACHE_EXPIRATION)
    record_store(task).write(
        value,
        key=key,
        expiration=expiration,  # type: ignore[arg-type]  # the task engine passes a datetime too
        holder=holder,
    )


# FileSystemLockManager polls every 0.1 s, and waits for ever when given 0.
_LOCK_TRY_SECONDS = 0.01
# Returned by lock_if_free_and_read when another holder has the key's lock.
LOCKED_ELSEWHERE = object()


def new_holder() -> str:
    """A lock holder's name for one item's work, which may hop between threads.

    Returns:
        ``"<host>:<pid>:<random hex>"``, unique to this call.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


def lock_if_free_and_read(
    task: Task[..., Any], locks: LockManager | None, key: str, holder: str
) -> object:
    """Take ``key``'s lock if it is free and read ``task``'s record under it, in one call.

    One call is one thread hop from async code; Prefect's async acquire makes six. It does
    not wait for a lock another holder has. Once taken, the lock stays held, cached value
    or not, until :func:`release_if_held`.

    Args:
        task: The task whose record to read (``imagine``, ...).
        locks: The lock manager of the task's result store; None reads without locking.
        key: The record's cache key.
        holder: The caller's holder name, from :func:`new_holder`.

    Returns:
        The cached value or None (the lock is now held by ``holder``), or
        :data:`LOCKED_ELSEWHERE` when another holder has the lock.
    """
    if locks is not None and not locks.acquire_lock(key, holder, acquire_timeout=_LOCK_TRY_SECONDS):
        return LOCKED_ELSEWHERE
    return cached_result(task, key, holder=holder)


def release_if_held(locks: LockManager | None, key: str, holder: str) -> None:
    """Release ``key``'s lock if ``holder`` still holds it.

    Args:
        locks: The lock manager; None does nothing.
        key: The record's cache key.
        holder: The holder name the lock was taken under.
    """
    if locks is None:
        return
    try:
        if locks.is_lock_holder(key, holder):
            locks.release_lock(key, holder)
    except RedisUnavailableError as exc:
        # Unrenewed, the lock lapses after its lease; the work under it is over either way.
        logging.getLogger(__name__).warning("%s; the lock lapses after its lease", exc)


def locked_elsewhere(locks: LockManager | None, key: str) -> bool:
    """Whether some run holds ``key``'s lock (it is paying for that image right now).

    Args:
        locks: The lock manager; None means nothing is ever locked.
        key: The record's cache key.

    Returns:
        True if any holder, the caller included, has the lock.
    """
    return locks is not None and locks.is_locked(key)
