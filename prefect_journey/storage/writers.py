"""Writers: a download's chunks into an object, committed only once the image is whole.

:class:`_ObjectWriter` verifies, hashes and writes each chunk, names the object's extension
from the bytes, attaches the object's record, and commits with mode ``"xb"`` where the store
supports it; an object already at the key with the same bytes is success, with different
bytes a conflict. A local file is written beside its final name and published by one atomic
link or rename (:class:`_LocalAtomicFile`). :class:`_WriteBehind` feeds the writer from a
second thread, one chunk behind the download. The guarantees they keep are listed in
:mod:`prefect_journey.storage.store`.

This module does not import Prefect.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections.abc import Mapping
from typing import Any

import httpx
from fsspec.implementations.local import LocalFileSystem

from prefect_journey import partials, policy, settings
from prefect_journey.errors import DownloadError, ObjectConflictError, StorageError
from prefect_journey.imageformat import ImageFormatError, ImageInfo, ImageVerifier, detect_format
from prefect_journey.storage.destination import Destination
from prefect_journey.storage.keys import render_key
from prefect_journey.storage.records import (
    METADATA_PROTOCOLS,
    UPLOAD_PART_SIZE,
    StoredImage,
    _blocks,
    _protocols,
    _record,
    _write_local_record,
)

logger = logging.getLogger("prefect_journey.storage")

# Chunks waiting for the write-behind thread. One is enough to keep both threads busy; with
# the chunk being read and the one being written, three chunks at most are in memory.
WRITE_BEHIND_DEPTH = 1
# A local file's writeback is started every this many bytes while it is written, so the
# fsync before it is published waits for little (the kernel would otherwise hold it all).
LOCAL_WRITEBACK_BYTES = 16 * 1024 * 1024
_CAN_START_WRITEBACK = hasattr(os, "posix_fadvise")  # not on macOS or Windows
# Stores whose ``autocommit=False`` files honour mode "xb" at commit (s3fs sends
# If-None-Match), closing the race between our existence check and the commit. Elsewhere
# a concurrent writer of the same key wins last; both write the same verified bytes.
EXCLUSIVE_CREATE_PROTOCOLS = frozenset({"s3", "s3a"})


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
            self._close_if_unlocked()
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
        self._close_if_unlocked()
        try:
            if os.path.exists(self.temp):
                os.unlink(self.temp)
        finally:
            self._handle.close()  # no fsync needed: these bytes are thrown away

    def _close_if_unlocked(self) -> None:
        """Close the partial file before it is renamed or deleted where it is not locked:
        Windows renames and deletes no open file, this writer's own included."""
        if not partials.LOCKED:
            self._handle.close()


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
