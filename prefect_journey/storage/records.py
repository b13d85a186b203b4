"""Object records: what an object at a key is, and what made it.

A stored image is described by a :class:`StoredImage`. Given an ``origin`` (the cache key of
the request that made the image), the object carries a record of what made it and what it
is, committed with it: S3 user metadata, or extended attributes on a local file (see
:data:`RECORD_PREFIX`). Read back, the record tells a later run what a key holds
(:class:`Occupant`) before it pays for an image; where the record lacks the description (an
S3 upload in parts begins before the last byte is known), the object is read back and
hashed.

This module does not import Prefect.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from prefect_journey.errors import StorageError
from prefect_journey.imageformat import ImageFormatError, ImageVerifier
from prefect_journey.storage.downloads import DOWNLOAD_CHUNK

logger = logging.getLogger("prefect_journey.storage")

# S3's minimum multipart part: s3fs holds one part in memory before uploading it, and one
# block of this size while an object is read back.
UPLOAD_PART_SIZE = 5 * 1024 * 1024
# Stores whose objects carry user metadata (S3's ``x-amz-meta-*``), which holds an object's
# record. A local file keeps it in extended attributes; other stores keep no record.
METADATA_PROTOCOLS = frozenset({"s3", "s3a"})
# The names of an object's record: S3 metadata keys, and after ``user.`` extended attribute
# names (``journey-origin``, ``journey-task-id``, ``journey-sha256``, ...). A record lives on
# the object itself, never beside it, so a folder or bucket holds exactly its images.
RECORD_PREFIX = "journey-"
_XATTR_NAMESPACE = "user."
_CAN_RECORD_LOCALLY = hasattr(os, "setxattr")  # Linux; not macOS or Windows


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
