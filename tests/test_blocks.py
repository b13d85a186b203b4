"""Blocks: Prefect's block standards, secrets, destinations, and collection registration."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prefect import get_client
from prefect.blocks.core import Block
from prefect.blocks.system import Secret
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect.types import SecretDict
from pydantic import Field, SecretStr

import prefect_journey
from prefect_journey import ImageDestination, JourneyCredentials
from prefect_journey.destinations import load_block, load_destination, resolve_destination
from prefect_journey.emulator import EmulatorServer
from prefect_journey.errors import JourneyValidationError, StorageError
from prefect_journey.models import ImagineRequest
from prefect_journey.receiver import JourneyWebhookReceiver, load_receiver
from prefect_journey.redis_block import JourneyRedis
from prefect_journey.storage import Destination

from .conftest import SENTINEL_KEY, SENTINEL_WEBHOOK_SECRET, Bucket, free_port

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


def test_real_s3_bucket_blocks_map_to_s3fs_options(tmp_path: Path) -> None:
    """prefect-aws's own classes: ``S3Bucket`` also has a ``basepath`` (its folder), which
    must not be taken for a URL."""
    from prefect_aws import AwsCredentials, MinIOCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    aws = AwsCredentials(
        aws_access_key_id="AKIA",
        aws_secret_access_key=SecretStr("s3cr3t-value"),
        aws_session_token="session",
        profile_name="brand",
        region_name="eu-west-3",
        aws_client_parameters=AwsClientParameters(
            endpoint_url="http://127.0.0.1:9", verify_cert_path=bundle
        ),
    )
    bucket = S3Bucket(bucket_name="brand", bucket_folder="images/", credentials=aws)
    assert resolve_destination(bucket) == Destination(
        "s3://brand/images",
        {
            "key": "AKIA",
            "secret": "s3cr3t-value",
            "token": "session",
            "profile": "brand",
            "endpoint_url": "http://127.0.0.1:9",
            "client_kwargs": {"region_name": "eu-west-3", "verify": str(bundle)},
        },
    )
    minio = MinIOCredentials(
        minio_root_user="minio",
        minio_root_password=SecretStr("minio-password"),
        aws_client_parameters=AwsClientParameters(endpoint_url="http://minio:9000", verify=False),
    )
    assert resolve_destination(S3Bucket(bucket_name="b", credentials=minio)) == Destination(
        "s3://b",
        {
            "key": "minio",
            "secret": "minio-password",
            "endpoint_url": "http://minio:9000",
            "client_kwargs": {"verify": False},
        },
    )
    assert resolve_destination(S3Bucket(bucket_name="b")) == Destination("s3://b")
    role = AwsCredentials(assume_role_arn="arn:aws:iam::123456789012:role/images")
    with pytest.raises(JourneyValidationError, match="assume a role"):
        resolve_destination(S3Bucket(bucket_name="b", credentials=role))


class _GcpCredentialsLike(Block):
    """The fields of prefect-gcp 0.6.21's ``GcpCredentials`` (not installed here: its
    dependencies bring grpcio and the Google API client)."""

    service_account_file: Path | None = None
    service_account_info: SecretDict | None = None
    project: str | None = None


class _GcsBucketLike(Block):
    """The fields of prefect-gcp 0.6.21's ``GcsBucket``, with its ``basepath`` property."""

    bucket: str
    gcp_credentials: _GcpCredentialsLike = Field(default_factory=_GcpCredentialsLike)
    bucket_folder: str = ""

    @property
    def basepath(self) -> str:
        return self.bucket_folder


def test_gcs_bucket_block_maps_to_gcsfs_options(tmp_path: Path) -> None:
    info = {"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----sentinel"}
    block = _GcsBucketLike(
        bucket="assets",
        bucket_folder="brand/",
        gcp_credentials=_GcpCredentialsLike(service_account_info=info, project="p-1"),
    )
    assert "sentinel" not in repr(block) + str(block.model_dump())
    assert resolve_destination(block) == Destination(
        "gs://assets/brand", {"token": info, "project": "p-1"}
    )
    keyfile = tmp_path / "key.json"
    with_file = _GcsBucketLike(
        bucket="assets", gcp_credentials=_GcpCredentialsLike(service_account_file=keyfile)
    )
    assert resolve_destination(with_file) == Destination("gs://assets", {"token": str(keyfile)})
    # No credentials: gcsfs finds Google's default ones.
    assert resolve_destination(_GcsBucketLike(bucket="assets")) == Destination("gs://assets")


class _AzureBlobStorageCredentialsLike(Block):
    """The fields of prefect-azure 0.4.12's ``AzureBlobStorageCredentials`` (not installed
    here: its dependencies bring the Azure management SDKs and prefect-docker)."""

    connection_string: SecretStr | None = None
    account_url: str | None = None
    client_id: str | None = None
    tenant_id: str | None = None
    client_secret: SecretStr | None = None


class _AzureBlobStorageContainerLike(Block):
    """The fields of prefect-azure 0.4.12's ``AzureBlobStorageContainer``."""

    container_name: str
    credentials: _AzureBlobStorageCredentialsLike
    base_folder: str | None = None


