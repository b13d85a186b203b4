"""JOURNEY_REDIS_URL: the image locks, the credit budgets and the receiver's memory shared
through a real ``redis-server``, as workers on several machines share them; and the refusals
and failures that keep money safe when the setup cannot."""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prefect import flow

from prefect_journey import policy, settings
from prefect_journey.budget import CreditBudget
from prefect_journey.cache import image_lock_manager
from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.errors import (
    ConfigurationError,
    RedisUnavailableError,
)
from prefect_journey.flows.campaign import batch_campaign
from prefect_journey.locking import LeasedFileSystemLockManager
from prefect_journey.models import ImagineResult
from prefect_journey.redis_locking import LeasedRedisLockManager
from prefect_journey.tasks import imagine
from prefect_journey.tokens import mint_token
from prefect_journey.webhooks import (
    EMIT_DEADLINE,
    WEBHOOK_PATH,
    create_webhook_app,
    delivery_memory,
)
from tools import services

from .conftest import Bucket, free_port, process_env
from .test_campaign_flow import (
    campaign_in_background,
    generated_by_another_run,
    imagine_calls,
    imagine_key,
    items,
    wait_for_calls,
)
from .test_webhooks import KEYS, PROVIDER_SECRET, SECRET, Recorder

ROOT = Path(__file__).resolve().parent.parent


def dead_redis_url() -> str:
    """A Redis URL where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"


# --- Settings --------------------------------------------------------------------------------


def test_the_url_and_prefix_are_read_when_asked_for_and_a_password_is_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNEY_REDIS_URL", raising=False)
    monkeypatch.delenv("JOURNEY_REDIS_PREFIX", raising=False)
    assert settings.redis_url() is None and settings.redis_prefix() == "journey:"
    monkeypatch.setenv("JOURNEY_REDIS_URL", "rediss://app:s3cret-pw@cache.internal:6380/2")
    monkeypatch.setenv("JOURNEY_REDIS_PREFIX", "team-a:")
    assert settings.redis_url() == "rediss://app:s3cret-pw@cache.internal:6380/2"
    assert settings.redis_prefix() == "team-a:"
    assert settings.redacted_url("redis://:pw@h:1/0?password=pw2&db=1") == (
        "redis://:***@h:1/0?password=***&db=1"
    )
    assert settings.redacted_url("redis://h:1/0") == "redis://h:1/0"
    monkeypatch.setenv("JOURNEY_REDIS_URL", "http://app:s3cret-pw@cache.internal:6380")
    with pytest.raises(ConfigurationError, match="JOURNEY_REDIS_URL") as caught:
        settings.redis_url()
    assert "s3cret-pw" not in str(caught.value) and "app:***@" in str(caught.value)


def test_an_unreachable_redis_is_named_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect_journey import coordination

    url = f"redis://app:s3cret-pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailableError, match="JOURNEY_REDIS_URL") as caught:
        coordination.check_reachable(url)
    assert "s3cret-pw" not in str(caught.value) and "app:***@127.0.0.1" in str(caught.value)
    assert not caught.value.possibly_billed and not caught.value.retryable


# --- The image locks -------------------------------------------------------------------------


def test_the_image_locks_are_chosen_by_the_setting(
    redis_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    locks = image_lock_manager()
    assert isinstance(locks, LeasedRedisLockManager) and locks is image_lock_manager()
    assert locks.prefix == os.environ["JOURNEY_REDIS_PREFIX"]
    assert locks.lease_seconds == settings.lock_lease_seconds()
    monkeypatch.delenv("JOURNEY_REDIS_URL")
    assert isinstance(image_lock_manager(), LeasedFileSystemLockManager)


def test_redis_locks_exclude_release_and_live_under_the_prefix(redis_env: str) -> None:
    locks = LeasedRedisLockManager(redis_env, lease_seconds=30)
    other_machine = LeasedRedisLockManager(redis_env, lease_seconds=30)
    key = f"k-{uuid.uuid4().hex}"
    assert locks.acquire_lock(key, "a") and locks.acquire_lock(key, "a")  # taken again: fine
    assert not other_machine.acquire_lock(key, "b", acquire_timeout=0.2)
    assert other_machine.is_locked(key) and not other_machine.is_lock_holder(key, "b")
    assert other_machine.is_lock_holder(key, "a")
    client = redis.Redis.from_url(redis_env)
    assert client.get(f"{os.environ['JOURNEY_REDIS_PREFIX']}lock:{key}") == b"a"
    assert 29_000 < client.pttl(f"{os.environ['JOURNEY_REDIS_PREFIX']}lock:{key}") <= 30_000
    with pytest.raises(ValueError, match="No lock held by b"):
        other_machine.release_lock(key, "b")
    locks.release_lock(key, "a")
    assert not locks.is_locked(key) and other_machine.wait_for_lock(key, timeout=1)
    assert other_machine.acquire_lock(key, "b", acquire_timeout=0)
    other_machine.release_lock(key, "b")


def test_a_lock_taken_on_a_loop_is_released_from_sync_code(redis_env: str) -> None:
    """Prefect's async task engine takes the lock with aacquire_lock and releases it with the
    sync release_lock; prefect-redis's own manager then leaves the lock in Redis for ever."""
    locks = LeasedRedisLockManager(redis_env, lease_seconds=30)
    key = f"k-{uuid.uuid4().hex}"

    async def take() -> bool:
        return await locks.aacquire_lock(key, "engine")

    assert asyncio.run(take()) and asyncio.run(take())  # each sync task runs its own loop
    locks.release_lock(key, "engine")
    assert not locks.is_locked(key)

    async def wait_while_held() -> tuple[bool, bool]:
        locks.acquire_lock(key, "other")
        held = await locks.await_for_lock(key, timeout=0.3)
        locks.release_lock(key, "other")
        return held, await locks.await_for_lock(key, timeout=1)

    assert asyncio.run(wait_while_held()) == (False, True)


