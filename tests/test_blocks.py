"""Blocks: Prefect's block standards, secrets, destinations, and collection registration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prefect.blocks.core import Block
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr

import prefect_journey
from prefect_journey import ImageDestination, JourneyCredentials
from prefect_journey.destinations import resolve_destination
from prefect_journey.emulator import EmulatorServer
from prefect_journey.errors import JourneyValidationError
from prefect_journey.models import ImagineRequest
from prefect_journey.receiver import JourneyWebhookReceiver, load_receiver
from prefect_journey.redis_block import JourneyRedis
from prefect_journey.storage import Destination

from .conftest import SENTINEL_KEY, SENTINEL_WEBHOOK_SECRET

LOGO = Path(prefect_journey.__file__).parent / "assets" / "logo.png"
pytestmark = pytest.mark.usefixtures("prefect_harness")


class _OfflineLogoSuite(BlockStandardTestSuite):
    def test_has_a_valid_image(self, block: type[Block]) -> None:
        # The suite downloads the logo; tests are offline, so check the shipped file
        # that the URL serves from the repository.
        assert str(block._logo_url).endswith("prefect_journey/assets/logo.png")
        with Image.open(LOGO) as logo:
            assert logo.width == logo.height and 45 < logo.width < 1000

    def test_the_card_reads_as_one_sentence(self, block: type[Block]) -> None:
        # The UI's block card shows about two lines of the description.
        description = block.get_description() or ""
        assert description.endswith(".") and len(description) <= 80
        assert "``" not in description


class TestJourneyCredentialsStandards(_OfflineLogoSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return JourneyCredentials


class TestImageDestinationStandards(_OfflineLogoSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return ImageDestination


class TestJourneyWebhookReceiverStandards(_OfflineLogoSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return JourneyWebhookReceiver


class TestJourneyRedisStandards(_OfflineLogoSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return JourneyRedis


def test_webhook_receiver_block_checks_its_fields_and_keeps_the_secret() -> None:
    receiver = JourneyWebhookReceiver(
        url="https://hooks.example.com/webhooks/journey", secret=SENTINEL_WEBHOOK_SECRET
    )
    assert SENTINEL_WEBHOOK_SECRET not in repr(receiver) + str(receiver.model_dump())
    attempt = receiver.new_attempt(ImagineRequest(prompt="p"))
    assert SENTINEL_WEBHOOK_SECRET not in repr(attempt) and attempt.id not in attempt.webhook_url
    # The provider is given a key derived from the secret, never the secret.
    assert attempt.webhook_secret.get_secret_value() != SENTINEL_WEBHOOK_SECRET
    for bad in (
        {"url": "http://hooks.example.com/x"},
        {"secret": "  "},
        {"secret": "a-short-secret"},
        {"recovery_window_seconds": 0},
    ):
        fields: dict[str, Any] = {
            "url": "https://h.example.com/x",
            "secret": SENTINEL_WEBHOOK_SECRET,
            **bad,
        }
        with pytest.raises(ValueError) as refused:
            JourneyWebhookReceiver(**fields)
        assert fields["secret"].strip() == "" or fields["secret"] not in str(refused.value)
    receiver.save("sentinel-receiver", overwrite=True)
    loaded = load_receiver("sentinel-receiver")
    assert loaded is not None and loaded.secret.get_secret_value() == SENTINEL_WEBHOOK_SECRET


def test_credentials_build_clients_and_keep_the_key_secret(emulator: EmulatorServer) -> None:
    credentials = JourneyCredentials(api_key=SENTINEL_KEY, base_url=emulator.url)
    with credentials.get_client() as client:
        assert client.account().credits > 0
    for text in (repr(credentials), str(credentials), str(credentials.model_dump())):
        assert SENTINEL_KEY not in text
    credentials.save("sentinel-credentials", overwrite=True)
    loaded = JourneyCredentials.load("sentinel-credentials")
    assert loaded.api_key.get_secret_value() == SENTINEL_KEY


def test_async_client_from_credentials(emulator: EmulatorServer) -> None:
    import asyncio

    async def account() -> int:
        async with JourneyCredentials(
            api_key=emulator.api_key, base_url=emulator.url
        ).get_async_client() as client:
            return (await client.account()).credits

    assert asyncio.run(account()) > 0


def test_destinations_from_every_supported_form(tmp_path: Path) -> None:
    assert resolve_destination(str(tmp_path)) == Destination(str(tmp_path))
    options = {"key": "k", "secret": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:9"}
    saved = ImageDestination(url="s3://b/p", storage_options=options)
    assert resolve_destination(saved) == Destination("s3://b/p", options)
    assert "s3cr3t-value" not in repr(saved) + str(saved.model_dump())
    remote = RemoteFileSystem(basepath="s3://b/remote", settings=options)
    assert resolve_destination(remote) == Destination("s3://b/remote", options)
    assert resolve_destination(LocalFileSystem(basepath=str(tmp_path))).url == str(tmp_path)
    with pytest.raises(JourneyValidationError, match="unsupported destination"):
        resolve_destination(42)


class _AwsCredentialsLike(Block):
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None


class _S3BucketLike(Block):
    """Shaped like prefect-aws ``S3Bucket`` (not installed here), read duck-typed."""

    bucket_name: str
    bucket_folder: str = ""
    credentials: Any = None


def test_s3_bucket_block_is_read_duck_typed() -> None:
    block = _S3BucketLike(
        bucket_name="brand",
        bucket_folder="/images/",
        credentials=_AwsCredentialsLike(
            aws_access_key_id="AKIA", aws_secret_access_key=SecretStr("s")
        ),
    )
    assert resolve_destination(block) == Destination(
        "s3://brand/images", {"key": "AKIA", "secret": "s"}
    )


def test_collection_registers_against_a_real_prefect_server() -> None:
    """prefect block register runs in a subprocess, which imports Prefect and the package's
    Blocks."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    prefect = [sys.executable, "-m", "prefect"]
    registered = subprocess.run(
        [*prefect, "block", "register", "-m", "prefect_journey"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    listing = subprocess.run(
        [*prefect, "block", "type", "ls"],
        env={**env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "journeyapi-credentials" in listing.stdout
    assert "journeyapi-image-destination" in listing.stdout
    assert "journeyapi-webhook-receiver" in listing.stdout


def test_prefect_finds_the_blocks_through_the_collection_entry_point() -> None:
    """Prefect's collection loader imports ``prefect_journey.blocks``: a process that never
    imports the package itself loads a saved block by its type's slug."""
    from importlib.metadata import entry_points

    from prefect.settings import PREFECT_API_URL

    (entry_point,) = [
        ep for ep in entry_points(group="prefect.collections") if ep.name == "prefect_journey"
    ]
    assert entry_point.value == "prefect_journey.blocks"
    JourneyCredentials(api_key=SecretStr("entry-point-key")).save("entry-point", overwrite=True)
    code = (
        "from prefect.blocks.core import Block; "
        "block = Block.load('journeyapi-credentials/entry-point'); "
        "print(type(block).__module__, type(block).__name__)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[-2:] == ["prefect_journey.credentials", "JourneyCredentials"]
