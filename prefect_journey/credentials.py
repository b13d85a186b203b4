"""The ``JourneyCredentials`` block: the API key and endpoint, saved once, loaded by name."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from prefect_journey.client import DEFAULT_BASE_URL, AsyncJourneyClient, JourneyClient

REPOSITORY_URL = "https://github.com/journeyapi/prefect-journey"
DOCUMENTATION_URL = f"{REPOSITORY_URL}#readme"
# Served from the repository so the Prefect UI can show it; the file ships in the package.
LOGO_URL = "https://raw.githubusercontent.com/journeyapi/prefect-journey/main/prefect_journey/assets/logo.png"


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
    _block_type_slug = "journeyapi-credentials"
    _logo_url = HttpUrl(LOGO_URL)
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
        """A :class:`~prefect_journey.client.JourneyClient`; ``options`` as for the client."""
        return JourneyClient(self.api_key, base_url=self.base_url, **options)

    def get_async_client(self, **options: Any) -> AsyncJourneyClient:
        """An :class:`~prefect_journey.client.AsyncJourneyClient`; ``options`` as above."""
        return AsyncJourneyClient(self.api_key, base_url=self.base_url, **options)
