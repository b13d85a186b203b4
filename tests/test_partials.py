"""Unfinished writes: a store clears what dead writers left, never what a live one holds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest

from prefect_journey.client import JourneyClient
from prefect_journey.emulator import EmulatorServer
from prefect_journey.models import ImagineResult
from prefect_journey.partials import open_partial, stale_uploads
from prefect_journey.storage import Destination, astore_image, store_image

from .conftest import Bucket, process_env

ROOT = Path(__file__).resolve().parent.parent


def generate(emulator: EmulatorServer, **fields: object) -> ImagineResult:
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        return client.imagine(prompt=f"partials {uuid.uuid4().hex[:6]}", **fields)  # type: ignore[arg-type]


def partial_files(folder: Path) -> list[str]:
    """The partial files of stores under ``folder`` (``.<name>.<32 hex>.part``)."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob(".*.part")
        if re.fullmatch(r"\..+\.[0-9a-f]{32}\.part", p.name)
    )


def dead_partial(folder: Path, name: str, age: float = 0.0) -> Path:
    """What a killed writer leaves: a partial file nobody holds, ``age`` seconds old."""
    path = folder / f".{name}.{uuid.uuid4().hex}.part"
    path.write_bytes(b"\x89PNG half an image")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_a_store_clears_dead_partials_of_its_key_and_stale_ones_in_its_folder(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNEY_PARTIAL_LEASE_SECONDS", "600")
    result = generate(emulator)
    name = f"{result.task_id}.png"
    own_dead = dead_partial(tmp_path, name)  # fresh, but its writer is gone
    other_stale = dead_partial(tmp_path, "other.png", age=601)
    other_fresh = dead_partial(tmp_path, "other.png", age=10)  # maybe a writer elsewhere
    not_ours = tmp_path / ".notes.part"
    not_ours.write_text("a user's file")
    live_path, live = open_partial(str(tmp_path), name)  # a live writer of the same key
    old = time.time() - 3600
    os.utime(live_path, (old, old))
    try:
        store_image(result.image_url, str(tmp_path), task_id=result.task_id)
        assert not own_dead.exists() and not other_stale.exists()
        assert other_fresh.exists() and not_ours.exists()
        assert Path(live_path).exists()  # held: never removed, however old
    finally:
        live.close()  # as a killed writer: its file stays, its lock goes
    other_fresh.unlink()
    store_image(result.image_url, str(tmp_path), task_id=result.task_id)  # a re-run
    assert partial_files(tmp_path) == []
    assert {p.name for p in tmp_path.iterdir()} == {name, ".notes.part"}


def s3(bucket: Bucket) -> object:
    return boto3.client(
        "s3",
        endpoint_url=bucket.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def test_a_store_aborts_stale_uploads_of_its_key_only(
    emulator: EmulatorServer, bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto dates every upload 2010-11-10, so here each is stale; the lease's decision is
    :func:`test_only_uploads_begun_a_lease_ago_are_stale`'s."""
    result = generate(emulator)
    key = f"{result.task_id}.png"
    client = s3(bucket)
    stale = client.create_multipart_upload(Bucket=bucket.name, Key=key)  # type: ignore[attr-defined]
    client.create_multipart_upload(Bucket=bucket.name, Key=f"{key}.other")  # type: ignore[attr-defined]
    destination = Destination(bucket.url, bucket.storage_options)
    store_image(result.image_url, destination, task_id=result.task_id)
    uploads = client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])  # type: ignore[attr-defined]
    assert [u["Key"] for u in uploads] == [f"{key}.other"]
    assert stale["UploadId"] not in {u["UploadId"] for u in uploads}
    assert bucket.objects() == [key]


def test_only_uploads_begun_a_lease_ago_are_stale() -> None:
    now = datetime.now(UTC)
    uploads = [
        {"Key": "a.png", "UploadId": "dead", "Initiated": now - timedelta(seconds=301)},
        {"Key": "a.png", "UploadId": "live", "Initiated": now - timedelta(seconds=30)},
        {"Key": "a.png.bak", "UploadId": "other key", "Initiated": now - timedelta(days=9)},
    ]
    assert stale_uploads(uploads, "a.png", now - timedelta(seconds=300)) == ["dead"]


def test_a_cancelled_store_aborts_its_upload(
    emulator: EmulatorServer, bucket: Bucket, tmp_path: Path
) -> None:
    """A 7 MB image served slowly, so the upload in parts has begun when the task is
    cancelled."""
    emulator.admin("config", {"realistic_sizes": True, "cdn_chunk_delay": 0.02})
    result = generate(emulator, resolution="2K")
    destination = Destination(bucket.url, bucket.storage_options)

    async def cancel_mid_upload() -> None:
        store = asyncio.ensure_future(
            astore_image(result.image_url, destination, task_id=result.task_id)
        )
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(bucket.pending_uploads) == 0:
            assert not store.done() and time.monotonic() < deadline, "no upload began"
        store.cancel()
        with pytest.raises(asyncio.CancelledError):
            await store

    asyncio.run(cancel_mid_upload())
    deadline = time.monotonic() + 30
    while bucket.pending_uploads():  # the abort runs on in its thread
        assert time.monotonic() < deadline, "the upload was left pending"
        time.sleep(0.05)
    assert bucket.objects() == []


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_a_campaign_killed_during_downloads_leaves_nothing_behind(
    where: str,
    journey_env: EmulatorServer,
    bucket: Bucket,
    prefect_harness: Path,
    tmp_path: Path,
) -> None:
    """Two campaign processes (each imports Prefect); the first is killed (SIGKILL) while its
    7 MB downloads stream slowly, the second stores the rest: about 20 s each way."""

    journey_env.admin("config", {"fixed": 0.2, "realistic_sizes": True, "cdn_chunk_delay": 0.05})
    tag = uuid.uuid4().hex[:8]
    source = tmp_path / "campaign.jsonl"
    rows = [{"prompt": f"killed store {i} #{tag}", "resolution": "2K"} for i in range(4)]
    source.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "out"
    destination = str(out) if where == "folder" else bucket.url

    def leftovers() -> int:
        return len(partial_files(out)) if where == "folder" else bucket.pending_uploads()

    def stored() -> list[str]:
        if where == "bucket":
            return bucket.objects()
        return sorted(str(p) for p in out.rglob("*") if p.is_file() and p.suffix != ".part")

    env = process_env(
        prefect_harness,
        **bucket.env(),
        # The second run waits out the killed run's image locks, and takes its uploads,
        # begun seconds before, for a dead writer's (no other run stores these images).
        JOURNEY_LOCK_LEASE_SECONDS="2",
        JOURNEY_PARTIAL_LEASE_SECONDS="1",
    )
    command = [
        sys.executable,
        "flows/batch_campaign.py",
        str(source),
        "--campaign",
        tag,
        "--destination",
        destination,
        "--max-concurrency",
        "2",
    ]
    first = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while leftovers() == 0:
        assert first.poll() is None and time.monotonic() < deadline, "no download began"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert leftovers() >= 1 and len(stored()) < 4

    journey_env.admin("config", {"cdn_chunk_delay": 0.0})
    second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "stored=4" in second.stdout
    assert len(stored()) == 4
    assert leftovers() == 0
