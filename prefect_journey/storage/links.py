"""Links to stored objects: time-limited presigned http(s) URLs, for artifacts and references.

This module does not import Prefect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec

from prefect_journey.errors import StorageError

# Presigned links for artifacts and references: long enough for a run and a look in the UI.
DEFAULT_PRESIGN_SECONDS = 24 * 3600


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
