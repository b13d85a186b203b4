"""Where stored images go, as users express it: a URL, a saved block, or a Prefect block
they already have (``RemoteFileSystem``, ``LocalFileSystem``, prefect-aws ``S3Bucket``).

Every form resolves to a plain :class:`~prefect_journey.storage.Destination`: an fsspec URL
plus storage options. None of the other blocks is required.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import Field, HttpUrl

from prefect_journey import settings
from prefect_journey._compat import call_sync
from prefect_journey.credentials import DOCUMENTATION_URL, LOGO_URL
from prefect_journey.errors import JourneyValidationError
from prefect_journey.storage import Destination


class ImageDestination(Block):
    """An object-storage location for generated images: any fsspec URL and its options.

    Storage options may hold credentials; they are kept as a secret dictionary.

    Attributes:
        url: An fsspec URL such as ``s3://bucket/prefix``, or a local folder.
        storage_options: Options for the filesystem, such as ``endpoint_url``, ``key`` and
            ``secret``; empty by default.

    Example:
        Store images under a saved destination:
        ```python
        from prefect_journey import ImageDestination

        destination = ImageDestination.load("BLOCK_NAME")
        print(destination.url)
        ```
    """

    _block_type_name = "JourneyAPI Image Destination"
    # The card in the UI shows about two lines: one sentence, not the docstring.
    _description = "Where images are stored: an fsspec URL (s3://, a folder) and its options."
    _block_type_slug = "journeyapi-image-destination"
    _logo_url = HttpUrl(LOGO_URL)
    _documentation_url = HttpUrl(DOCUMENTATION_URL)

    url: str = Field(
        default=...,
        description="An fsspec URL such as s3://bucket/prefix or a local folder.",
    )
    storage_options: SecretDict = Field(
        default_factory=lambda: SecretDict({}),
        description="Options for the filesystem, such as endpoint_url, key and secret.",
    )

    def as_destination(self) -> Destination:
        """The plain :class:`~prefect_journey.storage.Destination` this block describes.

        Returns:
            The destination, with the storage options revealed for the filesystem.
        """
        return Destination(self.url, dict(self.storage_options.get_secret_value()))


def load_destination(url: str | None = None, block_name: str | None = None) -> Destination:
    """Where a flow stores its images, checked reachable so a bad one fails before any credit
    is spent.

    Args:
        url: An fsspec URL or folder, used when no block is named.
        block_name: A saved ``ImageDestination`` block, which wins over ``url``.

    Returns:
        The block's destination, else ``url``, else ``JOURNEY_DESTINATION``, else
        ``./outputs``.

    Raises:
        StorageError: The destination cannot be reached or written.
        JourneyValidationError: The URL is unusable.
    """
    if block_name:
        block = cast(ImageDestination, call_sync(ImageDestination.load, block_name))
        destination = block.as_destination()
    else:
        destination = resolve_destination(url or settings.destination())
    destination.check()
    return destination


def resolve_destination(
    destination: Any, storage_options: Mapping[str, Any] | None = None
) -> Destination:
    """Turn a URL, a :class:`Destination` or a supported block into a :class:`Destination`.

    The blocks are read duck-typed, so none of their collections is required: an
    :class:`ImageDestination`; Prefect's ``RemoteFileSystem`` and ``LocalFileSystem`` (their
    ``basepath`` and ``settings``); a prefect-aws ``S3Bucket`` (its bucket and folder, and
    from its ``AwsCredentials`` the access key, secret, session token and endpoint URL).
    Nothing is contacted; :meth:`Destination.check` does that.

    Args:
        destination: An fsspec URL or folder, a :class:`Destination` (returned as it is),
            or one of the blocks above.
        storage_options: Options for a plain URL's filesystem; None for none. Ignored for
            the other forms: blocks carry their own.

    Returns:
        The destination.

    Raises:
        JourneyValidationError: ``destination`` is of an unsupported type, or an empty URL.

    Example:
        ```python
        from prefect.filesystems import LocalFileSystem

        from prefect_journey.destinations import resolve_destination

        destination = resolve_destination(LocalFileSystem(basepath="./outputs"))
        minio = resolve_destination("s3://images", {"endpoint_url": "http://localhost:9000"})
        print(destination.url, minio.endpoint)
        ```
    """
    if isinstance(destination, Destination):
        return destination
    if isinstance(destination, str):
        return Destination(destination, dict(storage_options or {}))
    if isinstance(destination, ImageDestination):
        return destination.as_destination()
    basepath = getattr(destination, "basepath", None)
    if isinstance(destination, Block) and isinstance(basepath, str):
        # prefect.filesystems.RemoteFileSystem / LocalFileSystem
        options = getattr(destination, "settings", None) or {}
        if hasattr(options, "get_secret_value"):
            options = options.get_secret_value()
        return Destination(basepath, dict(options))
    bucket_name = getattr(destination, "bucket_name", None)
    if isinstance(destination, Block) and isinstance(bucket_name, str):
        return _from_s3_bucket(destination, bucket_name)
    raise JourneyValidationError(
        f"unsupported destination {type(destination).__name__}: pass an fsspec URL, an "
        "ImageDestination, a RemoteFileSystem/LocalFileSystem block or an S3Bucket block"
    )


def _from_s3_bucket(block: Any, bucket_name: str) -> Destination:
    """prefect-aws ``S3Bucket``: bucket, folder and ``AwsCredentials``, read duck-typed."""
    folder = str(getattr(block, "bucket_folder", "") or "").strip("/")
    url = f"s3://{bucket_name}/{folder}" if folder else f"s3://{bucket_name}"
    options: dict[str, Any] = {}
    credentials = getattr(block, "credentials", None)
    if credentials is not None:
        key_id = getattr(credentials, "aws_access_key_id", None)
        secret = getattr(credentials, "aws_secret_access_key", None)
        token = getattr(credentials, "aws_session_token", None)
        if key_id:
            options["key"] = key_id
        if secret is not None:
            options["secret"] = secret.get_secret_value()
        if token:
            options["token"] = token
        client_parameters = getattr(credentials, "aws_client_parameters", None)
        endpoint = getattr(client_parameters, "endpoint_url", None)
        if endpoint:
            options["endpoint_url"] = str(endpoint)
    return Destination(url, options)
