"""Streaming storage against the emulator's CDN, a local folder and a moto S3 server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from prefect_journey.client import JourneyClient
from prefect_journey.emulator import EmulatorServer
from prefect_journey.errors import DownloadError, JourneyValidationError, ObjectConflictError
from prefect_journey.models import ImagineResult
from prefect_journey.storage import (
    DOWNLOAD_CHUNK,
    UPLOAD_PART_SIZE,
    Destination,
    Occupant,
    StoredImage,
    astore_image,
    check_object_key,
    presign,
    render_key,
    slugify,
    store_image,
)

from .conftest import Bucket


def generate(emulator: EmulatorServer, **fields: object) -> ImagineResult:
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        return client.imagine(prompt=str(fields.pop("prompt", "a red fox")), **fields)  # type: ignore[arg-type]


def served_sha256(emulator: EmulatorServer, task_id: str) -> str:
    return str(emulator.ledger()["images"][task_id]["sha256"])


def local_files(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden ones (partial writes) included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_store_to_local_folder(emulator: EmulatorServer, tmp_path: Path) -> None:
    result = generate(emulator, aspect_ratio="4:3", resolution="2K")
    stored = store_image(result.image_url, str(tmp_path), task_id=result.task_id)
    path = tmp_path / f"{result.task_id}.png"
    assert stored.uri == path.as_uri()
    assert local_files(tmp_path) == [path.name]
    assert (stored.format, stored.width, stored.height) == ("png", 2400, 1792)
    assert (
        stored.sha256
        == hashlib.sha256(path.read_bytes()).hexdigest()
        == served_sha256(emulator, result.task_id)
    )
    assert stored.bytes == path.stat().st_size and stored.created


def test_store_to_s3(emulator: EmulatorServer, bucket: Bucket) -> None:
    result = generate(emulator)
    destination = Destination(f"{bucket.url}/campaign", bucket.storage_options)
    stored = store_image(result.image_url, destination, task_id=result.task_id)
    assert stored.uri == f"s3://{bucket.name}/campaign/{result.task_id}.png"
    assert bucket.objects() == [f"campaign/{result.task_id}.png"]
    data = bucket.fs().cat(stored.uri)
    assert (
        hashlib.sha256(data).hexdigest() == stored.sha256 == served_sha256(emulator, result.task_id)
    )


def test_local_store_starting_writeback_as_it_grows_is_whole(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("prefect_journey.storage.writers.LOCAL_WRITEBACK_BYTES", 256 * 1024)
    emulator.admin("config", {"realistic_sizes": True})  # several MB: many writebacks
    try:
        result = generate(emulator, resolution="2K")
        stored = store_image(result.image_url, str(tmp_path), task_id=result.task_id)
    finally:
        emulator.admin("config", {"realistic_sizes": False})
    assert stored.bytes > 2 * 1024 * 1024
    content = (tmp_path / f"{result.task_id}.png").read_bytes()
    assert hashlib.sha256(content).hexdigest() == stored.sha256
    assert stored.sha256 == served_sha256(emulator, result.task_id)
    assert local_files(tmp_path) == [f"{result.task_id}.png"]


def test_api_key_is_not_sent_to_the_cdn(emulator: EmulatorServer, tmp_path: Path) -> None:
    result = generate(emulator)
    store_image(result.image_url, str(tmp_path), task_id=result.task_id)
    downloads = [c for c in emulator.ledger()["log"] if c["endpoint"] == "cdn"]
    assert downloads and not any(c["authorization"] for c in downloads)


def test_jpeg_bytes_under_png_url_are_stored_as_jpg(
    emulator: EmulatorServer, bucket: Bucket
) -> None:
    emulator.admin("config", {"jpeg_as_png_rate": 1.0})
    result = generate(emulator, aspect_ratio="2:3")
    stored = store_image(
        result.image_url, Destination(bucket.url, bucket.storage_options), task_id=result.task_id
    )
    assert result.image_url.endswith(".png")
    assert stored.uri.endswith(".jpg") and stored.format == "jpeg" and stored.width == 848
    assert bucket.objects() == [f"{result.task_id}.jpg"]


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_bad_download_leaves_nothing_locally(
    emulator: EmulatorServer, tmp_path: Path, fault: str
) -> None:
    result = generate(emulator)
    emulator.admin("faults", {"queue": {"cdn": [fault]}})
    with pytest.raises(DownloadError) as caught:
        store_image(result.image_url, str(tmp_path), task_id=result.task_id)
    assert caught.value.retryable
    assert local_files(tmp_path) == []


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_bad_download_leaves_nothing_in_the_bucket(
    emulator: EmulatorServer, bucket: Bucket, fault: str
) -> None:
    emulator.admin("config", {"realistic_sizes": True})  # several MB: a real multipart upload
    result = generate(emulator, resolution="2K")
    emulator.admin("faults", {"queue": {"cdn": [fault]}})
    with pytest.raises(DownloadError):
        store_image(
            result.image_url,
            Destination(bucket.url, bucket.storage_options),
            task_id=result.task_id,
        )
    assert bucket.objects() == []
    assert bucket.pending_uploads() == 0
    emulator.admin("config", {"realistic_sizes": False})


def test_restoring_the_same_image_is_idempotent(
    emulator: EmulatorServer, bucket: Bucket, tmp_path: Path
) -> None:
    result = generate(emulator)
    for destination in (
        Destination(bucket.url, bucket.storage_options),
        Destination(str(tmp_path)),
    ):
        first = store_image(result.image_url, destination, task_id=result.task_id)
        second = store_image(result.image_url, destination, task_id=result.task_id)
        assert first.created and not second.created
        assert first.uri == second.uri and first.sha256 == second.sha256
    assert len(bucket.objects()) == 1 and len(local_files(tmp_path)) == 1


class _RacingTransport(httpx.BaseTransport):
    """A real download that calls ``race`` once, when ``after`` bytes have arrived."""

    def __init__(self, race: Callable[[], None], after: int) -> None:
        self._inner = httpx.HTTPTransport()
        self._race = race
        self._after = after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        original, race, after = response.stream, self._race, self._after

        class Racing(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                received = 0
                for piece in original:  # type: ignore[union-attr]
                    if received < after <= received + len(piece):
                        race()
                    received += len(piece)
                    yield piece

            def close(self) -> None:
                original.close()  # type: ignore[union-attr]

        response.stream = Racing()
        return response


def test_an_object_created_during_the_upload_is_kept_and_the_upload_aborted(
    emulator: EmulatorServer, bucket: Bucket
) -> None:
    """A realistic 4K image (tens of MB) generated, downloaded, and uploaded in parts to the
    moto server while another writer races it."""
    emulator.admin("config", {"realistic_sizes": True})  # tens of MB: several parts
    try:
        result = generate(emulator, resolution="4K")
        # Rendering and encoding tens of MB takes seconds on a loaded machine.
        image = httpx.get(result.image_url, timeout=120).content
    finally:
        emulator.admin("config", {"realistic_sizes": False})
    key = f"{result.task_id}.png"
    assert len(image) > 3 * UPLOAD_PART_SIZE

    def another_writer() -> None:  # after our first parts are uploaded, before the commit
        bucket.fs().pipe(f"{bucket.name}/{key}", image)

    racing = _RacingTransport(another_writer, after=2 * UPLOAD_PART_SIZE + DOWNLOAD_CHUNK)
    with httpx.Client(transport=racing) as http:
        stored = store_image(
            result.image_url,
            Destination(bucket.url, bucket.storage_options),
            task_id=result.task_id,
            http=http,
        )
    assert not stored.created and stored.sha256 == hashlib.sha256(image).hexdigest()
    assert bucket.objects() == [key]
    assert bucket.pending_uploads() == 0


def test_different_object_at_the_key_is_never_overwritten(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    one, two = generate(emulator, prompt="one"), generate(emulator, prompt="two")
    fixed = {"key_template": "fixed.{ext}"}
    store_image(one.image_url, str(tmp_path), task_id=one.task_id, **fixed)
    with pytest.raises(ObjectConflictError):
        store_image(two.image_url, str(tmp_path), task_id=two.task_id, **fixed)
    assert hashlib.sha256((tmp_path / "fixed.png").read_bytes()).hexdigest() == served_sha256(
        emulator, one.task_id
    )
    replaced = store_image(
        two.image_url, str(tmp_path), task_id=two.task_id, overwrite=True, **fixed
    )
    assert replaced.sha256 == served_sha256(emulator, two.task_id)
    assert local_files(tmp_path) == ["fixed.png"]


def test_size_cap_aborts_without_an_object(emulator: EmulatorServer, tmp_path: Path) -> None:
    result = generate(emulator)
    with pytest.raises(DownloadError, match="cap") as caught:  # the tests' images: under 1 KB
        store_image(result.image_url, str(tmp_path), task_id=result.task_id, max_bytes=256)
    assert not caught.value.retryable
    assert local_files(tmp_path) == []


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# A PNG head announcing one 200 MiB IDAT chunk: valid as far as a verifier can tell until
# the chunk ends, so only the size cap can stop it.
_ENDLESS_PNG_HEAD = (
    b"\x89PNG\r\n\x1a\n"
    + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
    + struct.pack(">I", 200 * 1024 * 1024)
    + b"IDAT"
)


def _unannounced_stream(sent: list[int], *, asynchronous: bool) -> httpx.MockTransport:
    """A CDN answer without Content-Length: the head above, then zeros a MiB at a time,
    counting in ``sent`` how many MiB the downloader pulled."""

    def body() -> Iterator[bytes]:
        yield _ENDLESS_PNG_HEAD
        for _ in range(200):
            sent.append(1)
            yield bytes(1024 * 1024)

    async def abody() -> AsyncIterator[bytes]:
        for piece in body():
            yield piece

    return httpx.MockTransport(
        lambda request: httpx.Response(200, content=abody() if asynchronous else body())
    )


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_write_error_stops_the_download_at_once(tmp_path: Path, asynchronous: bool) -> None:
    """The cap is checked on the write-behind thread; its error must reach the downloading
    thread within a chunk or two, not after the whole (here endless-looking) body."""
    sent: list[int] = []
    transport = _unannounced_stream(sent, asynchronous=asynchronous)
    cap = {"max_bytes": 3 * 1024 * 1024, "task_id": "t"}
    url = "https://cdn.example.com/a.png"
    with pytest.raises(DownloadError, match="cap"):
        if asynchronous:

            async def run() -> None:
                async with httpx.AsyncClient(transport=transport) as http:
                    await astore_image(url, str(tmp_path), http=http, **cap)  # type: ignore[arg-type]

            asyncio.run(run())
        else:
            with httpx.Client(transport=transport) as http:
                store_image(url, str(tmp_path), http=http, **cap)  # type: ignore[arg-type]
    assert len(sent) <= 6
    assert local_files(tmp_path) == []


@pytest.mark.parametrize(
    "image_url",
    [
        "ftp://cdn.example.com/a.png",
        "http://cdn.example.com/a.png",
        "file:///etc/passwd",
        "not a url",
    ],
)
def test_unsafe_image_urls_are_refused_before_any_request(image_url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="refusing"):
        store_image(image_url, str(tmp_path), task_id="t")


def test_redirects_are_checked_and_bounded(tmp_path: Path) -> None:
    def to_plain_http(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://evil.example.com/x.png"})

    from prefect_journey.storage import download_client

    with download_client(httpx.MockTransport(to_plain_http)) as http:
        with pytest.raises(DownloadError, match="https"):
            store_image("https://cdn.example.com/a.png", str(tmp_path), task_id="t", http=http)

    hops = []

    def loop(request: httpx.Request) -> httpx.Response:
        hops.append(request.url)
        return httpx.Response(302, headers={"Location": f"https://cdn.example.com/{len(hops)}.png"})

    with download_client(httpx.MockTransport(loop)) as http:
        with pytest.raises(DownloadError, match="TooManyRedirects"):
            store_image("https://cdn.example.com/a.png", str(tmp_path), task_id="t", http=http)
    assert len(hops) == 6 and local_files(tmp_path) == []


@pytest.mark.parametrize(
    "template",
    [
        "../{task_id}.{ext}",
        "/abs/{task_id}.{ext}",
        "a//{task_id}.{ext}",
        "a\\\\{task_id}.{ext}",
        "{task_id.__class__}.{ext}",
        "{task_id}",
        "{missing}.{ext}",
        "a/./{task_id}.{ext}",
        "{task_id} x.{ext}",
    ],
)
def test_unsafe_keys_are_refused_before_download(
    emulator: EmulatorServer, tmp_path: Path, template: str
) -> None:
    result = generate(emulator)
    with pytest.raises(JourneyValidationError):
        store_image(result.image_url, str(tmp_path), task_id=result.task_id, key_template=template)
    assert emulator.ledger()["calls"].get("cdn", 0) == 0
    assert local_files(tmp_path) == []


def test_key_helpers() -> None:
    assert slugify("A Cat, in a Hat!  ") == "a-cat-in-a-hat"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("¿¿??") == "image"
    key = render_key(
        "{campaign}/{index:04d}-{slug}.{ext}",
        {"campaign": "x", "index": 7, "slug": "s", "ext": "png"},
    )
    assert key == "x/0007-s.png"
    with pytest.raises(JourneyValidationError):
        check_object_key("x/../../y.png")


def test_presigned_s3_reference_downloads(bucket: Bucket) -> None:
    bucket.fs().pipe(f"{bucket.name}/characters/ana.png", b"sheet")
    url = presign(f"{bucket.url}/characters/ana.png", bucket.storage_options, expires_in=300)
    assert url.startswith(bucket.endpoint) and "Signature" in url
    assert httpx.get(url).content == b"sheet"
    assert presign("https://example.com/a.png") == "https://example.com/a.png"


def test_async_store(emulator: EmulatorServer, bucket: Bucket) -> None:
    result = generate(emulator, resolution="2K")
    stored = asyncio.run(
        astore_image(
            result.image_url,
            Destination(bucket.url, bucket.storage_options),
            task_id=result.task_id,
        )
    )
    assert stored.sha256 == served_sha256(emulator, result.task_id)
    assert bucket.objects() == [f"{result.task_id}.png"]


def _destination(kind: str, bucket: Bucket, tmp_path: Path) -> Destination:
    if kind == "s3":
        return Destination(f"{bucket.url}/records", bucket.storage_options)
    return Destination(str(tmp_path / "records"))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_the_origin_is_recorded_on_the_object_and_read_back(
    emulator: EmulatorServer, bucket: Bucket, tmp_path: Path, kind: str
) -> None:
    destination = _destination(kind, bucket, tmp_path)
    made, plain = generate(emulator, prompt="made"), generate(emulator, prompt="plain")
    template = "{name}.{ext}"
    assert destination.occupant(template, {"name": "made"}, "origin-a") is None
    stored = store_image(
        made.image_url,
        destination,
        task_id=made.task_id,
        key_template=template,
        key_fields={"name": "made"},
        origin="origin-a",
    )
    assert destination.occupant(template, {"name": "made"}, "origin-a") == Occupant(
        stored.uri, "origin-a", stored.model_copy(update={"created": False})
    )
    # Another request's object is named, not described.
    assert destination.occupant(template, {"name": "made"}, "origin-b") == Occupant(
        stored.uri, "origin-a", None
    )
    # Without an origin, an object is stored as before, with no record.
    unrecorded = store_image(
        plain.image_url,
        destination,
        task_id=plain.task_id,
        key_template=template,
        key_fields={"name": "plain"},
    )
    assert destination.occupant(template, {"name": "plain"}, "origin-a") == Occupant(
        unrecorded.uri, None, None
    )
    if kind == "s3":  # the record is the object's metadata: the bucket holds only images
        assert bucket.fs().metadata(stored.uri)["journey-sha256"] == stored.sha256
        assert bucket.objects() == ["records/made.png", "records/plain.png"]
    else:
        assert local_files(tmp_path / "records") == ["made.png", "plain.png"]


def test_an_upload_in_parts_records_its_origin_and_is_described_by_reading_it(
    emulator: EmulatorServer, bucket: Bucket
) -> None:
    """A realistic 4K image (tens of MB) generated, downloaded and uploaded in parts to the
    moto server."""
    emulator.admin("config", {"realistic_sizes": True})  # tens of MB: several parts
    try:
        result = generate(emulator, resolution="4K")
        destination = Destination(bucket.url, bucket.storage_options)
        stored = store_image(
            result.image_url, destination, task_id=result.task_id, origin="origin-4k"
        )
    finally:
        emulator.admin("config", {"realistic_sizes": False})
    assert stored.bytes > UPLOAD_PART_SIZE
    found = destination.occupant("{task_id}.{ext}", {"task_id": result.task_id}, "origin-4k")
    assert found == Occupant(stored.uri, "origin-4k", stored.model_copy(update={"created": False}))


def test_a_thumbnail_is_read_back_from_its_object_and_carried_as_a_data_uri(
    bucket: Bucket, tmp_path: Path
) -> None:
    """A JPEG and a PNG in a moto bucket and in a folder, each read back and shrunk; what
    cannot be read, or is too large to read back, has no thumbnail (its artifact links)."""
    from prefect_journey.storage.thumbnails import THUMBNAIL_SOURCE_MAX_BYTES, read_thumbnail

    from .conftest import assert_thumbnail

    for kind, size in (("PNG", (1536, 1024)), ("JPEG", (600, 900))):
        picture = io.BytesIO()
        Image.new("RGB", size, "teal").save(picture, kind)
        data = picture.getvalue()
        places = (Destination(bucket.url, bucket.storage_options), Destination(str(tmp_path)))
        for destination in places:
            fs, root = destination.filesystem()
            fs.pipe_file(f"{root}/x.{kind.lower()}", data)
            stored = StoredImage(
                uri=f"{destination.canonical_url}/x.{kind.lower()}",
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
                format=kind.lower(),
                width=size[0],
                height=size[1],
                task_id="t",
            )
            expected = (256, 171) if kind == "PNG" else (171, 256)
            assert_thumbnail(read_thumbnail(stored, destination) or "", expected)
    gone = stored.model_copy(update={"uri": f"{destination.canonical_url}/missing.png"})
    assert read_thumbnail(gone, destination) is None
    huge = stored.model_copy(update={"bytes": THUMBNAIL_SOURCE_MAX_BYTES + 1})
    assert read_thumbnail(huge, destination) is None
