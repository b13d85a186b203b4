"""Unfinished writes: how a store holds its own, and how a later store clears a dead one's.

A store that dies mid-write (SIGKILL, a lost machine) leaves what it had begun: a hidden
``.<name>.<hex>.part`` file beside a local key, or a pending multipart upload on S3, whose
parts are billed storage until it is aborted. The next store of a key removes the leftovers
of that key; a store into a local folder also removes any partial file there older than the
lease (``JOURNEY_PARTIAL_LEASE_SECONDS``), whichever key it was for.

Nothing a live writer owns is removed:

- A local partial file is locked (``flock``, through :func:`filelock.lock_descriptor`) by
  its writer from its creation until it is published or discarded. The kernel drops a dead
  process's locks, so a partial file whose lock can be taken has no live writer. On Windows
  no lock is needed: a file open in any process cannot be deleted, so the removal of a live
  writer's file fails harmlessly. On a filesystem that refuses locks, no partial file is
  removed.
- S3 shows no owner of an upload, only when it began: one begun less than a lease ago may be
  another run's, storing the same image right now, and is left alone.

This module does not import Prefect.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from filelock import lock_descriptor

logger = logging.getLogger("prefect_journey.storage")

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.part$")
# Stores whose unfinished writes are multipart uploads, listed and aborted by key.
MULTIPART_PROTOCOLS = frozenset({"s3", "s3a"})
# Whether a writer locks its partial file: elsewhere than on Windows an open file can be
# deleted, and the lock is what tells a cleaner that its writer lives.
LOCKED = sys.platform != "win32"


def open_partial(folder: str, name: str) -> tuple[str, BinaryIO]:
    """Create and lock a new partial file for ``name`` in ``folder``.

    Args:
        folder: The key's folder (it exists).
        name: The key's file name.

    Returns:
        The partial file's path and its handle, open for writing and locked until closed.
    """
    while True:
        path = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.part")
        handle = open(path, "xb")  # noqa: SIM115 - the caller closes it
        if not LOCKED:
            return path, handle
        try:
            lock_descriptor(handle.fileno())  # waits out a cleaner's look at it
        except OSError:  # a filesystem without locks: no cleaner can lock it either
            return path, handle
        # Removed as a dead writer's between its creation and the lock: start again.
        if os.fstat(handle.fileno()).st_nlink > 0:
            return path, handle
        handle.close()


def clear_local(folder: str, name: str, lease_seconds: float) -> None:
    """Remove the dead writers' partial files of ``name``, and any older than the lease.

    Never raises: a leftover that cannot be removed now is removed by a later store.

    Args:
        folder: The key's folder.
        name: The key's file name.
        lease_seconds: The age past which another key's partial file is removed too.
    """
    stale_before = datetime.now(UTC).timestamp() - lease_seconds
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # no folder yet: nothing left in it
    for entry in entries:
        found = _PARTIAL.match(entry.name)
        if not found:
            continue
        try:
            if found["name"] != name and entry.stat().st_mtime > stale_before:
                continue
            if _remove_unowned(entry.path):
                logger.info("removed %s, left by a store that did not finish", entry.path)
        except OSError as exc:  # gone meanwhile, or held
            logger.debug("%s left in place: %s", entry.path, exc)


def _remove_unowned(path: str) -> bool:
    """Remove the partial file at ``path`` if no live process holds it.

    The file is unlinked while this process holds its lock: a writer that opens it in the
    meantime takes the lock only after the unlink, and sees the file is gone (its link
    count) before writing into it.

    Returns:
        Whether it was removed.
    """
    if not LOCKED:
        os.unlink(path)  # fails if a process has it open
        return True
    # Read-write: NFS emulates flock with a write lock, which a read-only handle cannot take.
    descriptor = os.open(path, os.O_RDWR)
    try:
        try:
            if not lock_descriptor(descriptor, blocking=False):
                return False  # held by its live writer
        except OSError:  # a filesystem without locks: leave it
            return False
        os.unlink(path)
        return True
    finally:
        os.close(descriptor)


def abort_stale_uploads(fs: Any, path: str, lease_seconds: float) -> None:
    """Abort the pending multipart uploads of the key at ``path`` begun over a lease ago.

    Never raises: a store goes on without the housekeeping (a warning says why, such as a
    policy without ``s3:ListBucketMultipartUploads``).

    Args:
        fs: The s3fs filesystem.
        path: ``bucket/key``.
        lease_seconds: The age past which an upload is taken for a dead writer's.
    """
    bucket, key, _ = fs.split_path(path)
    stale_before = datetime.now(UTC) - timedelta(seconds=lease_seconds)
    try:
        # One page (1,000 uploads) is plenty for one key; the next store sees any more.
        listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for upload_id in stale_uploads(listing.get("Uploads", []), key, stale_before):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            logger.info("aborted an upload of %s left by a store that did not finish", path)
    except Exception as exc:  # housekeeping: the store itself can still succeed
        logger.warning("cannot clear unfinished uploads of %s: %s", path, exc)


def stale_uploads(
    uploads: Iterable[Mapping[str, Any]], key: str, stale_before: datetime
) -> list[str]:
    """The ids of the uploads of exactly ``key`` begun before ``stale_before``.

    Args:
        uploads: ``ListMultipartUploads``' ``Uploads`` for a prefix (which also lists longer
            keys that start with ``key``).
        key: The object key.
        stale_before: The moment before which an upload is taken for a dead writer's.

    Returns:
        The ``UploadId`` of each such upload.
    """
    return [
        upload["UploadId"]
        for upload in uploads
        if upload["Key"] == key and upload["Initiated"] < stale_before
    ]
