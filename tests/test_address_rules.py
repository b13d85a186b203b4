"""The address rules: downloads and references reach only public or allowed addresses."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from prefect_journey.address_rules import (
    AddressRules,
    check_references,
    is_public_address,
    parse_endpoint,
)
from prefect_journey.client import AsyncJourneyClient, JourneyClient
from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.errors import (
    ConfigurationError,
    DownloadRefusedError,
    DownloadTimeoutError,
    ReferenceRefusedError,
)
from prefect_journey.models import ImagineResult
from prefect_journey.storage import astore_image, download_client, store_image

from .conftest import allow_private_endpoint, free_port


def generate(emulator: EmulatorServer) -> ImagineResult:
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        return client.imagine(prompt="a red fox")


def no_allowances(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a user's machine: no private endpoint allowed, the provider's API configured."""
    for name in ("JOURNEY_PRIVATE_ENDPOINTS", "JOURNEY_BASE_URL", "JOURNEY_IMAGE_HOSTS"):
        monkeypatch.delenv(name, raising=False)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),  # shared address space (carrier-grade NAT)
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast, global scope or not
        ("240.0.0.1", False),  # reserved
        ("::1", False),
        ("::", False),
        ("fe80::1%eth0", False),
        ("fec0::1", False),  # IPv6 site-local
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("ff02::1", False),
    ],
)
def test_only_public_unicast_addresses_are_public(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def loopback_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/cdn/x.png",
        f"http://[::1]:{port}/cdn/x.png",
        f"http://localhost:{port}/cdn/x.png",  # a name that resolves to loopback
        "https://10.0.0.7/x.png",
        "https://169.254.169.254/latest/meta-data/x.png",
    ]


