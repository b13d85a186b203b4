"""Store generated images in any fsspec destination, verified or not at all.

The package's modules, each importing only those listed before it (``keys`` and
``downloads`` import none of them; ``links`` stands alone):

- :mod:`~prefect_journey.storage.keys`: object keys: the template an image's key is
  rendered from (:func:`render_key`, :data:`DEFAULT_KEY_TEMPLATE`, :func:`slugify`) and the
  checks every key passes (:func:`check_object_key`, :func:`check_key_template`).
- :mod:`~prefect_journey.storage.downloads`: download clients for the CDN: no credentials,
  checked redirects and addresses, a size cap and a deadline (:func:`download_client`,
  :func:`async_download_client`).
- :mod:`~prefect_journey.storage.records`: what an object at a key is (:class:`StoredImage`)
  and the record of what made it, kept on the object itself (:class:`Occupant`).
- :mod:`~prefect_journey.storage.destination`: where images go (:class:`Destination`):
  checked before any credit is spent; what a key holds.
- :mod:`~prefect_journey.storage.writers`: a download's chunks into an object, committed
  only once the image is whole.
- :mod:`~prefect_journey.storage.store`: :func:`store_image` and :func:`astore_image`, the
  whole store, and the list of its guarantees.
- :mod:`~prefect_journey.storage.links`: time-limited links to stored objects
  (:func:`presign`).
- :mod:`~prefect_journey.storage.thumbnails`: a stored object's thumbnail as a ``data:``
  URI, for what shows it after its links expire.

The names below are the package's public surface; everything else stays in its module.
No module of the package imports Prefect.
"""

from prefect_journey.storage.destination import Destination
from prefect_journey.storage.downloads import (
    DEFAULT_MAX_BYTES,
    DOWNLOAD_CHUNK,
    async_download_client,
    download_client,
)
from prefect_journey.storage.keys import (
    DEFAULT_KEY_TEMPLATE,
    check_key_template,
    check_object_key,
    render_key,
    slugify,
)
from prefect_journey.storage.links import DEFAULT_PRESIGN_SECONDS, presign
from prefect_journey.storage.records import UPLOAD_PART_SIZE, Occupant, StoredImage
from prefect_journey.storage.store import astore_image, store_image

__all__ = [
    "DEFAULT_KEY_TEMPLATE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PRESIGN_SECONDS",
    "DOWNLOAD_CHUNK",
    "UPLOAD_PART_SIZE",
    "Destination",
    "Occupant",
    "StoredImage",
    "astore_image",
    "async_download_client",
    "check_key_template",
    "check_object_key",
    "download_client",
    "presign",
    "render_key",
    "slugify",
    "store_image",
]
