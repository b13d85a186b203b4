"""Thumbnails of stored objects, carried inside what shows them (a ``data:`` URI).

A link to an object expires (a presigned URL in hours or days, the provider's CDN URL in 14
days) and a local file has no link a browser may open; a thumbnail in the artifact itself
still shows a month later, on a Prefect server without internet, and points at nothing.

This module does not import Prefect.
"""

from __future__ import annotations

import base64
import io
import logging

import fsspec

from prefect_journey.storage.destination import Destination
from prefect_journey.storage.records import StoredImage

logger = logging.getLogger("prefect_journey.storage")

# The longest side of a thumbnail, in pixels: a card in the UI, about 6 KB as JPEG.
THUMBNAIL_SIDE = 256
JPEG_QUALITY = 70
# An object above this is not read back for its thumbnail: the artifact links to it instead.
THUMBNAIL_SOURCE_MAX_BYTES = 32 * 1024 * 1024


def thumbnail_uri(data: bytes, side: int = THUMBNAIL_SIDE) -> str:
    """A small JPEG of an image, as a ``data:`` URI a browser shows without a request.

    Args:
        data: A whole PNG, JPEG or WebP image.
        side: The thumbnail's longest side, in pixels; the aspect ratio is kept.

    Returns:
        ``data:image/jpeg;base64,...``.

    Raises:
        OSError: The bytes are not an image Pillow can read.

    Example:
        ```python
        import io

        from PIL import Image

        from prefect_journey.storage.thumbnails import thumbnail_uri

        png = io.BytesIO()
        Image.new("RGB", (1024, 768), "teal").save(png, "PNG")
        print(thumbnail_uri(png.getvalue())[:30])
        ```
    """
    # Imported here: Pillow takes longer to import than the rest of a task's imports, and
    # only a run that stores an image needs it.
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))  # a JPEG decodes at a fraction of its size
        small = image.convert("RGB")
        small.thumbnail((side, side))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def read_thumbnail(stored: StoredImage, destination: Destination) -> str | None:
    """The thumbnail of a stored object, read back from its destination.

    Args:
        stored: The object.
        destination: Where it is (its storage options read it).

    Returns:
        Its :func:`thumbnail_uri`; None when the object is larger than
        :data:`THUMBNAIL_SOURCE_MAX_BYTES` or cannot be read back (a thumbnail is never
        worth failing an image for: what shows it links to the object instead).
    """
    if stored.bytes > THUMBNAIL_SOURCE_MAX_BYTES:
        return None
    try:
        fs, path = fsspec.core.url_to_fs(stored.uri, **dict(destination.storage_options))
        return thumbnail_uri(fs.cat_file(path))
    except Exception as exc:  # any store, any failure: the artifact keeps its link
        logger.debug("no thumbnail of %s: %r", stored.uri, exc)
        return None