def test_azure_container_block_maps_to_adlfs_options() -> None:
    def container(**credentials: Any) -> Destination:
        return resolve_destination(
            _AzureBlobStorageContainerLike(
                container_name="assets",
                base_folder="brand",
                credentials=_AzureBlobStorageCredentialsLike(**credentials),
            )
        )

    account = "https://brandstore.blob.core.windows.net"
    assert container(connection_string=SecretStr("AccountKey=k")) == Destination(
        "az://assets/brand", {"connection_string": "AccountKey=k"}
    )
    spn = {"client_id": "c", "tenant_id": "t", "client_secret": SecretStr("spn-secret")}
    assert container(account_url=account, **spn) == Destination(
        "az://assets/brand",
        {
            "account_name": "brandstore",
            "client_id": "c",
            "tenant_id": "t",
            "client_secret": "spn-secret",
        },
    )
    # The account alone: adlfs asks Azure's default credentials, not anonymous access.
    assert container(account_url=account).storage_options == {
        "account_name": "brandstore",
        "anon": False,
    }
    china = "https://brandstore.blob.core.chinacloudapi.cn"
    assert container(account_url=china).storage_options == {
        "account_name": "brandstore",
        "account_host": "brandstore.blob.core.chinacloudapi.cn",
        "anon": False,
    }
    with pytest.raises(JourneyValidationError, match="account URL"):
        container(account_url="http://127.0.0.1:10000/devstoreaccount1")


def test_destination_blocks_load_by_name_or_by_type_slug(bucket: Bucket, tmp_path: Path) -> None:
    """Saved to and loaded from a real Prefect server: an ``ImageDestination`` by its plain
    name, every block by ``<block-type-slug>/<name>``."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    name = f"blocks-{bucket.name}"
    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key=SecretStr("testing"),
        aws_client_parameters=AwsClientParameters(endpoint_url=bucket.endpoint),
    )
    S3Bucket(bucket_name=bucket.name, bucket_folder="brand", credentials=credentials).save(name)
    assert load_destination(block_name=f"s3-bucket/{name}") == Destination(
        f"{bucket.url}/brand", bucket.storage_options
    )
    RemoteFileSystem(basepath=f"{bucket.url}/remote", settings=bucket.storage_options).save(name)
    assert load_destination(block_name=f"remote-file-system/{name}").url == f"{bucket.url}/remote"
    LocalFileSystem(basepath=str(tmp_path / "local")).save(name)
    assert load_destination(block_name=f"local-file-system/{name}").url == str(tmp_path / "local")
    ImageDestination(url=str(tmp_path / "images")).save(name)
    for saved in (name, f"journeyapi-image-destination/{name}"):
        assert load_destination(block_name=saved) == Destination(str(tmp_path / "images"))

    Secret(value="not a destination").save(name)
    with pytest.raises(JourneyValidationError, match="unsupported destination Secret"):
        load_destination(block_name=f"secret/{name}")
    with pytest.raises(JourneyValidationError, match="expected '<block-type-slug>/<name>'"):
        load_destination(block_name="s3-bucket/")
    with pytest.raises(ValueError, match="Unable to find block document"):
        load_destination(block_name="s3-bucket/no-such-block")


def test_a_block_type_not_installed_names_its_package() -> None:
    for slug, package in (
        ("gcs-bucket", "prefect-gcp"),
        ("azure-blob-storage-container", "prefect-azure"),
    ):
        if find_spec(package.replace("-", "_")):
            continue  # installed here: the block type is known
        with pytest.raises(JourneyValidationError, match=f"pip install {package}"):
            load_block(f"{slug}/assets")
    with pytest.raises(JourneyValidationError, match="'no-such-type' is not installed"):
        load_block("no-such-type/assets")


def test_an_unreachable_bucket_block_fails_without_its_secret(
    moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The secret reaches the filesystem, and no error: neither for a closed endpoint nor for
    a bucket that does not exist."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    for variable in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(variable, raising=False)
    # botocore retries a refused connection for seconds; once says the same.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    closed = f"http://127.0.0.1:{free_port()}"
    for endpoint, bucket in ((closed, "any-bucket"), (moto_server, "no-such-bucket")):
        credentials = AwsCredentials(
            aws_access_key_id="testing",
            aws_secret_access_key=SecretStr(SENTINEL_KEY),
            aws_client_parameters=AwsClientParameters(endpoint_url=endpoint),
        )
        S3Bucket(bucket_name=bucket, credentials=credentials).save("unreachable", overwrite=True)
        with pytest.raises(StorageError) as failed:
            load_destination(block_name="s3-bucket/unreachable")
        assert bucket in str(failed.value)
        assert SENTINEL_KEY not in str(failed.value) + repr(failed.value)


def test_collection_registers_against_a_real_prefect_server() -> None:
    """prefect block register runs in a subprocess, which imports Prefect and the package's
    Blocks. The logo is registered at the address JOURNEY_BLOCK_LOGO_URL names, here the
    receiver's, which serves the file shipped in the package: what a Prefect server whose
    browsers have no internet shows."""
    from prefect.settings import PREFECT_API_URL

    from prefect_journey.emulator.server import BackgroundServer
    from prefect_journey.webhooks import LOGO_PATH, create_webhook_app

    api = str(PREFECT_API_URL.value())
    with BackgroundServer(create_webhook_app(SENTINEL_WEBHOOK_SECRET, api_url=api)) as receiver:
        logo_url = f"{receiver.url}{LOGO_PATH}"
        registered = subprocess.run(
            [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_journey"],
            env={**os.environ, "PREFECT_API_URL": api, "JOURNEY_BLOCK_LOGO_URL": logo_url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        with get_client(sync_client=True) as client:
            for block in (
                JourneyCredentials,
                ImageDestination,
                JourneyWebhookReceiver,
                JourneyRedis,
            ):
                block_type = client.read_block_type_by_slug(block.get_block_type_slug())
                assert str(block_type.logo_url) == logo_url, block_type.slug
                assert block_type.description == block.get_description()
        served = httpx.get(logo_url, timeout=10)
    assert served.headers["content-type"] == "image/png"
    assert served.content == LOGO.read_bytes()


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
