"""Reliability: concurrent duplicates billed once, locks that outlive no process."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from prefect_journey.campaigns.pipeline import ItemOutcome
from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.flows.generate_and_store import generate_and_store
from prefect_journey.locking import LeasedFileSystemLockManager
from prefect_journey.webhooks import WEBHOOK_PATH, create_webhook_app
from reliability.faulty_s3 import create_proxy
from reliability.soak import (
    READ_TIMEOUT,
    RECOVERY_WINDOW,
    S3_FAULT_RATE,
    WEBHOOK_RETRY_DELAYS,
    configure_faults,
    run_soak,
)

from .conftest import Bucket, process_env

SOAK_SECRET = "whsec-soak-test-9b74c9897bac770ffc029102a200c5de3c7e1f2a8d4b6e0c"


def _hold_and_die(directory: str, key: str) -> None:
    LeasedFileSystemLockManager(Path(directory), lease_seconds=1.0).acquire_lock(key, holder="dead")
    os._exit(0)  # killed: no release, no renewal


def test_a_dead_holders_lock_lapses_and_a_live_one_is_renewed(tmp_path: Path) -> None:
    """A spawned process takes a lock and dies; then a lock is held across more than two 1 s
    leases, so that a renewal must have happened meanwhile."""
    process = multiprocessing.get_context("spawn").Process(
        target=_hold_and_die, args=(str(tmp_path), "k")
    )
    process.start()
    process.join()
    manager = LeasedFileSystemLockManager(tmp_path, lease_seconds=1.0)
    assert manager.is_locked("k")
    assert manager.wait_for_lock("k", timeout=5)  # lapsed within a lease
    assert manager.acquire_lock("k", holder="alive")
    time.sleep(2.5)  # more than two leases: renewed meanwhile
    other = LeasedFileSystemLockManager(tmp_path, lease_seconds=1.0)
    assert other.is_locked("k") and not other.is_lock_holder("k", "someone-else")
    renewer = manager._renewer
    manager.release_lock("k", holder="alive")
    assert not other.is_locked("k")
    assert renewer is not None
    renewer.join(timeout=5)  # its next wake-up finds nothing held, and it ends
    assert not renewer.is_alive()


def test_lock_manager_pickles_as_its_settings(tmp_path: Path) -> None:
    import pickle

    manager = LeasedFileSystemLockManager(tmp_path, lease_seconds=7)
    manager.acquire_lock("k", holder="h")
    copy = pickle.loads(pickle.dumps(manager))
    assert (copy.lock_files_directory, copy.lease_seconds) == (manager.lock_files_directory, 7)
    manager.release_lock("k", holder="h")


def test_the_lease_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect_journey.errors import ConfigurationError
    from prefect_journey.settings import DEFAULT_LEASE_SECONDS, LOCK_LEASE_SECONDS

    LEASE_SECONDS_ENV = LOCK_LEASE_SECONDS.name

    monkeypatch.delenv(LEASE_SECONDS_ENV, raising=False)
    assert LeasedFileSystemLockManager(tmp_path).lease_seconds == DEFAULT_LEASE_SECONDS == 60
    monkeypatch.setenv(LEASE_SECONDS_ENV, "6.5")
    assert LeasedFileSystemLockManager(tmp_path).lease_seconds == 6.5
    assert LeasedFileSystemLockManager(tmp_path, lease_seconds=2).lease_seconds == 2
    for bad in ("0.5", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv(LEASE_SECONDS_ENV, bad)
        with pytest.raises(ConfigurationError, match=LEASE_SECONDS_ENV):
            LeasedFileSystemLockManager(tmp_path)


@pytest.mark.usefixtures("prefect_harness")
def test_concurrent_identical_runs_are_billed_once(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    """Two flow runs at once on the same 1 s image: the second waits for the first's lock, then
    reads its cached result."""
    journey_env.admin("config", {"fixed": 1.0})
    prompt = f"the same image, twice at once #{uuid.uuid4().hex[:8]}"
    results: list[ItemOutcome] = []

    def run() -> None:
        results.extend(generate_and_store(prompt, destination=str(tmp_path)).outcomes)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0].task_id == results[1].task_id
    ledger = journey_env.ledger()
    assert ledger["calls"]["imagine"] == 1 and ledger["credits_charged"] == 4
    assert [p.name for p in tmp_path.rglob("*.png")] == [Path(results[0].uri).name]


@pytest.fixture
def faulty_bucket(bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Bucket, str]]:
    """The bucket behind a proxy that fails 25 % of writes; s3fs reaches it through env."""
    app, _ = create_proxy(bucket.endpoint, S3_FAULT_RATE, seed=3)
    with BackgroundServer(app) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        yield bucket, proxy.url


def test_the_soak_proxy_reports_real_object_sizes(emulator: EmulatorServer, bucket: Bucket) -> None:
    """The proxy once answered every HEAD with Content-Length 0, so an object that already
    existed read as empty and a retry after a lost commit answer became a conflict."""
    from prefect_journey.client import JourneyClient
    from prefect_journey.storage import Destination, store_image

    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        result = client.imagine(prompt="a heron")
    app, _ = create_proxy(bucket.endpoint, rate=0.0)
    with BackgroundServer(app) as proxy:
        through_proxy = Destination(
            bucket.url, {**bucket.storage_options, "endpoint_url": proxy.url}
        )
        first = store_image(result.image_url, through_proxy, task_id=result.task_id)
        again = store_image(result.image_url, through_proxy, task_id=result.task_id)
        fs, _ = through_proxy.filesystem()
        assert fs.info(first.uri)["size"] == first.bytes > 0
    assert first.created and not again.created and again.sha256 == first.sha256


def test_a_commit_whose_answer_was_lost_is_reported_stored(
    emulator: EmulatorServer, bucket: Bucket
) -> None:
    """The 60-item soak once ended with an orphan: a store's last attempt had its commit
    applied, its answer cut and the repeats refused, and the item was reported failed
    although the bucket held its image."""
    from prefect_journey.client import JourneyClient
    from prefect_journey.storage import Destination, store_image

    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        result = client.imagine(prompt="a kingfisher")
    app, _ = create_proxy(bucket.endpoint, rate=0.0, lose_commits=True)
    with BackgroundServer(app) as proxy:
        options = {
            **bucket.storage_options,
            "endpoint_url": proxy.url,
            "config_kwargs": {"retries": {"max_attempts": 2}},  # the repeats fail anyway
        }
        stored = store_image(
            result.image_url, Destination(bucket.url, options), task_id=result.task_id
        )
    image = bucket.fs().cat(f"{bucket.name}/{result.task_id}.png")
    assert stored.sha256 == hashlib.sha256(image).hexdigest()
    assert stored.sha256 == emulator.ledger()["images"][result.task_id]["sha256"]
    assert bucket.objects() == [f"{result.task_id}.png"] and bucket.pending_uploads() == 0


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_soak_60_items_loses_nothing(
    journey_env: EmulatorServer, faulty_bucket: tuple[Bucket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 items through 25 % injected faults (API, CDN, S3): the retry ladder's pauses and the
    waits for deliveries add up to most of a minute."""
    bucket, _ = faulty_bucket
    monkeypatch.setenv("JOURNEY_READ_TIMEOUT", str(READ_TIMEOUT))
    # With a receiver, as `make soak` runs: every lost answer is recovered from its delivery.
    app = create_webhook_app(SOAK_SECRET, api_url=PREFECT_API_URL.value())
    monkeypatch.setattr(journey_env.state.config, "webhook_retry_delays", WEBHOOK_RETRY_DELAYS)
    with BackgroundServer(app) as receiver:
        monkeypatch.setenv("JOURNEY_WEBHOOK_URL", f"{receiver.url}{WEBHOOK_PATH}")
        monkeypatch.setenv("JOURNEY_WEBHOOK_SECRET", SOAK_SECRET)
        monkeypatch.setenv("JOURNEY_RECOVERY_WINDOW", str(RECOVERY_WINDOW))
        configure_faults(journey_env, seed=11)
        result = run_soak(
            60, emulator=journey_env, bucket=bucket.name, s3_fs=bucket.fs(), concurrency=8
        )
    print(result.line())
    assert result.nothing_lost, result.line()
    assert result.stored >= 50  # retries recover almost everything
    assert result.credits_charged == result.emulator_credits  # our ledger matches the bill
    assert sum(result.failures.values()) == 60 - result.stored
    assert result.recovered > 0 and result.possibly_billed == 0, result.line()
    assert result.attempt_records == 0, result.line()  # every attempt settled, none kept


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_killed_campaign_resumes_without_rebilling_or_duplicates(
    journey_env: EmulatorServer, bucket: Bucket, prefect_harness: Path, tmp_path: Path
) -> None:
    """Two campaign processes (each imports Prefect) of 16 images at 0.5 s, two at a time; the
    second waits out the killed run's 5 s leases."""

    journey_env.admin("config", {"fixed": 0.5})
    tag = uuid.uuid4().hex[:8]
    source = tmp_path / "campaign.jsonl"
    source.write_text(
        "\n".join(json.dumps({"prompt": f"resume item {i} #{tag}"}) for i in range(16))
    )
    env = process_env(
        prefect_harness,
        **bucket.env(),
        # The resumed run waits out the killed run's leases on its in-flight images.
        JOURNEY_LOCK_LEASE_SECONDS="5",
    )
    command = [
        sys.executable,
        "flows/batch_campaign.py",
        str(source),
        "--campaign",
        tag,
        "--destination",
        bucket.url,
        "--max-concurrency",
        "2",
    ]
    root = Path(__file__).resolve().parent.parent
    first = subprocess.Popen(
        command, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while len(bucket.objects()) < 5:
        assert first.poll() is None and time.monotonic() < deadline, "campaign did not get going"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # not a clean cancel
    first.wait()
    stored_before = {key: bucket.fs().cat(f"{bucket.name}/{key}") for key in bucket.objects()}
    billed_before = list(journey_env.ledger()["billed_tasks"])
    assert 5 <= len(stored_before) < 16

    second = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "stored=16" in second.stdout
    objects = bucket.objects()
    assert len(objects) == 16 and len(set(objects)) == 16
    for key, data in stored_before.items():  # finished items untouched
        assert bucket.fs().cat(f"{bucket.name}/{key}") == data
    billed_after = journey_env.ledger()["billed_tasks"]
    rebilled = len(billed_after) - len(billed_before)
    # Only items not finished at the kill are generated again: at most the 16 - stored,
    # plus the (at most 2) calls that were in flight when the process died.
    assert rebilled <= 16 - len(stored_before) + 2
    served = journey_env.ledger()["images"]
    final_shas = {
        hashlib.sha256(bucket.fs().cat(f"{bucket.name}/{key}")).hexdigest() for key in objects
    }
    assert final_shas <= {image["sha256"] for image in served.values()}