def test_downloads_to_non_public_addresses_are_refused(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = generate(emulator)
    no_allowances(monkeypatch)
    for url in [result.image_url, *loopback_urls(emulator_port(emulator))]:
        with pytest.raises(DownloadRefusedError, match="not a public address") as refused:
            store_image(url, str(tmp_path), task_id=result.task_id)
        assert not refused.value.retryable
    assert emulator.ledger()["calls"].get("cdn", 0) == 0  # refused before connecting
    assert files(tmp_path) == []


def emulator_port(emulator: EmulatorServer) -> int:
    return int(emulator.url.rsplit(":", 1)[1])


def test_a_public_name_that_resolves_to_loopback_is_refused(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CDN name whose DNS answer is (or turns into) a loopback address: the check is on
    the address the connection goes to."""
    result = generate(emulator)
    no_allowances(monkeypatch)
    rules = AddressRules.from_settings(resolver=lambda host, port: ["127.0.0.1"])
    url = result.image_url.replace("http://127.0.0.1", "https://images.example.com")
    with download_client(rules=rules) as http:
        with pytest.raises(DownloadRefusedError, match=r"images.example.com:\d+ resolves to"):
            store_image(url, str(tmp_path), task_id=result.task_id, http=http)
    assert emulator.ledger()["calls"].get("cdn", 0) == 0 and files(tmp_path) == []


def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    no_allowances(monkeypatch)
    rules = AddressRules.from_settings(resolver=lambda host, port: ["93.184.215.14", "10.0.0.1"])
    with pytest.raises(ValueError, match=r"10\.0\.0\.1"):
        rules.resolve("cdn.example.com", 443)


def test_the_configured_api_is_allowed_and_only_its_port(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = generate(emulator)
    no_allowances(monkeypatch)
    monkeypatch.setenv("JOURNEY_BASE_URL", emulator.url)  # the emulator is the API
    stored = store_image(result.image_url, str(tmp_path), task_id=result.task_id)
    assert stored.sha256 == emulator.ledger()["images"][result.task_id]["sha256"]
    other = f"http://127.0.0.1:{free_port()}/x.png"
    with pytest.raises(DownloadRefusedError, match="not a public address"):
        store_image(other, str(tmp_path / "other"), task_id="t")


def test_image_hosts_restrict_downloads(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = generate(emulator)
    monkeypatch.setenv("JOURNEY_IMAGE_HOSTS", "cdn.example.com, *.journeyapi.com")
    with pytest.raises(DownloadRefusedError, match="not one of the image hosts"):
        store_image(result.image_url, str(tmp_path), task_id=result.task_id)
    assert emulator.ledger()["calls"].get("cdn", 0) == 0
    monkeypatch.setenv("JOURNEY_IMAGE_HOSTS", "cdn.example.com,127.0.0.1")
    assert store_image(result.image_url, str(tmp_path), task_id=result.task_id).created

    rules = AddressRules(image_hosts=("cdn.example.com", "*.example.net"))
    for host in ("cdn.example.com", "CDN.example.com", "a.example.net", "a.b.example.net"):
        rules.check_image_host(host)
    for host in ("example.net", "evil-example.net", "cdn.example.com.evil.org", "x.com"):
        with pytest.raises(ValueError):
            rules.check_image_host(host)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("JOURNEY_IMAGE_HOSTS", "https://cdn.example.com"),
        ("JOURNEY_IMAGE_HOSTS", "cdn.example.com:443"),
        ("JOURNEY_IMAGE_HOSTS", "*"),
        ("JOURNEY_PRIVATE_ENDPOINTS", "minio.local"),  # no port
        ("JOURNEY_PRIVATE_ENDPOINTS", "http://minio.local:9000"),
    ],
)
def test_malformed_rules_are_configuration_errors(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        AddressRules.from_settings()


def test_endpoints_compare_canonical_hosts() -> None:
    assert parse_endpoint("[::1]:8000") == ("::1", 8000)
    assert parse_endpoint("MinIO.Local:9000") == ("minio.local", 9000)


# --- A server of our own, for redirects and slow bodies --------------------------------------

PNG_HEAD = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tricks(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[str]]]:
    """A loopback server that is an allowed endpoint: ``/redirect?to=URL`` redirects, and
    ``/trickle`` sends a PNG signature and then a byte every 50 ms until the client leaves.
    Yields its URL and the paths it was asked for."""
    seen: list[str] = []

    async def redirect(request: Request) -> Response:
        seen.append(request.url.path)
        return RedirectResponse(request.query_params["to"], status_code=302)

    async def trickle(request: Request) -> Response:
        seen.append(request.url.path)

        async def body() -> AsyncIterator[bytes]:
            yield PNG_HEAD
            while True:
                await asyncio.sleep(0.05)
                yield b"\x00"

        return StreamingResponse(body(), media_type="image/png")

    app = Starlette(routes=[Route("/redirect", redirect), Route("/trickle", trickle)])
    with BackgroundServer(app) as server:
        allow_private_endpoint(monkeypatch, server.url)
        yield server.url, seen


def test_a_redirect_to_a_private_address_is_refused(
    tricks: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From an allowed host to loopback on another port, to the cloud metadata address, and
    to a name that resolves to a private address: each hop is checked at connect time."""
    url, seen = tricks
    with BackgroundServer(Starlette()) as bystander:  # on loopback, not allowed
        targets = [f"{bystander.url}/x.png", "https://169.254.169.254/latest/x.png"]
        for target in targets:
            with pytest.raises(DownloadRefusedError, match="not a public address"):
                store_image(f"{url}/redirect?to={target}", str(tmp_path), task_id="t")

        def resolve(host: str, port: int) -> list[str]:
            return ["10.20.30.40"] if host == "internal.example.com" else [host]

        rules = AddressRules.from_settings(resolver=resolve)
        to_internal = f"{url}/redirect?to=https://internal.example.com/x.png"
        with download_client(rules=rules) as http:
            with pytest.raises(DownloadRefusedError, match=r"10\.20\.30\.40"):
                store_image(to_internal, str(tmp_path), task_id="t", http=http)
    assert seen == ["/redirect"] * 3 and files(tmp_path) == []


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_trickling_download_is_cut_off_at_its_deadline(
    tricks: tuple[str, list[str]], tmp_path: Path, asynchronous: bool
) -> None:
    """A byte every 50 ms keeps every read within the read timeout; the deadline (1 s here,
    130 s for the default cap) ends it."""
    url = f"{tricks[0]}/trickle"
    options: dict[str, Any] = {"task_id": "t", "max_bytes": 1024, "deadline": 1.0}
    with pytest.raises(DownloadTimeoutError, match="1 s deadline") as timed_out:
        if asynchronous:
            asyncio.run(astore_image(url, str(tmp_path), **options))
        else:
            store_image(url, str(tmp_path), **options)
    assert timed_out.value.retryable
    assert files(tmp_path) == []


# --- References -------------------------------------------------------------------------------

PRIVATE_REFERENCES = [
    "https://169.254.169.254/latest/ref.png?X-Amz-Signature=s3cr3t",
    "http://127.0.0.1:9/ref.png",
    "https://[::ffff:10.0.0.1]/ref.png",
    "https://localhost/ref.png",
]


@pytest.mark.parametrize("reference", PRIVATE_REFERENCES)
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_private_reference_is_refused_before_the_paid_call(
    journey_env: EmulatorServer, reference: str, asynchronous: bool
) -> None:
    credits = journey_env.ledger()["credits_remaining"]
    refs = ["https://93.184.215.14/fine.png", reference]

    async def imagine_async() -> None:
        async with AsyncJourneyClient() as client:
            await client.imagine(prompt="p", image_urls=refs)

    with pytest.raises(ReferenceRefusedError, match=r"image_urls\[1\]") as refused:
        if asynchronous:
            asyncio.run(imagine_async())
        else:
            with JourneyClient() as client:
                client.imagine(prompt="p", image_urls=refs)
    assert "s3cr3t" not in str(refused.value)  # a presigned URL's signature stays out
    ledger = journey_env.ledger()
    assert ledger["calls_total"] == 0 and ledger["credits_remaining"] == credits


def test_references_that_do_not_resolve_here_or_are_allowed_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_allowances(monkeypatch)

    def resolve(host: str, port: int) -> list[str]:
        if host == "nowhere.invalid":
            raise OSError("no such name")
        return [str(ipaddress.ip_address(host))] if host[0].isdigit() else ["93.184.215.14"]

    rules = AddressRules.from_settings(resolver=resolve)
    check_references(["https://nowhere.invalid/a.png", "https://cdn.example.com/b.png"], rules)
    monkeypatch.setenv("JOURNEY_PRIVATE_ENDPOINTS", "10.0.0.5:9000")
    check_references(["http://10.0.0.5:9000/bucket/a.png"], AddressRules.from_settings(resolve))
    with pytest.raises(ReferenceRefusedError):
        check_references(["http://10.0.0.5:9001/bucket/a.png"], AddressRules.from_settings(resolve))


# --- TLS to a pinned address ------------------------------------------------------------------


def _certificate(tmp_path: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (and no IP address), and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_pinned_connection_keeps_the_host_name_in_tls_and_host(tmp_path: Path) -> None:
    """The connection goes to the checked address, while the server name (SNI), the
    certificate check and the Host header still use the URL's host name."""
    import http.server
    import ssl
    import threading

    from prefect_journey.address_rules import CheckedTransport
    from prefect_journey.emulator.images import render_image

    host = "cdn.journey.test"
    image = render_image("a pinned download", "t", (64, 64))
    cert, key = _certificate(tmp_path, host)
    server_names: list[str | None] = []
    host_headers: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host_headers.append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args: Any) -> None:
            pass

    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert, key)
    served.sni_callback = lambda sock, name, context: server_names.append(name)  # type: ignore[assignment,func-returns-value]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = served.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        rules = AddressRules(
            allowed_endpoints=frozenset({(host, port)}), resolver=lambda name, p: ["127.0.0.1"]
        )
        url = f"https://{host}:{port}/a.png"
        with download_client(CheckedTransport(rules, verify=trusted)) as http_client:
            stored = store_image(url, str(tmp_path / "out"), task_id="t", http=http_client)
    finally:
        server.shutdown()
        server.server_close()
    assert stored.bytes == len(image)
    assert server_names == [host] and host_headers == [f"{host}:{port}"]
