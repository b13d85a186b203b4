"""Where stored images go, as users express it: a URL, a saved block, or a Prefect block
they already have (``RemoteFileSystem``, ``LocalFileSystem``, prefect-aws ``S3Bucket``,
prefect-gcp ``GcsBucket``, prefect-azure ``AzureBlobStorageContainer``).

Every form resolves to a plain :class:`~prefect_journey.storage.Destination`: an fsspec URL
plus storage options. None of the other blocks' collections is required.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from fsspec.utils import get_protocol
from prefect.blocks.core import Block, UnknownBlockType
from prefect.types import SecretDict
from pydantic import Field, HttpUrl

from prefect_journey import settings
from prefect_journey._compat import call_sync
from prefect_journey.credentials import DOCUMENTATION_URL, LOGO_URL
from prefect_journey.errors import JourneyValidationError
from prefect_journey.storage import Destination

# The storage block types of Prefect's collections, and the package each comes in.
_COLLECTIONS = {
    "s3-bucket": "prefect-aws",
    "gcs-bucket": "prefect-gcp",
    "azure-blob-storage-container": "prefect-azure[blob_storage]",
}


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
    _logo_url = LOGO_URL
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


def load_block(name: str) -> Block:
    """The saved block called ``name``: a plain name is an :class:`ImageDestination`, a
    ``"<block-type-slug>/<name>"`` (Prefect's block document slug) a block of that type.

    The type is looked up in this process before the server is asked, so a block whose
    collection is not installed fails at once, naming the package to install.

    Args:
        name: ``"journey-images"``, ``"s3-bucket/brand-assets"``,
            ``"gcs-bucket/assets"``, ``"remote-file-system/shared"``, ...

    Returns:
        The block, of the type its slug names.

    Raises:
        JourneyValidationError: ``name`` is malformed, or its block type is not installed
            here.
        ValueError: No block of that name (Prefect's error).

    Example:
        ```python
        from prefect_journey.destinations import load_block, resolve_destination

        bucket = load_block("s3-bucket/brand-assets")  # a prefect-aws S3Bucket
        print(resolve_destination(bucket).url)
        ```
    """
    if "/" not in name:
        return cast(ImageDestination, call_sync(ImageDestination.load, name))
    slug, _, document = name.partition("/")
    if not slug or not document:
        raise JourneyValidationError(
            f"block {name!r}: expected '<block-type-slug>/<name>', such as s3-bucket/images"
        )
    try:
        block_class = Block.get_block_class_from_key(slug)
    except UnknownBlockType:
        package = _COLLECTIONS.get(slug)
        install = f"`pip install {package}`" if package else "install its collection"
        raise JourneyValidationError(
            f"block {name!r}: the block type {slug!r} is not installed here; {install}"
        ) from None
    return cast(Block, call_sync(block_class.load, document))


def load_destination(url: str | None = None, block_name: str | None = None) -> Destination:
    """Where a flow stores its images, checked reachable so a bad one fails before any credit
    is spent.

    Args:
        url: An fsspec URL or folder, used when no block is named.
        block_name: A saved block, which wins over ``url``: a plain name is an
            ``ImageDestination``, ``"<block-type-slug>/<name>"`` any block
            :func:`resolve_destination` accepts (``s3-bucket/brand-assets``).

    Returns:
        The block's destination, else ``url``, else ``JOURNEY_DESTINATION``, else
        ``./outputs``.

    Raises:
        StorageError: The destination cannot be reached or written.
        JourneyValidationError: The URL is unusable, or the block is not a supported
            destination or its type is not installed.
        ValueError: No block of that name (Prefect's error).
    """
    destination = resolve_destination(
        load_block(block_name) if block_name else url or settings.destination()
    )
    destination.check()
    return destination


def source_storage_options(
    source: str, destination: Destination, source_block: str | None = None
) -> dict[str, Any]:
    """The storage options that read a campaign sheet at ``source``.

    The named ``source_block``'s, else the destination's when the sheet is on the same kind
    of store (both ``s3://``, both ``gs://``, ...), else none: the filesystem's ambient
    credentials (environment, profile, instance role).

    Args:
        source: The sheet's URL or path.
        destination: Where the campaign stores its images.
        source_block: A saved block, named as for :func:`load_block`, whose credentials
            read the sheet; None for the rule above.

    Returns:
        The options, to hand to the sheet's filesystem.

    Raises:
        JourneyValidationError: ``source_block`` is not a supported destination block, its
            type is not installed, or it is for another kind of store than the sheet.
        ValueError: No block of that name (Prefect's error).

    Example:
        ```python
        from prefect_journey.destinations import source_storage_options
        from prefect_journey.storage import Destination

        minio = Destination("s3://images", {"endpoint_url": "http://localhost:9000"})
        print(source_storage_options("s3://sheets/spring.csv", minio))  # the endpoint
        print(source_storage_options("./spring.csv", minio))  # {}
        ```
    """
    protocol = _protocol(source)
    if source_block:
        reader = resolve_destination(load_block(source_block))
        if _protocol(reader.url) != protocol:
            raise JourneyValidationError(
                f"source_block {source_block!r} is for {_protocol(reader.url)}://, "
                f"the campaign file is {protocol}://"
            )
        return dict(reader.storage_options)
    if _protocol(destination.url) == protocol:
        return dict(destination.storage_options)
    return {}


# Other names fsspec gives the same stores.
_PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "local": "file"}


def _protocol(url: str) -> str:
    protocol = str(get_protocol(url))
    return _PROTOCOL_ALIASES.get(protocol, protocol)


def resolve_destination(
    destination: Any, storage_options: Mapping[str, Any] | None = None
) -> Destination:
    """Turn a URL, a :class:`Destination` or a supported block into a :class:`Destination`.

    The blocks are read duck-typed, so none of their collections is required:

    - an :class:`ImageDestination`;
    - a prefect-aws ``S3Bucket``: ``s3://<bucket_name>/<bucket_folder>``, with from its
      ``AwsCredentials`` the access key, secret, session token, profile, region, endpoint
      URL and certificate check (or from its ``MinIOCredentials`` the root user and
      password, region and endpoint);
    - a prefect-gcp ``GcsBucket``: ``gs://<bucket>/<bucket_folder>``, with from its
      ``GcpCredentials`` the service account info or file as gcsfs's ``token``, and the
      ``project`` (neither: Google's default credentials);
    - a prefect-azure ``AzureBlobStorageContainer``: ``az://<container_name>/<base_folder>``,
      with from its ``AzureBlobStorageCredentials`` the connection string, else the
      account URL's account (with the service principal when given, else Azure's default
      credentials);
    - Prefect's ``RemoteFileSystem`` and ``LocalFileSystem``: their ``basepath`` and
      ``settings``.

    The Google and Azure URLs need gcsfs and adlfs installed. Nothing is contacted;
    :meth:`Destination.check` does that.

    Args:
        destination: An fsspec URL or folder, a :class:`Destination` (returned as it is),
            or one of the blocks above.
        storage_options: Options for a plain URL's filesystem; None for none. Ignored for
            the other forms: blocks carry their own.

    Returns:
        The destination, with the block's secrets revealed for its filesystem.

    Raises:
        JourneyValidationError: ``destination`` is of an unsupported type, an empty URL, or
            a block whose credentials cannot be handed to fsspec (an ``S3Bucket`` that
            assumes a role, an Azure account URL that names no account).

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
    if isinstance(destination, Block):
        # The bucket blocks come first: S3Bucket and GcsBucket also have a ``basepath``
        # (their folder, for deployments), which is not a URL.
        for field, reader in _BUCKET_READERS:
            name = getattr(destination, field, None)
            if isinstance(name, str):
                return reader(destination, name)
        basepath = getattr(destination, "basepath", None)
        if isinstance(basepath, str):  # RemoteFileSystem / LocalFileSystem
            options = _revealed(getattr(destination, "settings", None))
            return Destination(basepath, dict(options or {}))
    raise JourneyValidationError(
        f"unsupported destination {type(destination).__name__}: pass an fsspec URL, an "
        "ImageDestination, a RemoteFileSystem/LocalFileSystem block or an S3Bucket, "
        "GcsBucket or AzureBlobStorageContainer block"
    )


def _revealed(value: Any) -> Any:
    """A secret field's value (``SecretStr``, ``SecretDict``) for the filesystem; a plain
    value as it is."""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _url(protocol: str, container: str, folder: Any) -> str:
    folder = str(folder or "").strip("/")
    return f"{protocol}://{container}/{folder}" if folder else f"{protocol}://{container}"


def _from_s3_bucket(block: Any, bucket_name: str) -> Destination:
    """prefect-aws ``S3Bucket`` and its ``AwsCredentials`` or ``MinIOCredentials``."""
    credentials = getattr(block, "credentials", None)
    if getattr(credentials, "assume_role_arn", None):
        raise JourneyValidationError(
            f"S3Bucket {bucket_name!r}: its credentials assume a role, which s3fs cannot do; "
            "give the role's credentials to the worker or use an ImageDestination"
        )
    fields = {
        "key": getattr(credentials, "aws_access_key_id", None)
        or getattr(credentials, "minio_root_user", None),
        "secret": _revealed(
            getattr(credentials, "aws_secret_access_key", None)
            or getattr(credentials, "minio_root_password", None)
        ),
        "token": getattr(credentials, "aws_session_token", None),
        "profile": getattr(credentials, "profile_name", None),
    }
    options: dict[str, Any] = {name: value for name, value in fields.items() if value}
    parameters = getattr(credentials, "aws_client_parameters", None)
    if getattr(parameters, "endpoint_url", None):
        options["endpoint_url"] = str(parameters.endpoint_url)  # type: ignore[union-attr]
    client_kwargs = {
        "region_name": getattr(credentials, "region_name", None),
        "verify": _verify(parameters),
    }
    client_kwargs = {name: value for name, value in client_kwargs.items() if value is not None}
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return Destination(_url("s3", bucket_name, getattr(block, "bucket_folder", "")), options)


def _verify(parameters: Any) -> bool | str | None:
    """``AwsClientParameters``' certificate check as botocore takes it: False, a CA bundle's
    path, or None for the default."""
    bundle = getattr(parameters, "verify_cert_path", None)
    verify = getattr(parameters, "verify", None)
    if bundle:
        return str(bundle)
    if verify is False:
        return False
    return None if verify in (None, True) else str(verify)  # a path: the older way


def _from_gcs_bucket(block: Any, bucket: str) -> Destination:
    """prefect-gcp ``GcsBucket`` and its ``GcpCredentials``, as gcsfs options."""
    credentials = getattr(block, "gcp_credentials", None)
    info = _revealed(getattr(credentials, "service_account_info", None))
    keyfile = getattr(credentials, "service_account_file", None)
    options: dict[str, Any] = {}
    if info:
        options["token"] = dict(info)
    elif keyfile:
        options["token"] = str(keyfile)
    if getattr(credentials, "project", None):
        options["project"] = str(credentials.project)  # type: ignore[union-attr]
    return Destination(_url("gs", bucket, getattr(block, "bucket_folder", "")), options)


def _from_azure_container(block: Any, container: str) -> Destination:
    """prefect-azure ``AzureBlobStorageContainer`` and its ``AzureBlobStorageCredentials``,
    as adlfs options."""
    credentials = getattr(block, "credentials", None)
    connection_string = _revealed(getattr(credentials, "connection_string", None))
    options: dict[str, Any] = {}
    if connection_string:
        options["connection_string"] = connection_string
    else:
        options.update(_azure_account(container, getattr(credentials, "account_url", None)))
        client_secret = _revealed(getattr(credentials, "client_secret", None))
        if client_secret:
            options["client_id"] = credentials.client_id  # type: ignore[union-attr]
            options["tenant_id"] = credentials.tenant_id  # type: ignore[union-attr]
            options["client_secret"] = client_secret
        else:
            options["anon"] = False  # adlfs then asks Azure's default credentials
    return Destination(_url("az", container, getattr(block, "base_folder", "")), options)


def _azure_account(container: str, account_url: Any) -> dict[str, str]:
    """adlfs's ``account_name`` (and ``account_host`` off Azure's public cloud) from an
    account URL, ``https://<account>.blob.<cloud suffix>``."""
    host = urlsplit(str(account_url or "")).hostname or ""
    account, _, suffix = host.partition(".blob.")
    if not account or not suffix:
        raise JourneyValidationError(
            f"AzureBlobStorageContainer {container!r}: its credentials need a connection "
            "string or an account URL https://<account>.blob.core.windows.net"
        )
    options = {"account_name": account}
    if suffix != "core.windows.net":
        options["account_host"] = host
    return options


# The field that names each bucket block's bucket, and how the block becomes a Destination.
_BUCKET_READERS: tuple[tuple[str, Callable[[Any, str], Destination]], ...] = (
    ("bucket_name", _from_s3_bucket),  # S3Bucket
    ("bucket", _from_gcs_bucket),  # GcsBucket
    ("container_name", _from_azure_container),  # AzureBlobStorageContainer
)
