"""Stream a generated image from its URL into any fsspec destination, verified or not at all.

The guarantees, in the order they are applied:

1. The download goes through its own HTTP client, with no ``Authorization`` header: the
   API key is never sent to the CDN. Only https is accepted for non-loopback hosts, on
   every redirect hop, and at most :data:`MAX_REDIRECTS` hops are followed. Every hop
   connects only to an address the address rules allow, checked after name resolution
   (:mod:`prefect_journey.address_rules`).
2. Bytes are streamed in :data:`DOWNLOAD_CHUNK` pieces, never held whole; a
   ``Content-Length`` or a running total above ``max_bytes`` aborts the transfer, and so
   does the whole download's deadline
   (:func:`~prefect_journey.policy.download_deadline`). From the second chunk on, hashing,
   verification and the store's writes run on a second thread, one chunk behind the socket
   reads (see :class:`_WriteBehind`), so at most three chunks are in memory.
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
   attributes on a local file (see :data:`RECORD_PREFIX`). :meth:`Destination.occupant`
   reads it back, so a later run knows what a key holds before it pays for an image.

This module does not import Prefect.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import re
import string
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import fsspec
import httpx
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from prefect_journey import partials, policy, settings
from prefect_journey.address_rules import AddressRules, AsyncCheckedTransport, CheckedTransport
from prefect_journey.errors import (
    DownloadError,
    DownloadRefusedError,
    DownloadTimeoutError,
    JourneyValidationError,
    ObjectConflictError,
    StorageError,
    failure_text,
)
from prefect_journey.imageformat import (
    EXTENSIONS,
    ImageFormatError,
    ImageInfo,
    ImageVerifier,
    detect_format,
)
from prefect_journey.models import check_http_url
from prefect_journey.tls import shared_ssl_context

logger = logging.getLogger("prefect_journey.storage")

# The API's images are 2-10 MB, a 4K PNG ~25 MB; 100 MB means something is wrong.
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
# Download piece size: large enough to keep syscalls rare, small against memory.
DOWNLOAD_CHUNK = 1024 * 1024
# S3's minimum multipart part; s3fs holds one part in memory before uploading it.
UPLOAD_PART_SIZE = 5 * 1024 * 1024
# Chunks waiting for the write-behind thread. One is enough to keep both threads busy; with
# the chunk being read and the one being written, three chunks at most are in memory.
WRITE_BEHIND_DEPTH = 1
# A local file's writeback is started every this many bytes while it is written, so the
# fsync before it is published waits for little (the kernel would otherwise hold it all).
LOCAL_WRITEBACK_BYTES = 16 * 1024 * 1024
_CAN_START_WRITEBACK = hasattr(os, "posix_fadvise")  # not on macOS or Windows
# A CDN redirects once or twice; more is a loop or an attack.
MAX_REDIRECTS = 5
# A download's timeouts: the API's for connecting, writing and the pool, its own for reading.
DOWNLOAD_TIMEOUT = httpx.Timeout(
    connect=policy.CONNECT_TIMEOUT,
    read=policy.DOWNLOAD_READ_TIMEOUT,
    write=policy.WRITE_TIMEOUT,
    pool=policy.POOL_TIMEOUT,
)
# Object stores cap keys at 1024 bytes (S3, GCS).
MAX_KEY_BYTES = 1024
DEFAULT_KEY_TEMPLATE = "{task_id}.{ext}"
# Presigned links for artifacts and references: long enough for a run and a look in the UI.
DEFAULT_PRESIGN_SECONDS = 24 * 3600

# Stores whose ``autocommit=False`` files honour mode "xb" at commit (s3fs sends
# If-None-Match), closing the race between our existence check and the commit. Elsewhere
# a concurrent writer of the same key wins last; both write the same verified bytes.
EXCLUSIVE_CREATE_PROTOCOLS = frozenset({"s3", "s3a"})
# Stores whose objects carry user metadata (S3's ``x-amz-meta-*``), which holds an object's
# record. A local file keeps it in extended attributes; other stores keep no record.
METADATA_PROTOCOLS = frozenset({"s3", "s3a"})
# The names of an object's record: S3 metadata keys, and after ``user.`` extended attribute
# names (``journey-origin``, ``journey-task-id``, ``journey-sha256``, ...). A record lives on
# the object itself, never beside it, so a folder or bucket holds exactly its images.
RECORD_PREFIX = "journey-"
_XATTR_NAMESPACE = "user."
_CAN_RECORD_LOCALLY = hasattr(os, "setxattr")  # Linux; not macOS or Windows

_SAFE_KEY_CHARS = re.compile(r"^[A-Za-z0-9._\-/=+@,:~]+$")


class StoredImage(BaseModel):
    """An image committed to its destination.

    Attributes:
        uri: The object's absolute URL (``file:///abs/outputs/<key>``,
            ``s3://bucket/prefix/<key>``).
        sha256: The hex SHA-256 digest of the bytes.
        bytes: The object's size in bytes.
        format: ``"png"``, ``"jpeg"`` or ``"webp"``, read from the bytes, not the URL.
        width: The width in pixels, from the image's header.
        height: The height in pixels, from the image's header.
        task_id: The provider's id of the task that made the image.
        created: False when the object was already there with the same bytes (a retry or
            a re-run); True by default.
    """

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    bytes: int
    format: str
    width: int
    height: int
    task_id: str
    created: bool = True


@dataclass(frozen=True)
class Occupant:
    """An object already at an image's key, and what its record says made it.

    Attributes:
        uri: The object's absolute URL.
        origin: The recorded cache key of the request that made it; None when the object
            has no record (stored without an ``origin``, or where no record is kept).
        stored: The object as a :class:`StoredImage` (``created=False``) when its origin is
            the one asked about and it is a whole image; else None.
    """

    uri: str
    origin: str | None
    stored: StoredImage | None


@dataclass(frozen=True)
class Destination:
    """Where images go: an fsspec URL and the options its filesystem needs.

    Building one checks only the types; :meth:`check` finds out whether the store can be
    used.

    Attributes:
        url: An fsspec URL or a local folder (``s3://bucket/prefix``, ``./outputs``, ...).
        storage_options: Options for the filesystem (``endpoint_url``, ``key``/``secret``,
            ...); empty by default. Left out of the repr, as they may hold credentials.

    Raises:
        JourneyValidationError: ``url`` is empty or not a string, or ``storage_options`` is
            not a mapping.

    Example:
        ```python
        from prefect_journey.storage import Destination

        destination = Destination("./outputs")
        destination.check()  # creates the folder; fails if it cannot be written
        print(destination.canonical_url)  # file:///.../outputs
        ```
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.strip():
            raise JourneyValidationError("destination must be a non-empty URL or path")
        if not isinstance(self.storage_options, Mapping):
            raise JourneyValidationError("storage_options must be a mapping")

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem and the root path inside it.

        Returns:
            The fsspec filesystem built from ``url`` and ``storage_options``, and the root
            path inside it without a trailing ``/``.

        Raises:
            StorageError: fsspec cannot build the filesystem (unknown protocol, missing
                package, bad option); not retryable.
        """
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **dict(self.storage_options))
        except (ValueError, ImportError, TypeError) as exc:
            raise StorageError(
                f"destination {self.url!r} is not usable: {exc}", retryable=False
            ) from None
        return fs, root.rstrip("/")

    def check(self) -> None:
        """Fail now, before any credit is spent, if the destination cannot be used.

        A local folder is created if missing and must be writable; on an object store, the
        container (the root's first segment, such as the bucket) must exist.

        Raises:
            StorageError: Bad options, an unknown bucket, refused credentials, an
                unreachable endpoint or an unwritable folder; not retryable.
        """
        fs, root = self.filesystem()
        try:
            if isinstance(fs, LocalFileSystem):
                os.makedirs(root, exist_ok=True)
                if not os.access(root, os.W_OK):
                    raise PermissionError(f"{root} is not writable")
                return
            container = root.split("/", 1)[0]
            if not fs.exists(container):
                raise FileNotFoundError(f"{container!r} does not exist")
        except Exception as exc:
            raise StorageError(
                f"destination {self.url!r} is not reachable: {failure_text(exc)}",
                retryable=False,
            ) from None

    def holds(self, stored: StoredImage) -> bool:
        """Whether the object ``stored`` describes is still there with its size.

        One metadata read; the content is not hashed again. The filesystem's listing cache
        is dropped first, since a long-lived process may have listed the object before a
        delete.

        Args:
            stored: The image as it was stored.

        Returns:
            True if an object of ``stored.bytes`` bytes is at its URI; False if not, or if
            the store cannot tell.

        Raises:
            StorageError: The destination's filesystem cannot be built.
        """
        fs, _ = self.filesystem()
        path = fsspec.core.strip_protocol(stored.uri)
        fs.invalidate_cache(path)  # a long-lived process may have listed it before a delete
        try:
            return int(fs.info(path)["size"]) == stored.bytes
        except (OSError, KeyError, ValueError):
            return False

    def occupant(
        self, key_template: str, key_fields: Mapping[str, Any], origin: str
    ) -> Occupant | None:
        """The object an image of ``key_fields`` would be stored over, if there is one.

        The extension comes from the bytes, so every extension the package writes is tried
        (``png``, ``jpg``, ``webp``): one metadata read each on S3, until one is found. The
        object is described from its record, or read back and hashed when the record lacks
        the description (an S3 upload in parts begins before the last byte is known).

        Args:
            key_template: The object key's template; ``{task_id}``, if it has one, must be
                in ``key_fields``.
            key_fields: The values of the template's fields other than ``{ext}``.
            origin: The cache key of the request whose image would be stored; the object is
                described only if its record names this origin.

        Returns:
            The object at the first key found, or None when no key holds one.

        Raises:
            JourneyValidationError: The template or a rendered key is refused.
            StorageError: The destination's filesystem cannot be built, or an object's
                metadata cannot be read.
        """
        fs, root = self.filesystem()
        for ext in dict.fromkeys(EXTENSIONS.values()):
            key = render_key(key_template, {**key_fields, "ext": ext})
            path = f"{root}/{key}" if root else key
            uri = str(fs.unstrip_protocol(path))
            fs.invalidate_cache(path)  # a long-lived process may have listed it before
            try:
                record = _read_record(fs, path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot read {uri}: {exc}") from None
            recorded = record.get("origin")
            if recorded != origin:
                return Occupant(uri, recorded, None)
            stored = _recorded_image(record, uri) or _read_image(
                fs, path, uri, record.get("task-id", "")
            )
            return Occupant(uri, recorded, stored)
        return None

    @property
    def canonical_url(self) -> str:
        """The root as an absolute URL (``file:///abs/outputs``, ``s3://bucket/prefix``).

        Raises:
            StorageError: The destination's filesystem cannot be built.
        """
        fs, root = self.filesystem()
        return str(fs.unstrip_protocol(root))

    @property
    def endpoint(self) -> str | None:
        """The custom endpoint, if any (part of an object's identity, unlike credentials).

        Read from ``storage_options["endpoint_url"]``, else
        ``storage_options["client_kwargs"]["endpoint_url"]``; None when neither is set.
        """
        options = dict(self.storage_options)
        client_kwargs = options.get("client_kwargs") or {}
        endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
        return str(endpoint) if endpoint else None


def check_object_key(key: str) -> str:
    """Refuse keys that could escape their prefix or that stores treat differently.

    Args:
        key: A rendered object key, relative to the destination's root.

    Returns:
        ``key``, unchanged.

    Raises:
        JourneyValidationError: The key is empty, starts with ``/``, contains a backslash,
            has an empty, ``.`` or ``..`` segment, has characters outside
            ``A-Za-z0-9._-/=+@,:~``, or is longer than :data:`MAX_KEY_BYTES` bytes.
    """
    if not key or not key.strip():
        raise JourneyValidationError("object key is empty")
    problems = []
    if key.startswith("/"):
        problems.append("starts with '/'")
    if "\\" in key:
        problems.append("contains a backslash")
    if any(part in ("", ".", "..") for part in key.split("/")):
        problems.append("has an empty, '.' or '..' path segment")
    if not _SAFE_KEY_CHARS.match(key):
        problems.append("has characters outside letters, digits and ._-/=+@,:~")
    if len(key.encode()) > MAX_KEY_BYTES:
        problems.append(f"is longer than {MAX_KEY_BYTES} bytes")
    if problems:
        raise JourneyValidationError(f"object key {key!r} " + "; ".join(problems))
    return key


def check_key_template(template: str) -> list[str]:
    """Return the field names of a key template; refuse attribute or index access.

    Args:
        template: A :meth:`str.format` template such as ``"{campaign}/{index:04d}.{ext}"``.

    Returns:
        The names of its fields, in order of appearance.

    Raises:
        JourneyValidationError: The template is malformed, a field is not a plain name
            (``{a.b}``, ``{a[0]}``, ``{}``, ``{0}``), or ``{ext}`` is missing.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise JourneyValidationError(f"key template {template!r} is malformed: {exc}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise JourneyValidationError(
                f"key template {template!r}: field {{{name}}} must be a plain name"
            )
        names.append(name)
    if "ext" not in names:
        raise JourneyValidationError(f"key template {template!r} must contain {{ext}}")
    return names


def render_key(template: str, fields: Mapping[str, Any]) -> str:
    """Fill a key template and check the result.

    Args:
        template: A key template (see :func:`check_key_template`).
        fields: A value for each of the template's fields.

    Returns:
        The object key, checked by :func:`check_object_key`.

    Raises:
        JourneyValidationError: The template is refused, a field has no value, or the
            rendered key is refused.

    Example:
        ```python
        from prefect_journey.storage import render_key

        key = render_key(
            "{campaign}/{index:04d}-{slug}.{ext}",
            {"campaign": "spring", "index": 7, "slug": "a-cat", "ext": "png"},
        )
        assert key == "spring/0007-a-cat.png"
        ```
    """
    missing = [name for name in check_key_template(template) if name not in fields]
    if missing:
        raise JourneyValidationError(f"key template {template!r} needs {', '.join(missing)}")
    return check_object_key(template.format_map(fields))


def slugify(text: str, max_length: int = 60) -> str:
    """A lowercase ASCII slug safe in any object key (``a-cat-in-a-hat``).

    Args:
        text: Free text, such as a prompt.
        max_length: The most characters to keep; 60 by default.

    Returns:
        Runs of anything other than ASCII letters and digits become one ``-``, with none
        at either end; ``"image"`` when nothing is left.

    Example:
        ```python
        from prefect_journey.storage import slugify

        assert slugify("A Cat in a Hat!") == "a-cat-in-a-hat"
        assert slugify("???") == "image"
        ```
    """
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "image"


class _Regrouper:
    """Regroups the pieces the socket gives into :data:`DOWNLOAD_CHUNK` chunks, and ends the
    download past its deadline. The deadline is checked as each piece arrives, so a trickle
    is cut off at its next byte; a silent connection ends at the read timeout first."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._ends = time.monotonic() + deadline
        self._buffer = bytearray()
        self._received = 0

    def add(self, piece: bytes) -> bytes | None:
        """Take ``piece``; return a whole chunk when one is ready."""
        self._received += len(piece)
        if time.monotonic() > self._ends:
            raise DownloadTimeoutError(
                f"image download passed its {self._deadline:g} s deadline after "
                f"{self._received} bytes "
                f"(slower than {policy.MIN_DOWNLOAD_BYTES_PER_SECOND} bytes/s)"
            )
        self._buffer += piece
        return self.rest() if len(self._buffer) >= DOWNLOAD_CHUNK else None

    def rest(self) -> bytes | None:
        """The bytes taken and not yet returned, if any."""
        if not self._buffer:
            return None
        chunk = bytes(self._buffer)
        self._buffer.clear()
        return chunk


def _check_download_url(request: httpx.Request) -> None:
    try:
        check_http_url(str(request.url), what="image URL", https_only_remote=True)
    except ValueError as exc:
        raise DownloadRefusedError(f"refusing to download: {exc}") from None


def _hop_check(request: httpx.Request) -> None:
    _check_download_url(request)


async def _async_hop_check(request: httpx.Request) -> None:
    _check_download_url(request)


def download_client(
    transport: httpx.BaseTransport | None = None, *, rules: AddressRules | None = None
) -> httpx.Client:
    """An HTTP client for CDN downloads: no credentials, checked redirects and addresses.

    The API key is never sent to the CDN: this client has no ``Authorization`` header. It
    follows at most :data:`MAX_REDIRECTS` redirects, and every hop must be http(s), https
    unless the host is loopback, and must connect where the address rules allow
    (:mod:`prefect_journey.address_rules`); a refused hop raises
    :class:`~prefect_journey.errors.DownloadRefusedError` (not retryable).

    Args:
        transport: An httpx transport that is trusted with the connections (tests); None
            (the default) connects through a
            :class:`~prefect_journey.address_rules.CheckedTransport`.
        rules: The address rules of that transport; None reads them from the environment.

    Returns:
        A new client with :data:`DOWNLOAD_TIMEOUT`; the caller closes it.

    Raises:
        ConfigurationError: A variable of the address rules is malformed.
    """
    return httpx.Client(
        transport=transport or CheckedTransport(rules, verify=shared_ssl_context()),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=DOWNLOAD_TIMEOUT,
        verify=shared_ssl_context(),
        event_hooks={"request": [_hop_check]},
    )


def async_download_client(
    transport: httpx.AsyncBaseTransport | None = None,
    max_connections: int = 100,
    *,
    rules: AddressRules | None = None,
) -> httpx.AsyncClient:
    """Async twin of :func:`download_client`: no credentials, checked redirects and addresses.

    Args:
        transport: An httpx async transport that is trusted with the connections (tests);
            None (the default) connects through an
            :class:`~prefect_journey.address_rules.AsyncCheckedTransport`.
        max_connections: The size of the connection pool; 100 by default. One client
            shared by many concurrent downloads needs at least their number: past it a
            download waits for a connection, and fails after the pool timeout (30 s).
        rules: The address rules of that transport; None reads them from the environment.

    Returns:
        A new client with :data:`DOWNLOAD_TIMEOUT`; the caller closes it.

    Raises:
        ConfigurationError: A variable of the address rules is malformed.
    """
    limits = httpx.Limits(max_connections=max_connections)
    return httpx.AsyncClient(
        transport=transport
        or AsyncCheckedTransport(rules, verify=shared_ssl_context(), limits=limits),
        limits=limits,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=DOWNLOAD_TIMEOUT,
        verify=shared_ssl_context(),
        event_hooks={"request": [_async_hop_check]},
    )


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def _record(origin: str, task_id: str, image: StoredImage | None) -> dict[str, str]:
    """An object's record under its names: what made it and, once known, what it is.

    Values are percent-encoded, as S3 metadata travels in HTTP headers (ASCII only).
    """
    fields = {"origin": origin, "task-id": task_id}
    if image is not None:
        fields |= {
            "sha256": image.sha256,
            "bytes": str(image.bytes),
            "format": image.format,
            "width": str(image.width),
            "height": str(image.height),
        }
    return {RECORD_PREFIX + name: quote(value, safe="") for name, value in fields.items()}


def _write_local_record(path: str, record: Mapping[str, str]) -> None:
    """Set ``record`` as extended attributes of ``path``; skipped where the folder's
    filesystem keeps none (the object is then stored without a record)."""
    if not _CAN_RECORD_LOCALLY:
        return
    try:
        for name, value in record.items():
            os.setxattr(path, _XATTR_NAMESPACE + name, value.encode())
    except OSError as exc:
        logger.debug("%s: no record kept (%s)", path, exc)


def _read_record(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, str]:
    """The record on the object at ``path`` by field name (``origin``, ``sha256``, ...);
    empty when it has none. Raises FileNotFoundError when no object is there."""
    if isinstance(fs, LocalFileSystem):
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        try:
            raw = {
                name.removeprefix(_XATTR_NAMESPACE): os.getxattr(path, name).decode()
                for name in os.listxattr(path)
            }
        except (AttributeError, OSError, UnicodeDecodeError):  # no extended attributes here
            return {}
    elif _protocols(fs) & METADATA_PROTOCOLS:
        raw = fs.metadata(path)
    elif fs.isfile(path):
        return {}
    else:
        raise FileNotFoundError(path)
    return {
        name.removeprefix(RECORD_PREFIX): unquote(value)
        for name, value in raw.items()
        if name.startswith(RECORD_PREFIX)
    }


def _recorded_image(record: Mapping[str, str], uri: str) -> StoredImage | None:
    """The image a whole record describes; None when the record lacks a field."""
    try:
        return StoredImage(
            uri=uri,
            sha256=record["sha256"],
            bytes=int(record["bytes"]),
            format=record["format"],
            width=int(record["width"]),
            height=int(record["height"]),
            task_id=record["task-id"],
            created=False,
        )
    except (KeyError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def _blocks(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[bytes]:
    """The object at ``path``, read in :data:`DOWNLOAD_CHUNK` pieces."""
    with fs.open(path, "rb", block_size=UPLOAD_PART_SIZE) as stored:
        while block := stored.read(DOWNLOAD_CHUNK):
            yield block


def _read_image(
    fs: fsspec.AbstractFileSystem, path: str, uri: str, task_id: str
) -> StoredImage | None:
    """The object at ``path`` described by reading it back; None if it is not a whole
    image."""
    verifier, digest = ImageVerifier(), hashlib.sha256()
    try:
        for block in _blocks(fs, path):
            verifier.feed(block)
            digest.update(block)
        info = verifier.finish()
    except ImageFormatError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from None
    return StoredImage(
        uri=uri,
        sha256=digest.hexdigest(),
        bytes=verifier.total,
        format=info.format,
        width=info.width,
        height=info.height,
        task_id=task_id,
        created=False,
    )


class _LocalAtomicFile:
    """A local file written beside its final name and published by one atomic link/rename.

    fsspec's local ``autocommit=False`` writes to the system temp folder and *moves* the file,
    which is a copy (not atomic) across devices, and its mode "xb" ignores ``autocommit``.
    Here the partial file is ``.<name>.<random>.part`` in the same folder, locked by this
    writer until it is published or discarded (see :mod:`prefect_journey.partials`, which
    also clears what dead writers left there first); ``commit`` fsyncs it (a published file
    must be whole after a crash) and uses ``os.link`` (fails if the name exists) or
    ``os.replace`` when overwriting. Writeback starts every :data:`LOCAL_WRITEBACK_BYTES`
    while the file grows, so that fsync has little left to do.
    """

    def __init__(self, path: str, *, overwrite: bool) -> None:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        self.path = path
        self.overwrite = overwrite
        self.temp, self._handle = partials.open_partial(folder, name)
        self._not_written_back = 0
        self._synced = False
        # Set on the file before it is published, so the object never appears without it.
        self.record: Mapping[str, str] = {}

    def write(self, data: bytes) -> int:
        written = self._handle.write(data)
        self._not_written_back += written
        if _CAN_START_WRITEBACK and self._not_written_back >= LOCAL_WRITEBACK_BYTES:
            self._handle.flush()
            # Linux starts writing back the dirty pages it is told are not needed, without
            # waiting for the disk, so a large image's commit does not wait for all of it
            # (BENCHMARKS.md measures the difference).
            os.posix_fadvise(self._handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self._not_written_back = 0
        return written

    def close(self) -> None:
        """Flush and fsync; the handle (and its lock) stays open until commit or discard."""
        if not self._synced:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._synced = True

    def commit(self) -> None:
        self.close()
        try:
            if self.record:
                _write_local_record(self.temp, self.record)
            if self.overwrite:
                os.replace(self.temp, self.path)
                return
            try:
                os.link(self.temp, self.path)
            finally:
                os.unlink(self.temp)
        finally:
            self._handle.close()  # releases the lock once the partial name is gone

    def discard(self) -> None:
        try:
            if os.path.exists(self.temp):
                os.unlink(self.temp)
        finally:
            self._handle.close()  # no fsync needed: these bytes are thrown away


class _ObjectWriter:
    """Receives a download chunk by chunk and commits it only when it is a whole image."""

    def __init__(
        self,
        destination: Destination,
        *,
        task_id: str,
        key_template: str,
        key_fields: Mapping[str, Any],
        max_bytes: int,
        overwrite: bool,
        origin: str | None,
    ) -> None:
        self.destination = destination
        self.origin = origin
        self.task_id = task_id
        self.key_template = key_template
        self.key_fields = {"task_id": task_id, **key_fields}
        self.max_bytes = max_bytes
        self.overwrite = overwrite
        self.verifier = ImageVerifier()
        self.sha256 = hashlib.sha256()
        self.fs, self.root = destination.filesystem()
        # Never shorter than this very store may take: a concurrent store of the same key
        # that began before it is alive for at least its download deadline and commit.
        self.lease_seconds = max(
            settings.partial_lease_seconds(),
            policy.download_deadline(max_bytes) + policy.STORE_TIMEOUT,
        )
        self.path: str | None = None
        self._file: Any = None
        self._head = b""
        self._existing = False

    def check_length(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise DownloadError(
                f"image download answered {response.status_code}",
                status_code=response.status_code,
            )
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise DownloadError(
                f"image is {declared} bytes, above the {self.max_bytes} cap", retryable=False
            )

    def write(self, chunk: bytes) -> None:
        if self.verifier.total + len(chunk) > self.max_bytes:
            raise DownloadError(f"image exceeds the {self.max_bytes}-byte cap", retryable=False)
        try:
            self.verifier.feed(chunk)
        except ImageFormatError as exc:
            raise DownloadError(f"image is not valid: {exc}") from None
        self.sha256.update(chunk)
        if self._file is None and not self._existing:
            self._head += chunk
            image_format = detect_format(self._head)
            if image_format is None:
                return  # fewer than 12 bytes so far
            self._open(image_format)
            chunk, self._head = self._head, b""
        if self._file is not None:
            self._file.write(chunk)

    def _open(self, image_format: str) -> None:
        ext = ImageInfo(image_format, 1, 1).extension  # type: ignore[arg-type]
        key = render_key(self.key_template, {**self.key_fields, "ext": ext})
        self.path = f"{self.root}/{key}" if self.root else key
        self._clear_leftovers()
        try:
            if not self.overwrite and self.fs.exists(self.path):
                self._existing = True
                return
            if isinstance(self.fs, LocalFileSystem):
                self._file = _LocalAtomicFile(self.path, overwrite=self.overwrite)
                return
            exclusive = not self.overwrite and _protocols(self.fs) & EXCLUSIVE_CREATE_PROTOCOLS
            # An upload in parts starts with its first part, before the image is known
            # whole: its record then names what made it, and finish() completes it for a
            # one-part upload.
            metadata: dict[str, Any] = {}
            if self.origin is not None and _protocols(self.fs) & METADATA_PROTOCOLS:
                metadata["Metadata"] = _record(self.origin, self.task_id, None)
            self._file = self.fs.open(
                self.path,
                "xb" if exclusive else "wb",
                autocommit=False,
                block_size=UPLOAD_PART_SIZE,
                **metadata,
            )
        except OSError as exc:
            raise StorageError(f"cannot write {self._uri()}: {exc}") from None

    def _clear_leftovers(self) -> None:
        """Remove what dead writers of this key left: partial files (and, in its folder,
        any older than the lease), or pending multipart uploads begun over a lease ago."""
        assert self.path is not None  # set by _open
        if isinstance(self.fs, LocalFileSystem):
            partials.clear_local(*os.path.split(self.path), self.lease_seconds)
        elif _protocols(self.fs) & partials.MULTIPART_PROTOCOLS:
            partials.abort_stale_uploads(self.fs, self.path, self.lease_seconds)

    def _uri(self) -> str:
        return str(self.fs.unstrip_protocol(self.path)) if self.path else self.destination.url

    def finish(self) -> StoredImage:
        try:
            info = self.verifier.finish()
        except ImageFormatError as exc:
            raise DownloadError(f"image is not valid: {exc}") from None
        image = StoredImage(
            uri=self._uri(),
            sha256=self.sha256.hexdigest(),
            bytes=self.verifier.total,
            format=info.format,
            width=info.width,
            height=info.height,
            task_id=self.task_id,
        )
        digest = image.sha256
        if self._file is not None:
            if self.origin is not None:
                self._set_record(_record(self.origin, self.task_id, image))
            try:
                self._file.close()
                self._file.commit()
            except FileExistsError:  # created by someone else while we streamed
                self._existing = True
                # s3fs leaves the multipart upload of a refused exclusive commit pending,
                # its parts stored (and billed) until someone aborts it.
                self.abort()
            except OSError as exc:
                # The store may have applied a commit whose answer was lost (a connection
                # cut, then retries refused): if the key holds this image, it is stored.
                if not self._holds(digest):
                    raise StorageError(f"cannot commit {self._uri()}: {exc}") from None
                logger.warning("%s: commit answered %s, but the object is stored", self._uri(), exc)
            self._file = None
        if self._existing:
            self._check_existing(digest)
            return image.model_copy(update={"created": False})
        return image

    def _set_record(self, record: dict[str, str]) -> None:
        """Attach ``record`` to the object before it is committed. An S3 upload sends it
        when it starts, at the close before the commit unless a first part started it."""
        if isinstance(self._file, _LocalAtomicFile):
            self._file.record = record
        elif _protocols(self.fs) & METADATA_PROTOCOLS:
            self._file.s3_additional_kwargs["Metadata"] = record

    def _check_existing(self, digest: str) -> None:
        assert self.path is not None  # set by _open, before anything exists or is written
        existing, size = hashlib.sha256(), 0
        for block in _blocks(self.fs, self.path):
            existing.update(block)
            size += len(block)
        if existing.hexdigest() != digest:
            raise ObjectConflictError(
                f"{self._uri()} already exists with different content ({size} bytes, sha256 "
                f"{existing.hexdigest()[:12]}; this image {self.verifier.total} bytes, "
                f"sha256 {digest[:12]}); refusing to overwrite (pass overwrite=True or change "
                "the key)"
            )

    def _holds(self, digest: str) -> bool:
        """Whether the object at the key is this image (read back and hashed)."""
        self.fs.invalidate_cache(self.path)  # s3fs may remember the key as missing
        try:
            self._check_existing(digest)
        except (OSError, ObjectConflictError):
            return False
        return True

    def abort(self) -> None:
        """Discard whatever was written; never raises (the original error matters)."""
        file, self._file = self._file, None
        if file is None:
            return
        for step in (file.close, file.discard):
            try:
                step()
            except Exception as exc:
                logger.warning("cleanup of %s: %s failed: %s", self._uri(), step.__name__, exc)


class _WriteBehind:
    """Feeds an :class:`_ObjectWriter` from its own thread, one chunk behind the download.

    hashlib, zlib and file and socket I/O release the GIL, so the sha256, the PNG CRCs and
    the store's writes overlap with the next socket read instead of following it. The first
    chunk is written inline and the thread starts with the second, so an image of one chunk
    (most 1K images) pays for no thread and no hand-off. The first error the writer raises
    stops the writing, is raised to the downloading thread at its next :meth:`put` or at
    :meth:`close`, and the rest of the queue is drained unwritten.
    """

    def __init__(self, writer: _ObjectWriter) -> None:
        self._writer = writer
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=WRITE_BEHIND_DEPTH)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._first = True

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write(chunk)
                except BaseException as exc:  # handed to the downloading thread
                    self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, chunk: bytes) -> None:
        if self._first:
            self._first = False
            self._writer.write(chunk)
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="journey-write-behind", daemon=True
            )
            self._thread.start()
        self._raise_error()
        self._chunks.put(chunk)

    def close(self, *, raise_error: bool = True) -> None:
        """Wait until every chunk is written; raise the writer's error, if any and asked.
        Before an abort it is not asked: that error already ended the transfer, or another
        one did, which is the one to report."""
        if self._thread is not None and self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()
        if raise_error:
            self._raise_error()


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
        if (chunk := chunks.rest()) is not None:
            pipe.put(chunk)
    except httpx.HTTPError as exc:
        _discard(pipe, writer)
        raise DownloadError(f"image download failed: {failure_text(exc)}") from None
    except BaseException:
        _discard(pipe, writer)
        raise
    else:
        return _complete(pipe, writer)
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
        if (chunk := chunks.rest()) is not None:
            await asyncio.to_thread(pipe.put, chunk)
    except httpx.HTTPError as exc:
        await asyncio.to_thread(_discard, pipe, writer)
        raise DownloadError(f"image download failed: {failure_text(exc)}") from None
    except BaseException:
        await asyncio.to_thread(_discard, pipe, writer)
        raise
    else:
        return await asyncio.to_thread(_complete, pipe, writer)
    finally:
        if http is None:
            await client.aclose()


def _discard(pipe: _WriteBehind, writer: _ObjectWriter) -> None:
    """End a failed store: stop the writing, then discard what was written."""
    pipe.close(raise_error=False)
    writer.abort()


def _complete(pipe: _WriteBehind, writer: _ObjectWriter) -> StoredImage:
    """Write what is left, verify and commit; discard everything if that fails."""
    try:
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


def presign(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    expires_in: int = DEFAULT_PRESIGN_SECONDS,
) -> str:
    """An http(s) URL for ``url``: a time-limited presigned one for an object in a store.

    The flows use it for ``s3://`` references and for the image artifacts of objects in a
    bucket.

    Args:
        url: An http(s) URL, which passes through unchanged, or the URL of an object in a
            store whose filesystem can ``sign`` (``s3://bucket/key``).
        storage_options: Options for the store's filesystem (credentials, endpoint); None
            for none.
        expires_in: How long the link stays valid, in seconds; 24 hours by default.

    Returns:
        The http(s) URL.

    Raises:
        StorageError: The store cannot presign URLs; not retryable.
    """
    if url.startswith(("http://", "https://")):
        return url
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    try:
        signed = fs.sign(path, expiration=expires_in)
    except NotImplementedError:
        raise StorageError(f"{url}: this store cannot presign URLs", retryable=False) from None
    return str(signed)
