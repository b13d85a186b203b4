"""Where images go: a :class:`Destination`, an fsspec URL and its filesystem's options.

A destination is checked before any credit is spent (:meth:`Destination.check`), tells what
a key holds from the object's record (:meth:`Destination.occupant`), and whether a stored
image is still there (:meth:`Destination.holds`).

This module does not import Prefect.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from prefect_journey.errors import JourneyValidationError, StorageError, failure_text
from prefect_journey.imageformat import EXTENSIONS
from prefect_journey.storage.keys import render_key
from prefect_journey.storage.records import (
    Occupant,
    StoredImage,
    _read_image,
    _read_record,
    _recorded_image,
)


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