def _hold_and_die(url: str, prefix: str, key: str) -> None:
    LeasedRedisLockManager(url, prefix=prefix, lease_seconds=1.0).acquire_lock(key, "dead")
    os._exit(0)  # killed: no release, no renewal


def test_a_dead_holders_redis_lock_lapses_and_a_live_one_is_renewed(redis_env: str) -> None:
    """A spawned process takes a lock and dies; then a lock is held across more than two 1 s
    leases, so that a renewal must have happened meanwhile."""
    prefix = os.environ["JOURNEY_REDIS_PREFIX"]
    process = multiprocessing.get_context("spawn").Process(
        target=_hold_and_die, args=(redis_env, prefix, "k")
    )
    process.start()
    process.join()
    locks = LeasedRedisLockManager(redis_env, lease_seconds=1.0)
    assert locks.is_locked("k")
    assert locks.wait_for_lock("k", timeout=5)  # lapsed within a lease
    assert locks.acquire_lock("k", "alive")
    time.sleep(2.5)  # more than two leases: renewed meanwhile
    assert locks.is_lock_holder("k", "alive")
    locks.release_lock("k", "alive")
    assert not locks.is_locked("k")


def test_a_lock_lost_with_a_restarted_redis_is_taken_again(tmp_path: Path) -> None:
    """A Redis restarted without its data forgets the locks; the holder's next renewal takes
    its lock again, so that another run does not pay for the image meanwhile."""
    server = services.redis_server(tmp_path).start()
    try:
        locks = LeasedRedisLockManager(server.url, prefix="t:", lease_seconds=1.0)
        assert locks.acquire_lock("k", "holder")
        server.stop()
        server.start()
        deadline = time.monotonic() + 10
        while not locks.is_lock_holder("k", "holder"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not LeasedRedisLockManager(server.url, prefix="t:").acquire_lock(
            "k", "another run", acquire_timeout=0
        )
        locks.release_lock("k", "holder")
    finally:
        server.stop()


def test_the_redis_lock_manager_pickles_as_its_settings(redis_env: str) -> None:
    import pickle

    locks = LeasedRedisLockManager(redis_env, prefix="p:", lease_seconds=7)
    copy = pickle.loads(pickle.dumps(locks))
    assert (copy.url, copy.prefix, copy.lease_seconds) == (redis_env, "p:", 7)
    selected = pickle.loads(pickle.dumps(image_lock_manager()))
    assert isinstance(selected, LeasedRedisLockManager)


def test_an_unreachable_redis_fails_the_lock_and_its_release_lapses_instead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = services.redis_server(tmp_path).start()
    locks = LeasedRedisLockManager(server.url, prefix="t:", lease_seconds=30)
    assert locks.acquire_lock("k", "holder")
    server.stop()
    with pytest.raises(RedisUnavailableError, match="so its call was not made"):
        locks.acquire_lock("other", "holder")
    locks.release_lock("k", "holder")  # lapses after its lease, without failing the run
    assert "lapses" in caplog.text


# --- The credit budget -----------------------------------------------------------------------


def test_a_budget_whose_redis_is_gone_starts_no_call_and_leaves_settling_to_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = services.redis_server(tmp_path).start()
    monkeypatch.setenv("JOURNEY_REDIS_URL", server.url)
    budget = CreditBudget.for_campaign("gone", limit=40)
    held = budget.reserve()
    server.stop()
    budget.settle(held, None)  # the call was made: not failed for a settlement
    assert "counts the call as spent" in caplog.text
    with pytest.raises(RedisUnavailableError, match="so the call was not made") as caught:
        budget.reserve()
    assert not caught.value.possibly_billed and not caught.value.retryable
    assert budget.this_run["calls"] == 1 and budget.this_run["spent"] == 4


# --- Runs: the task engine and the campaigns -------------------------------------------------


@flow
def one_image(prompt: str) -> ImagineResult:
    return imagine({"prompt": prompt})


def imagine_flow_in_background(prompt: str) -> tuple[threading.Thread, list[ImagineResult]]:
    """:func:`one_image` started on a thread (in a copy of this one's context, so it sees the
    test's Prefect settings); its result lands in the list."""
    results: list[ImagineResult] = []
    context = contextvars.copy_context()
    thread = threading.Thread(target=lambda: context.run(lambda: results.append(one_image(prompt))))
    thread.start()
    return thread, results


@pytest.mark.parametrize(
    ("setup", "refusal", "naming"),
    [
        ("local result storage", ConfigurationError, "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"),
        ("Redis not answering", RedisUnavailableError, "JOURNEY_REDIS_URL"),
    ],
)
def test_a_setup_that_cannot_pay_once_is_refused_before_any_call(
    setup: str,
    refusal: type[Exception],
    naming: str,
    journey_env: EmulatorServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """JOURNEY_REDIS_URL with a result storage local to the worker, or with a Redis that does
    not answer: the campaign and the ``imagine`` task both stop before any call, with an
    error that names the setting to change. Over 5 s on a busy machine: two flow runs on a
    real Prefect server, and a Redis not answering is tried again for about a second
    (policy.REDIS_RETRIES)."""
    if setup == "local result storage":
        request.getfixturevalue("prefect_harness")
        request.getfixturevalue("redis_env")
    else:
        request.getfixturevalue("shared_results")
        monkeypatch.setenv("JOURNEY_REDIS_URL", dead_redis_url())
    with pytest.raises(refusal, match=naming):
        batch_campaign(items=items(2), destination=str(tmp_path))
    with pytest.raises(refusal, match=naming):
        one_image(f"a lighthouse #{uuid.uuid4().hex[:8]}")
    assert imagine_calls(journey_env) == 0


@pytest.mark.usefixtures("shared_results")
def test_an_image_another_machine_locked_in_redis_is_waited_for_by_the_task_and_the_campaign(
    journey_env: EmulatorServer, redis_env: str, tmp_path: Path
) -> None:
    """Another machine (its own lock manager on the same Redis) holds an image's lock: the
    campaign generates the rest, and both it and an ``imagine`` task wait for that image,
    then read the record the other machine left in the shared result storage."""
    batch = items(3)
    key = imagine_key(batch[0], journey_env)
    other_machine = LeasedRedisLockManager(redis_env)
    assert other_machine.acquire_lock(key, "another run")
    try:
        campaign, reports = campaign_in_background(items=batch, destination=str(tmp_path))
        task, results = imagine_flow_in_background(batch[0]["prompt"])
        wait_for_calls(journey_env, 2, campaign)  # every image but the held one
        time.sleep(0.5)  # time enough to pay for the held image too, were they not waiting
        assert imagine_calls(journey_env) == 2 and campaign.is_alive() and task.is_alive()
        generated_by_another_run(batch[0], journey_env)
    finally:
        other_machine.release_lock(key, "another run")
        campaign.join(timeout=120)
        task.join(timeout=120)
    [report] = reports
    assert (report.stored, report.cache_hits, report.calls) == (3, 1, 2)
    [result] = results
    assert result.task_id == report.outcomes[0].task_id
    assert imagine_calls(journey_env) == 3  # two by the campaign, one by the other machine


@pytest.mark.usefixtures("shared_results", "redis_env")
def test_two_campaigns_and_a_task_at_once_pay_once_per_image_through_redis(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    """Two runs of one campaign and an ``imagine`` task of its first image, all at once, on
    0.5 s generations: each image is generated once and both runs store all of them."""
    journey_env.state.config.latency.fixed = 0.5
    batch = items(4)
    runs = [
        campaign_in_background(items=batch, destination=str(tmp_path / f"run-{n}"))
        for n in range(2)
    ]
    task, results = imagine_flow_in_background(batch[0]["prompt"])
    for thread, _ in runs:
        thread.join(timeout=120)
    task.join(timeout=120)
    reports = [report for _, [report] in runs]
    assert [report.stored for report in reports] == [4, 4]
    first_images = {report.outcomes[0].task_id for report in reports} | {results[0].task_id}
    assert len(first_images) == 1  # one image, whoever paid for it
    assert imagine_calls(journey_env) == 4


def test_redis_gone_mid_run_fails_the_items_left_and_nothing_is_paid_twice_when_it_is_back(
    journey_env: EmulatorServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shared_results: str,
) -> None:
    """Redis stops after two of five 0.5 s generations: no call starts without its lock and
    reservation, the items left fail saying Redis did not answer, the image in flight is
    recorded and stored; once Redis is back (empty: it kept nothing), a re-run pays for the
    failed items only. Over 5 s: each operation on the stopped Redis is tried again for about
    a second before it fails (policy.REDIS_RETRIES), and the campaign runs twice."""
    server = services.redis_server(tmp_path / "redis").start()
    monkeypatch.setenv("JOURNEY_REDIS_URL", server.url)
    journey_env.state.config.latency.fixed = 0.5
    batch = items(5)
    try:
        campaign, reports = campaign_in_background(
            items=batch, destination=str(tmp_path / "out"), max_concurrency=1, allow_failures=True
        )
        wait_for_calls(journey_env, 2, campaign)
        server.stop()
        campaign.join(timeout=120)
        [report] = reports
        failed = [o for o in report.outcomes if o.status != "stored"]
        assert failed and all("RedisUnavailableError" in (o.reason or "") for o in failed)
        assert imagine_calls(journey_env) == report.stored  # every image paid is stored
        server.start()
        again = batch_campaign(items=batch, destination=str(tmp_path / "out"))
        assert again.stored == 5 and again.calls == len(failed)
        assert imagine_calls(journey_env) == 5
    finally:
        server.stop()


# --- The receiver's memory -------------------------------------------------------------------


class SlowRecorder(Recorder):
    """Takes a while to emit, so that two receivers handle one delivery at the same time."""

    def __call__(
        self, event: str, resource: dict[str, str], payload: dict[str, Any], event_id: uuid.UUID
    ) -> bool:
        time.sleep(0.3)
        return super().__call__(event, resource, payload, event_id)


def test_two_receivers_sharing_redis_emit_each_delivery_once_and_bind_each_token_once(
    redis_env: str,
) -> None:
    """Two receivers behind one URL (each its own process memory, one Redis): a delivery
    that reaches both at once, a replay to either, a token reused on the other, a receiver
    restarted; each delivery is emitted once."""
    first, second = SlowRecorder(), SlowRecorder()
    signed = {"x-webhook-secret": PROVIDER_SECRET}
    task = {"task_id": "t-1", "status": "finished", "image_url": "https://cdn.example.com/1.png"}
    token = mint_token(KEYS.token_key)
    with (
        BackgroundServer(create_webhook_app(SECRET, emit=first)) as a,
        BackgroundServer(create_webhook_app(SECRET, emit=second)) as b,
    ):
        urls = [f"{a.url}{WEBHOOK_PATH}/{token}", f"{b.url}{WEBHOOK_PATH}/{token}"]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda url: httpx.post(url, json=task, headers=signed), urls))
        assert sorted(answer.status_code for answer in answers) == [200, 200]
        assert {"duplicate": True} in [answer.json() for answer in answers]
        assert httpx.post(urls[0], json=task, headers=signed).json() == {"duplicate": True}
        other_task = {**task, "task_id": "t-2"}
        assert httpx.post(urls[1], json=other_task, headers=signed).status_code == 409
        another = f"{b.url}{WEBHOOK_PATH}/{mint_token(KEYS.token_key)}"
        assert httpx.post(another, json=task, headers=signed).status_code == 409
    assert len(first.events) + len(second.events) == 1
    restarted = Recorder()
    with BackgroundServer(create_webhook_app(SECRET, emit=restarted)) as c:
        url = f"{c.url}{WEBHOOK_PATH}/{token}"
        assert httpx.post(url, json=task, headers=signed).json() == {"duplicate": True}
    assert restarted.events == []


def test_a_delivery_not_emitted_is_left_to_the_other_receiver_and_claims_are_short(
    redis_env: str,
) -> None:
    failing, working = Recorder(), Recorder()
    failing.fail_next = True
    signed = {"x-webhook-secret": PROVIDER_SECRET}
    task = {"task_id": "t-3", "status": "finished", "image_url": "https://cdn.example.com/3.png"}
    with (
        BackgroundServer(create_webhook_app(SECRET, emit=failing)) as a,
        BackgroundServer(create_webhook_app(SECRET, emit=working)) as b,
    ):
        assert httpx.post(f"{a.url}{WEBHOOK_PATH}", json=task, headers=signed).status_code == 503
        assert httpx.post(f"{b.url}{WEBHOOK_PATH}", json=task, headers=signed).status_code == 200
    assert failing.events == [] and len(working.events) == 1
    # A claim lapses soon, so a receiver killed while emitting leaves nothing behind; a kept
    # delivery lasts past the provider's last retry.
    client = redis.Redis.from_url(redis_env)
    prefix = os.environ["JOURNEY_REDIS_PREFIX"]
    memory = delivery_memory()

    async def claim() -> None:
        assert await memory.add("claimed") is None and await memory.add("claimed") == ""
        assert await memory.add("kept", "v") is None
        await memory.keep(["kept"])

    asyncio.run(claim())
    claim_ms, memory_ms = (
        policy.DELIVERY_CLAIM_SECONDS * 1000,
        policy.DELIVERY_MEMORY_SECONDS * 1000,
    )
    assert 0 < client.pttl(f"{prefix}delivery:claimed") <= claim_ms
    assert claim_ms < client.pttl(f"{prefix}delivery:kept") <= memory_ms
    assert policy.DELIVERY_CLAIM_SECONDS > EMIT_DEADLINE


def test_a_receiver_whose_redis_is_gone_asks_the_provider_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNEY_REDIS_URL", dead_redis_url())
    with pytest.raises(RedisUnavailableError, match="at the start, so nothing was started"):
        create_webhook_app(SECRET, emit=Recorder())
    server = services.redis_server(tmp_path).start()
    monkeypatch.setenv("JOURNEY_REDIS_URL", server.url)
    recorder = Recorder()
    try:
        with BackgroundServer(create_webhook_app(SECRET, emit=recorder)) as receiver:
            server.stop()
            task = {"task_id": "t-4", "status": "failed"}
            answer = httpx.post(
                f"{receiver.url}{WEBHOOK_PATH}",
                json=task,
                headers={"x-webhook-secret": PROVIDER_SECRET},
            )
    finally:
        server.stop()
    assert answer.status_code == 503 and recorder.events == []


# --- Two machines ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("images_per_task_run", [1, 4])
def test_two_machines_running_one_campaign_at_once_pay_once_per_image(
    journey_env: EmulatorServer,
    redis_env: str,
    shared_results: str,
    bucket: Bucket,
    tmp_path: Path,
    images_per_task_run: int,
) -> None:
    """Two processes, each with its own Prefect home (two worker machines), sharing the
    Prefect server, Redis, the result storage and the destination bucket, run the same
    8-image campaign at once on 3 s generations, two at a time, one from each end of the
    list: they meet in the middle, so each pays for some images and waits for or reads the
    others'. Each image is generated once and stored once, and both runs report every image
    stored. Slow: two Python processes import Prefect and run a flow each."""
    journey_env.state.config.latency.fixed = 3.0
    prompts = [f"two machines {i} {uuid.uuid4().hex[:8]}" for i in range(8)]
    machines = []
    for n, order in enumerate([prompts, prompts[::-1]]):
        rows = [{"prompt": prompt} for prompt in order]
        command = [
            sys.executable,
            "-c",
            "from prefect_journey.flows.campaign import batch_campaign; "
            f"report = batch_campaign(items={rows!r}, campaign='two machines', "
            f"destination={bucket.url!r}, key_template='{{campaign}}/{{slug}}.{{ext}}', "
            f"max_concurrency=2, images_per_task_run={images_per_task_run}); "
            "print(report.stored, report.calls)",
        ]
        home = tmp_path / f"machine-{n}"
        env = process_env(
            home / "storage",
            PREFECT_HOME=str(home),
            PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=shared_results,
            **bucket.env(),
        )
        machines.append(
            subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        )
    outputs = [machine.communicate(timeout=300)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs
    stored, calls = zip(*(map(int, out.split()[-2:]) for out in outputs), strict=True)
    # Between them, each image once. Which machine pays for how many is the clock's: on a
    # loaded machine one of them can start so late that the other has paid for all.
    assert stored == (8, 8) and sum(calls) == 8
    ledger = journey_env.ledger()
    assert ledger["calls"]["imagine"] == 8 and ledger["credits_charged"] == 32
    images = [key for key in bucket.objects() if not key.startswith("results/")]
    assert len(images) == 8 and all(key.startswith("two-machines/") for key in images)


@pytest.fixture
def redis_block(redis_server: str, monkeypatch: pytest.MonkeyPatch, prefect_harness: Path) -> str:
    """A saved ``JourneyRedis`` block naming the session's Redis, with a password-free URL, a
    prefix and a lease of this test's own, named by ``JOURNEY_REDIS_BLOCK``; no Redis variable
    set. Returns the prefix."""
    from prefect_journey.redis_block import JourneyRedis

    prefix = f"block-{uuid.uuid4().hex[:12]}:"
    name = f"redis-{uuid.uuid4().hex[:12]}"
    JourneyRedis(url=redis_server, prefix=prefix, lock_lease_seconds=7).save(name)
    # Empty reads as unset, and the test's end restores each: the block sets them for the
    # whole process.
    for variable in (settings.REDIS_URL, settings.REDIS_PREFIX, settings.LOCK_LEASE_SECONDS):
        monkeypatch.setenv(variable.name, "")
    monkeypatch.setenv("JOURNEY_REDIS_BLOCK", name)
    return prefix


def test_a_redis_block_names_the_redis_of_the_locks_the_budgets_and_the_receiver(
    redis_block: str, redis_server: str
) -> None:
    """The first lock of the process loads the block; the budget and the receiver's memory
    then read the same Redis, prefix and lease."""
    locks = image_lock_manager()
    assert isinstance(locks, LeasedRedisLockManager)
    assert (locks.prefix, locks.lease_seconds) == (redis_block, 7.0)
    assert settings.redis_url() == redis_server
    server = redis.Redis.from_url(redis_server)
    assert locks.acquire_lock("an image", "me")
    assert server.exists(f"{redis_block}lock:an image")
    locks.release_lock("an image", "me")
    budget = CreditBudget.for_campaign("blocked", limit=8)
    budget.settle(budget.reserve(lease=30), None)
    assert budget.snapshot()["spent"] == 4
    assert server.keys(f"{redis_block}budget:*")
    assert type(delivery_memory()).__name__ == "_SharedSeen"


def test_a_redis_variable_on_the_worker_wins_over_the_block(
    redis_block: str, redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNEY_REDIS_BLOCK", "no-such-block")  # never loaded
    monkeypatch.setenv("JOURNEY_REDIS_URL", redis_server)
    monkeypatch.setenv("JOURNEY_REDIS_PREFIX", "mine:")
    locks = image_lock_manager()
    assert isinstance(locks, LeasedRedisLockManager) and locks.prefix == "mine:"


def test_a_redis_block_refuses_a_url_that_is_not_redis_without_showing_it() -> None:
    from pydantic import ValidationError

    from prefect_journey.redis_block import JourneyRedis

    with pytest.raises(ValidationError) as refused:
        JourneyRedis(url="https://app:s3cret-pw@cache.internal:6380/2")
    assert "s3cret-pw" not in str(refused.value)
    block = JourneyRedis(url="redis://app:s3cret-pw@cache.internal:6380/2")
    assert "s3cret-pw" not in repr(block) and "s3cret-pw" not in str(block.model_dump())
