"""Stream a generated image from its URL into any fsspec destination, verified or not at all.

:func:`store_image` and its async twin :func:`astore_image` check everything that can be
checked before the first byte moves, then stream the download into a writer. The guarantees,
in the order they are applied:

1. The download goes through its own HTTP client, with no ``Authorization`` header: the
   API key is never sent to the CDN. Only https is accepted for non-loopback hosts, on
   every redirect hop, and at most ``MAX_REDIRECTS`` hops are followed. Every hop connects
   only to an address the address rules allow, checked after name resolution
   (:mod:`~prefect_journey.storage.downloads`, :mod:`prefect_journey.address_rules`).
2. Bytes are streamed in ``DOWNLOAD_CHUNK`` pieces, never held whole; a ``Content-Length``
   or a running total above ``max_bytes`` aborts the transfer, and so does the whole
   download's deadline (:func:`~prefect_journey.policy.download_deadline`). From the second
   chunk on, hashing, verification and the store's writes run on a second thread, one chunk
   behind the socket reads, so at most three chunks are in memory
   (:mod:`~prefect_journey.storage.writers`).
3. The format comes from the bytes (PNG, JPEG, WebP), not the URL, and names the object's
   extension; width and height come from the header; sha256 is computed on the way.
4. The object is written with ``autocommit=False`` and only committed once the whole image
   is verified (see :mod:`prefect_journey.imageformat`); anything else discards it, so no
   partial object ever appears. (A plain ``with fs.open(..., "wb")`` commits whatever was
   written even when an exception leaves its block.)
5. Objects are never overwritten by default: the write uses mode ``"xb"`` where the store
   supports it. If the object already exists with the same sha256 (a retry or a re-run),
   that is success, reported with ``created=False``; a different object is an error.
6. A commit that fails may still have been applied (its answer lost, its repeats refused):
   before reporting the failure, the object at the key is read back, and if it is this
   image the store succeeded.
7. A store that dies mid-write leaves a partial file or a pending upload; the next store
   of the key removes it (see :mod:`prefect_journey.partials`).
8. Given an ``origin`` (the cache key of the request that made the image), the object
   carries a record of what made it, committed with it: S3 user metadata, or extended
   attributes on a local file (:mod:`~prefect_journey.storage.records`).
   :meth:`Destination.occupant` reads it back, so a later run knows what a key holds before
   it pays for an image.

This module does not import Prefect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx

from prefect_journey import policy
from prefect_journey.errors import (
    DownloadError,
    DownloadRefusedError,
    JourneyValidationError,
    failure_text,
)
from prefect_journey.models import check_http_url
from prefect_journey.storage.destination import Destination
from prefect_journey.storage.downloads import (
    DEFAULT_MAX_BYTES,
    _Regrouper,
    async_download_client,
    download_client,
)
from prefect_journey.storage.keys import DEFAULT_KEY_TEMPLATE, render_key
from prefect_journey.storage.records import StoredImage
from prefect_journey.storage.writers import _ObjectWriter, _WriteBehind


def store_image(
    image_url: str,
    destination: Destination | str,
    *,
    task_id: str,
    key_template: str = DEFAULT_KEY_TEMPLATE,
    key_fields: Mapping[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
    http: httpx.Client | None = None,
    origin: str | None = None,
    deadline: float | None = None,
) -> StoredImage:
    """Stream ``image_url`` into ``destination`` under ``key_template``, verified.

    Everything that can be checked (URL, template, size cap) is checked before the first
    byte moves. The object is committed only once the whole image is verified; any failure
    leaves nothing new at the key. See the module docstring for all the guarantees.

    Args:
        image_url: The image's http(s) URL (https unless the host is loopback), usually
            :attr:`ImagineResult.image_url`.
        destination: Where to store it: a :class:`Destination`, or an fsspec URL or folder
            (then with no storage options).
        task_id: The provider's task id; it fills ``{task_id}`` and is recorded in the
            result.
        key_template: The object key relative to the destination's root;
            ``"{task_id}.{ext}"`` by default. ``{ext}`` (required) always comes from the
            bytes: ``png``, ``jpg`` or ``webp``.
        key_fields: Values for the template's other fields; None for none.
        max_bytes: The size cap; a ``Content-Length`` or a running total above it aborts
            the download. 100 MB by default.
        overwrite: Replace an object already at the key. False (the default) never does:
            the same bytes count as success (``created=False``), different bytes raise
            :class:`~prefect_journey.errors.ObjectConflictError`.
        http: A client from :func:`download_client` to reuse across downloads (left
            open); None creates one for this call and closes it.
        origin: The cache key of the request that made the image
            (:func:`prefect_journey.cache.imagine_cache_key`). Recorded on the object with
            the task id, sha256, size, format and pixel size, committed with it (S3
            metadata, or extended attributes of a local file), so that
            :meth:`Destination.occupant` can tell a later run what the key holds. None (the
            default) records nothing.
        deadline: Seconds the whole download may take; None (the default) gives
            :func:`~prefect_journey.policy.download_deadline` of ``max_bytes`` (130 s for
            100 MB).

    Returns:
        The stored image: its URI, sha256, size, format and pixel size.

    Raises:
        DownloadRefusedError: The URL or a redirect is refused: its scheme, its host, or
            an address the host resolves to (see :mod:`prefect_journey.address_rules`); not
            retryable.
        DownloadTimeoutError: The download passed its deadline (retryable).
        DownloadError: The CDN answers other than 200, the transfer fails, the image is
            above ``max_bytes``, or the bytes are not a whole PNG, JPEG or WebP image. The
            size cap is not retryable; the rest are.
        JourneyValidationError: The key template or a rendered key is refused, a field has
            no value, ``max_bytes`` or ``deadline`` is not positive, or ``destination`` is
            an empty URL.
        ConfigurationError: A variable of the address rules is malformed.
        ObjectConflictError: A different object is already at the key and ``overwrite``
            is False.
        StorageError: The destination is not usable (not retryable), or writing or
            committing failed (retryable).

    Example:
        ```python
        from prefect_journey import JourneyClient
        from prefect_journey.storage import Destination, store_image

        with JourneyClient() as client:
            result = client.imagine(prompt="a lighthouse at dusk")
        stored = store_image(result.image_url, Destination("./outputs"), task_id=result.task_id)
        print(stored.uri, stored.width, stored.height)
        ```
    """
    writer = _prepare(
        image_url, destination, task_id, key_template, key_fields, max_bytes, overwrite, origin
    )
    chunks = _Regrouper(_deadline(max_bytes, deadline))
    client = http or download_client()
    pipe = _WriteBehind(writer)
    try:
        with client.stream("GET", image_url) as response:
            writer.check_length(response)
            for piece in response.iter_bytes():
                if (chunk := chunks.add(piece)) is not None:
                    pipe.put(chunk)
        rest = chunks.rest()
    except httpx.HTTPError as exc:
        _discard(pipe, writer)
        raise DownloadError(f"image download failed: {failure_text(exc)}") from None
    except BaseException:
        _discard(pipe, writer)
        raise
    else:
        return _complete(pipe, writer, rest)
    finally:
        if http is None:
            client.close()


async def astore_image(
    image_url: str,
    destination: Destination | str,
    *,
    task_id: str,
    key_template: str = DEFAULT_KEY_TEMPLATE,
    key_fields: Mapping[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
    http: httpx.AsyncClient | None = None,
    origin: str | None = None,
    deadline: float | None = None,
) -> StoredImage:
    """Async twin of :func:`store_image`; store writes run in a worker thread.

    The download runs on the event loop; hashing, verification and the store's writes and
    commit run in worker threads, so the loop never waits on the store.

    Args:
        image_url: The image's http(s) URL (https unless the host is loopback), usually
            :attr:`ImagineResult.image_url`.
        destination: Where to store it: a :class:`Destination`, or an fsspec URL or folder
            (then with no storage options).
        task_id: The provider's task id; it fills ``{task_id}`` and is recorded in the
            result.
        key_template: The object key relative to the destination's root;
            ``"{task_id}.{ext}"`` by default. ``{ext}`` (required) always comes from the
            bytes: ``png``, ``jpg`` or ``webp``.
        key_fields: Values for the template's other fields; None for none.
        max_bytes: The size cap; a ``Content-Length`` or a running total above it aborts
            the download. 100 MB by default.
        overwrite: Replace an object already at the key. False (the default) never does:
            the same bytes count as success (``created=False``), different bytes raise
            :class:`~prefect_journey.errors.ObjectConflictError`.
        http: A client from :func:`async_download_client` to reuse across downloads
            (left open); None creates one for this call and closes it.
        origin: The cache key of the request that made the image, recorded on the object
            (see :func:`store_image`); None (the default) records nothing.
        deadline: Seconds the whole download may take; None (the default) gives
            :func:`~prefect_journey.policy.download_deadline` of ``max_bytes``.

    Returns:
        The stored image: its URI, sha256, size, format and pixel size.

    Raises:
        DownloadRefusedError: The URL or a redirect is refused: its scheme, its host, or
            an address the host resolves to (see :mod:`prefect_journey.address_rules`); not
            retryable.
        DownloadTimeoutError: The download passed its deadline (retryable).
        DownloadError: The CDN answers other than 200, the transfer fails, the image is
            above ``max_bytes``, or the bytes are not a whole PNG, JPEG or WebP image. The
            size cap is not retryable; the rest are.
        JourneyValidationError: The key template or a rendered key is refused, a field has
            no value, ``max_bytes`` or ``deadline`` is not positive, or ``destination`` is
            an empty URL.
        ConfigurationError: A variable of the address rules is malformed.
        ObjectConflictError: A different object is already at the key and ``overwrite``
            is False.
        StorageError: The destination is not usable (not retryable), or writing or
            committing failed (retryable).

    Example:
        ```python
        import asyncio

        from prefect_journey import AsyncJourneyClient
        from prefect_journey.storage import Destination, astore_image

        async def main() -> None:
            async with AsyncJourneyClient() as client:
                result = await client.imagine(prompt="a lighthouse at dusk")
            stored = await astore_image(
                result.image_url, Destination("./outputs"), task_id=result.task_id
            )
            print(stored.uri)

        asyncio.run(main())
        ```
    """
    writer = _prepare(
        image_url, destination, task_id, key_template, key_fields, max_bytes, overwrite, origin
    )
    chunks = _Regrouper(_deadline(max_bytes, deadline))
    client = http or async_download_client()
    pipe = _WriteBehind(writer)
    # Each clean-up is one thread call: once started it runs to its end (the upload aborted,
    # the partial file removed) even when a cancelled task's next await is cancelled too.
    try:
        async with client.stream("GET", image_url) as response:
            writer.check_length(response)
            async for piece in response.aiter_bytes():
                if (chunk := chunks.add(piece)) is not None:
                    await asyncio.to_thread(pipe.put, chunk)  # blocks while the queue is full
        # The rest (a whole image below one chunk) is written by the same thread call that
        # completes the object: one hop to a thread instead of two.
        rest = chunks.rest()
    except httpx.HTTPError as exc:
        await asyncio.to_thread(_discard, pipe, writer)
        raise DownloadError(f"image download failed: {failure_text(exc)}") from None
    except BaseException:
        await asyncio.to_thread(_discard, pipe, writer)
        raise
    else:
        return await asyncio.to_thread(_complete, pipe, writer, rest)
    finally:
        if http is None:
            await client.aclose()


def _discard(pipe: _WriteBehind, writer: _ObjectWriter) -> None:
    """End a failed store: stop the writing, then discard what was written."""
    pipe.close(raise_error=False)
    writer.abort()


def _complete(pipe: _WriteBehind, writer: _ObjectWriter, rest: bytes | None) -> StoredImage:
    """Write ``rest`` and what is left, verify and commit; discard everything if that fails."""
    try:
        if rest is not None:
            pipe.put(rest)
        pipe.close()
        return writer.finish()
    except BaseException:
        _discard(pipe, writer)
        raise


def _deadline(max_bytes: int, deadline: float | None) -> float:
    if deadline is None:
        return policy.download_deadline(max_bytes)
    if not deadline > 0:
        raise JourneyValidationError("deadline must be a positive number of seconds")
    return deadline


def _prepare(
    image_url: str,
    destination: Destination | str,
    task_id: str,
    key_template: str,
    key_fields: Mapping[str, Any] | None,
    max_bytes: int,
    overwrite: bool,
    origin: str | None,
) -> _ObjectWriter:
    """Check everything that can be checked before the first byte moves."""
    try:
        check_http_url(image_url, what="image_url", https_only_remote=True)
    except ValueError as exc:
        raise DownloadRefusedError(f"refusing to download: {exc}") from None
    if max_bytes <= 0:
        raise JourneyValidationError("max_bytes must be positive")
    fields = {"task_id": task_id, "ext": "png", **(key_fields or {})}
    render_key(key_template, fields)  # fail on a bad template before downloading
    if isinstance(destination, str):
        destination = Destination(destination)
    return _ObjectWriter(
        destination,
        task_id=task_id,
        key_template=key_template,
        key_fields=key_fields or {},
        max_bytes=max_bytes,
        overwrite=overwrite,
        origin=origin,
    )
