"""The ``JourneyCredentials`` block: the API key and endpoint, saved once, loaded by name.

Every client the Prefect layer builds comes from :func:`journey_client` or
:func:`async_journey_client`: from a block when one is given, else from ``JOURNEY_API_KEY``
and ``JOURNEY_BASE_URL``.
"""

from __future__ import annotations

from typing import Any, cast

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from prefect_journey._compat import call_sync
from prefect_journey.client import AsyncJourneyClient, JourneyClient, resolve_base_url
from prefect_journey.settings import DEFAULT_BASE_URL, block_logo_url

REPOSITORY_URL = "https://github.com/journeyapi/prefect-journey"
DOCUMENTATION_URL = f"{REPOSITORY_URL}#readme"


class BlockLogoUrl:
    """The Blocks' ``_logo_url``: where the Prefect UI loads their logo from.

    ``JOURNEY_BLOCK_LOGO_URL``, else the repository's copy, read each time Prefect registers
    a block type (``prefect block register``, or saving a block), as every setting is read
    when it is needed: a process may set it after importing the package.
    """

    def __get__(self, instance: object, owner: type | None = None) -> HttpUrl:
        return HttpUrl(block_logo_url())


LOGO_URL = BlockLogoUrl()


class JourneyCredentials(Block):
    """Credentials for the JourneyAPI image API (``nano-banana-2``).

    The key is stored as a secret: the Prefect UI and API obfuscate it, and it is read only
    when a client is built.

    Example:
        Load saved credentials and generate an image:
        ```python
        from prefect_journey import JourneyCredentials

        credentials = JourneyCredentials.load("BLOCK_NAME")
        with credentials.get_client() as client:
            result = client.imagine(prompt="a lighthouse at dusk")
        ```
    """

    _block_type_name = "JourneyAPI Credentials"
    # The card in the UI shows about two lines: one sentence, not the docstring.
    _description = "The JourneyAPI key (kept secret) the image tasks and flows call with."
    _block_type_slug = "journeyapi-credentials"
    _logo_url = LOGO_URL
    _documentation_url = HttpUrl(DOCUMENTATION_URL)

    api_key: SecretStr = Field(
        default=...,
        title="API Key",
        description="The JourneyAPI key, sent as the raw Authorization header.",
    )
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        title="Base URL",
        description=("The API root; plain http is accepted only on loopback (the local emulator)."),
    )

    def get_client(self, **options: Any) -> JourneyClient:
        """A client with this block's key and endpoint.

        Args:
            **options: Keyword options of :class:`~prefect_journey.client.JourneyClient`
                (``max_retries``, ``read_timeout``, ``max_connections``, ``seed``,
                ``transport``, ``repay_possibly_billed``).

        Returns:
            A new :class:`~prefect_journey.client.JourneyClient`; close it, or use it in a
            ``with`` block.
        """
        return JourneyClient(self.api_key, base_url=self.base_url, **options)

    def get_async_client(self, **options: Any) -> AsyncJourneyClient:
        """Async twin of :meth:`get_client`.

        Args:
            **options: Keyword options of :class:`~prefect_journey.client.AsyncJourneyClient`.

        Returns:
            A new :class:`~prefect_journey.client.AsyncJourneyClient`.
        """
        return AsyncJourneyClient(self.api_key, base_url=self.base_url, **options)


def journey_client(credentials: JourneyCredentials | None, **options: Any) -> JourneyClient:
    """The client for ``credentials``, else for ``JOURNEY_API_KEY`` / ``JOURNEY_BASE_URL``.

    Args:
        credentials: A loaded block, or None for the environment.
        **options: Keyword options of :class:`~prefect_journey.client.JourneyClient`.

    Returns:
        A new client.

    Raises:
        ConfigurationError: No key anywhere, or a malformed base URL.
    """
    return credentials.get_client(**options) if credentials else JourneyClient(**options)


def async_journey_client(
    credentials: JourneyCredentials | None, **options: Any
) -> AsyncJourneyClient:
    """Async twin of :func:`journey_client`.

    Args:
        credentials: A loaded block, or None for the environment.
        **options: Keyword options of :class:`~prefect_journey.client.AsyncJourneyClient`.

    Returns:
        A new async client.
    """
    if credentials:
        return credentials.get_async_client(**options)
    return AsyncJourneyClient(**options)


def api_base_url(credentials: JourneyCredentials | None) -> str:
    """The API root the client for ``credentials`` talks to (part of every cache key).

    Args:
        credentials: A loaded block, or None for ``JOURNEY_BASE_URL``.

    Returns:
        The checked base URL.
    """
    return resolve_base_url(credentials.base_url if credentials else None)


def load_credentials(block_name: str | None) -> JourneyCredentials | None:
    """The saved ``JourneyCredentials`` block called ``block_name``.

    Args:
        block_name: The block's name, or None/empty to use the environment.

    Returns:
        The block, or None.

    Raises:
        ValueError: No block of that name (Prefect's error).
    """
    if not block_name:
        return None
    return cast(JourneyCredentials, call_sync(JourneyCredentials.load, block_name))
