"""The campaign flows (batch_campaign, abatch_campaign) in both executors: fan-out, limits,
budgets, reporting and Dask, under a real Prefect server."""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import threading
import time
import uuid
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from prefect_journey import ImageDestination, JourneyClient
from prefect_journey.cache import cache_result, imagine_cache_key, record_store
from prefect_journey.emulator import EmulatorServer
from prefect_journey.flows.campaign import (
    CampaignReport,
    abatch_campaign,
    batch_campaign,
    price_campaign,
)
from prefect_journey.models import ImagineRequest
from prefect_journey.tasks import imagine

from . import prefect_api
from .conftest import Bucket, assert_thumbnail

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("prefect_harness")


# The two executors of the campaign pipeline, a task run per image (the default) and several
# images per task run, keep the same promises.
BOTH_MODES = pytest.mark.parametrize("images_per_task_run", [1, 3])


def items(n: int, tag: str | None = None) -> list[dict[str, Any]]:
    tag = tag or uuid.uuid4().hex[:8]
    return [
        {"prompt": f"product {i} on a white background #{tag}", "sku": f"sku-{i}"}
        for i in range(1, n + 1)
    ]


def imagine_calls(emulator: EmulatorServer) -> int:
    return int(emulator.ledger()["calls"].get("imagine", 0))


@pytest.fixture
def destination_block(bucket: Bucket) -> str:
    name = f"batch-{bucket.name}"
    ImageDestination(url=bucket.url, storage_options=bucket.storage_options).save(
        name, overwrite=True
    )
    return name


@pytest.mark.slow  # scale: a hundred items through a real server
def test_hundred_items_stored_exactly_once_and_reported(
    journey_env: EmulatorServer, bucket: Bucket, destination_block: str
) -> None:
    """A hundred images, each its own task run on a real Prefect server (the run chooses it
    at this concurrency), then the task runs, the artifacts and the events read back from
    its API."""
    state = batch_campaign(
        items=items(100),
        campaign="Spring 100",
        destination_block=destination_block,
        max_concurrency=8,
        return_state=True,
    )
    report: CampaignReport = state.result()
    assert (report.stored, report.failed, report.calls, report.credits_charged) == (
        100,
        0,
        100,
        400,
    )
    objects = bucket.objects()
    assert len(objects) == 100 and all(o.startswith("spring-100/") for o in objects)
    assert sorted(o.uri.removeprefix(f"s3://{bucket.name}/") for o in report.outcomes) == objects
    ledger = journey_env.ledger()
    assert ledger["credits_charged"] == 400 and ledger["peak_concurrency"] <= 8

    run_ids = [prefect_api.flow_run_id(state)]
    # One flow run: the task runs are the campaign's own, not a subflow's.
    assert prefect_api.flow_runs_of_parent(run_ids[0]) == []
    # 101 task runs: one per image, named after its row and prompt, and the assets.
    runs = prefect_api.task_runs(run_ids, at_least=101)
    assert len(runs) == 101
    assert sum(r.name.startswith("image ") for r in runs) == 100
    artifacts = prefect_api.artifacts(run_ids)
    [table] = [a for a in artifacts if a.type == "table"]
    rows = table.data if isinstance(table.data, list) else __import__("json").loads(table.data)
    assert sorted(r["uri"].removeprefix(f"s3://{bucket.name}/") for r in rows) == objects
    assert {r["status"] for r in rows} == {"stored"}
    # One image artifact per stored object, none for anything else. Counted by object, not
    # in total: Prefect's client sends a POST again after a read timeout or a 503 from a busy
    # SQLite server, which can record an artifact twice.
    image_uris = {
        a.description.split("\n\n")[1].split(" (")[0] for a in artifacts if a.type == "image"
    }
    assert image_uris == {f"s3://{bucket.name}/{o}" for o in objects}
    [progress] = [a for a in artifacts if a.type == "progress"]
    assert float(progress.data) == 100.0
    assert progress.description == (
        "campaign Spring 100: stored 100 · cache hits 0 · failed 0 · left 0 · 400 credits"
    )
    [run] = prefect_api.flow_runs(run_ids)
    assert run.name == "campaign: Spring 100 · 100 items"  # not a random "cyber-shark"
    # The gallery is bounded: the first 24, and where the rest are.
    [gallery] = [a for a in artifacts if a.type == "markdown"]
    assert gallery.data.count("](data:image/jpeg;base64,") == 24
    assert "24 of the 100 images this run stored" in gallery.data
    assert "spring-100-summary" in gallery.data
    # Prefect's "timeout cannot interrupt a worker thread" notice is filtered for our tasks
    # (they are designed around it); other warnings still get through.
    assert not [m for m in prefect_api.logs(run_ids) if "cannot interrupt" in m]
    wait_for_stored_events(report)


def wait_for_stored_events(report: CampaignReport) -> None:
    """Every stored image's ``journey.image.stored`` event reaches the API."""
    stored_ids = {f"journey.image.{o.task_id}" for o in report.outcomes}

    def all_events_arrived() -> bool:
        events = prefect_api.events("journey.image.stored")
        return stored_ids <= {e["resource"]["prefect.resource.id"] for e in events}

    deadline = time.monotonic() + 30  # events are delivered asynchronously
    while not all_events_arrived():
        assert time.monotonic() < deadline, "journey.image.stored events missing"
        time.sleep(0.5)


def test_images_per_task_run_stores_each_image_once_in_a_few_task_runs(
    journey_env: EmulatorServer, bucket: Bucket, destination_block: str
) -> None:
    """30 images of 0.2 s, six at a time, through a 503, a possibly-billed 500 (retried after
    the ladder's first pause, 2 s +/- 50 %) and a truncated download."""
    batch = items(30)
    journey_env.admin("config", {"fixed": 0.2})
    # Retried inside the chunk: not billed, possibly billed, a truncated download.
    journey_env.admin("faults", {"queue": {"api": ["503", "500"], "cdn": ["truncate"]}})
    state = batch_campaign(
        items=batch,
        campaign="Chunked",
        destination_block=destination_block,
        max_concurrency=6,
        images_per_task_run=8,
        return_state=True,
    )
    report: CampaignReport = state.result()
    assert (report.stored, report.failed, report.calls) == (30, 0, 32)
    assert report.possibly_billed_retries == 1 and imagine_calls(journey_env) == 32
    assert sum(o.attempts for o in report.outcomes) == 32
    objects = bucket.objects()
    assert len(objects) == 30 and bucket.pending_uploads() == 0
    assert sorted(o.uri.removeprefix(f"s3://{bucket.name}/") for o in report.outcomes) == objects
    assert journey_env.ledger()["peak_concurrency"] <= 6

    run_id = prefect_api.flow_run_id(state)
    names = sorted(run.name for run in prefect_api.task_runs([run_id]))
    assert names[0].startswith("assets: ") and names[1:] == [
        "images: rows 1-8",
        "images: rows 17-24",
        "images: rows 25-30",
        "images: rows 9-16",
    ]
    artifacts = prefect_api.artifacts([run_id])
    assert sum(a.type == "image" for a in artifacts) == 30
    [progress] = [a for a in artifacts if a.type == "progress"]
    assert float(progress.data) == 100.0
    logs = prefect_api.logs([run_id])
    assert sum("imagine attempt 1 failed" in m for m in logs) == 2
    assert sum("store attempt 1 failed" in m for m in logs) == 1
    wait_for_stored_events(report)

    # The chunks wrote the same cache records as the per-image tasks: a re-run either way
    # is free and runs nothing.
    state = batch_campaign(
        items=batch, campaign="Chunked", destination_block=destination_block, return_state=True
    )
    report = state.result()
    assert (report.stored, report.cache_hits, report.calls) == (30, 30, 0)
    assert prefect_api.task_runs([prefect_api.flow_run_id(state)]) == []
    assert imagine_calls(journey_env) == 32


@BOTH_MODES
def test_async_flow_runs_the_same_campaign(
    journey_env: EmulatorServer, bucket: Bucket, destination_block: str, images_per_task_run: int
) -> None:
    """Two campaign runs of the async flow, each with Prefect's per-run start-up."""
    # Same parameters, so a deployment of either shows the same form.
    assert abatch_campaign.parameters == batch_campaign.parameters
    batch = items(6)
    state = asyncio.run(
        abatch_campaign(
            items=batch,
            campaign="Async",
            destination_block=destination_block,  # a Block.load on the flow's worker thread
            max_concurrency=3,
            images_per_task_run=images_per_task_run,
            return_state=True,
        )
    )
    report: CampaignReport = state.result()
    assert (report.stored, report.failed, report.calls, report.credits_charged) == (6, 0, 6, 24)
    assert len(bucket.objects()) == 6
    run_id = prefect_api.flow_run_id(state)
    # The flow-level artifacts are created, not left as coroutines nobody awaits.
    artifacts = prefect_api.artifacts([run_id])
    assert {a.type for a in artifacts} == {"table", "progress", "image", "markdown"}
    assert sum(a.type == "image" for a in artifacts) == 6
    # The gallery: every stored image's thumbnail, each linked to the image.
    [gallery] = [a for a in artifacts if a.type == "markdown"]
    assert gallery.key == "async-gallery" and "6 of the 6 images this run stored" in gallery.data
    thumbnails = re.findall(
        r"!\[row \d+\]\((data:[^)]+)\)<br>\[row \d+\]\((http[^)]+)\)", gallery.data
    )
    assert len(thumbnails) == 6
    for thumbnail, _ in thumbnails:
        assert_thumbnail(thumbnail, (256, 256))
    [progress] = [a for a in artifacts if a.type == "progress"]
    assert float(progress.data) == 100.0

    state = asyncio.run(
        abatch_campaign(
            items=batch, campaign="Async", destination_block=destination_block, return_state=True
        )
    )
    report = state.result()
    assert (report.stored, report.cache_hits, report.calls) == (6, 6, 0)
    assert prefect_api.task_runs([prefect_api.flow_run_id(state)]) == []
    assert imagine_calls(journey_env) == 6


def imagine_key(item: dict[str, Any], emulator: EmulatorServer) -> str:
    """The cache key of ``item``'s generation (no variant)."""
    return imagine_cache_key(ImagineRequest(prompt=item["prompt"]), "", emulator.url)


def generated_by_another_run(item: dict[str, Any], emulator: EmulatorServer) -> None:
    """Pay for ``item`` and cache it as the run holding its lock ("another run") would."""
    request = ImagineRequest(prompt=item["prompt"])
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        result = client.imagine(request)
    cache_result(imagine, imagine_key(item, emulator), result, holder="another run")


def campaign_in_background(**parameters: Any) -> tuple[threading.Thread, list[CampaignReport]]:
    """``batch_campaign(**parameters)`` started on a thread; its report lands in the list.
    The thread runs in a copy of this one's context, so it sees the test harness's settings
    (Prefect before 3.8.5 keeps them in the context only)."""
    reports: list[CampaignReport] = []
    context = contextvars.copy_context()
    campaign = threading.Thread(
        target=lambda: context.run(lambda: reports.append(batch_campaign(**parameters)))
    )
    campaign.start()
    return campaign, reports


def wait_for_calls(emulator: EmulatorServer, calls: int, campaign: threading.Thread) -> None:
    deadline = time.monotonic() + 60
    while imagine_calls(emulator) < calls:
        assert time.monotonic() < deadline and campaign.is_alive()
        time.sleep(0.02)


@BOTH_MODES
def test_an_image_another_run_is_generating_is_waited_for_not_paid_twice(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """While another run holds an image's cache lock, the campaign generates the rest,
    waits for that one and reads its record when the lock is released."""
    batch = items(4)
    key = imagine_key(batch[1], journey_env)
    locks = record_store(imagine).lock_manager
    assert locks is not None and locks.acquire_lock(key, "another run")
    try:
        campaign, reports = campaign_in_background(
            items=batch, destination=str(tmp_path), images_per_task_run=images_per_task_run
        )
        wait_for_calls(journey_env, 3, campaign)  # every image but the held one
        time.sleep(0.5)  # time enough to pay for the held image too, were it not waiting
        assert imagine_calls(journey_env) == 3 and campaign.is_alive()
        generated_by_another_run(batch[1], journey_env)
    finally:
        locks.release_lock(key, "another run")
        campaign.join(timeout=60)
    [report] = reports
    assert (report.stored, report.cache_hits, report.calls) == (4, 1, 3)
    assert imagine_calls(journey_env) == 4  # three by the campaign, one by the other run


def test_chunked_images_take_their_cache_locks_shortly_before_their_call(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    """With one call at a time, two images hold a lock: the one generating and the next
    one, looked up and waiting for its slot. The others take theirs when their turn comes."""
    journey_env.state.config.latency.fixed = 1.0
    batch = items(6)
    keys = [imagine_key(item, journey_env) for item in batch]
    locks = record_store(imagine).lock_manager
    assert locks is not None
    campaign, reports = campaign_in_background(
        items=batch, destination=str(tmp_path), max_concurrency=1, images_per_task_run=6
    )
    try:
        wait_for_calls(journey_env, 1, campaign)  # the first call is in its 1 s
        locked = [locks.is_locked(key) for key in keys]
        assert locked == [True, True, False, False, False, False]
    finally:
        campaign.join(timeout=60)
    [report] = reports
    assert (report.stored, report.calls) == (6, 6)
    assert not any(locks.is_locked(key) for key in keys)


@BOTH_MODES
def test_images_another_run_is_generating_leave_the_slots_to_the_others(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """With one call at a time, two images whose locks another run holds still let the
    other three be generated: whatever the grouping, the run starts them last and waits for
    their locks outside its window (of two)."""
    batch = items(5)
    keys = [imagine_key(item, journey_env) for item in batch[:2]]
    locks = record_store(imagine).lock_manager
    assert locks is not None and all(locks.acquire_lock(key, "another run") for key in keys)
    try:
        campaign, reports = campaign_in_background(
            items=batch,
            destination=str(tmp_path),
            max_concurrency=1,
            images_per_task_run=images_per_task_run,
        )
        wait_for_calls(journey_env, 3, campaign)  # every image but the two held ones
        for item in batch[:2]:
            generated_by_another_run(item, journey_env)
    finally:
        for key in keys:
            locks.release_lock(key, "another run")
        campaign.join(timeout=60)
    [report] = reports
    assert (report.stored, report.cache_hits, report.calls) == (5, 2, 3)


def test_weekly_campaign_deployment_runs_with_its_parameters(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    """deployments/prefect.yaml's weekly campaign, with its sheet, bucket and credentials
    replaced by local ones: every image under its own key, and a retry costs nothing."""
    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    [weekly] = [entry for entry in config["deployments"] if entry["name"] == "weekly-campaign"]
    assert weekly["entrypoint"] == "prefect_journey.flows.campaign:abatch_campaign"
    sheet = tmp_path / "this-week.csv"
    sheet.write_text("prompt\n" + "".join(f"{item['prompt']}\n" for item in items(4)))
    parameters = {
        **weekly["parameters"],
        "source": str(sheet),
        "destination": str(tmp_path / "bucket"),
        "destination_block": None,
        "credentials_block": None,
    }
    for run in range(2):
        report: CampaignReport = asyncio.run(abatch_campaign(**parameters))
        assert (report.stored, report.calls) == (4, 4 if run == 0 else 0)
    keys = sorted(p.relative_to(tmp_path / "bucket").as_posix() for p in tmp_path.rglob("*.png"))
    assert keys == sorted(f"weekly/{Path(o.uri).name}" for o in report.outcomes)
    assert all(
        Path(o.uri).name == f"product-{o.row}-on-a-white-background-{o.prompt[-8:]}-{o.task_id}.png"
        for o in report.outcomes
    )


def test_async_flow_rejects_bad_input_before_any_call(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    batch = items(3)
    batch[2]["aspect_ratio"] = "5:4"
    state = asyncio.run(abatch_campaign(items=batch, destination=str(tmp_path), return_state=True))
    assert state.is_failed() and "row 3: aspect_ratio" in str(state.message)
    assert journey_env.ledger()["calls_total"] == 0


def test_images_per_task_run_is_checked_before_any_call(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    for options in ({"images_per_task_run": 0}, {"images_per_task_run": -3}):
        state = batch_campaign(
            items=items(3), destination=str(tmp_path), return_state=True, **options
        )
        assert state.is_failed() and "images_per_task_run" in str(state.message)
    assert journey_env.ledger()["calls_total"] == 0


def test_over_budget_or_balance_fails_before_any_call(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    over_budget = batch_campaign(
        items=items(10), destination=str(tmp_path), max_credits=39, return_state=True
    )
    assert over_budget.is_failed() and "left of max_credits=39" in str(over_budget.message)
    journey_env.admin("config", {"credits": 20})
    over_balance = batch_campaign(items=items(10), destination=str(tmp_path), return_state=True)
    assert over_balance.is_failed() and "account has 20" in str(over_balance.message)
    assert imagine_calls(journey_env) == 0 and list(tmp_path.iterdir()) == []
    journey_env.admin("config", {"credits": 10_000})


@BOTH_MODES
def test_half_budget_stops_new_calls_at_the_limit(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    journey_env.admin("config", {"fixed": 0.2})
    report = batch_campaign(
        images_per_task_run=images_per_task_run,
        items=items(10),
        destination=str(tmp_path),
        max_credits=20,
        partial_budget=True,
        allow_failures=True,
        max_concurrency=4,
    )
    assert (report.calls, report.credits_charged, report.stored, report.skipped) == (5, 20, 5, 5)
    assert journey_env.ledger()["credits_charged"] == 20 and imagine_calls(journey_env) == 5
    assert all("budget" in o.reason for o in report.outcomes if o.status == "skipped")


def test_a_budget_belongs_to_the_campaign_not_to_a_run(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    """Three runs of one campaign against one max_credits: the third is refused before its
    call, whatever its items."""
    options: dict[str, Any] = {"campaign": "capped", "destination": str(tmp_path)}
    first = batch_campaign(items=items(1), max_credits=8, **options)
    assert first.budget_left == 4 and "budget_left=4" in first.ledger_line()
    second = batch_campaign(items=items(1), max_credits=8, **options)
    assert (second.credits_charged, second.budget_left) == (4, 0)
    third = batch_campaign(items=items(1), max_credits=8, return_state=True, **options)
    assert third.is_failed() and "8 spent by earlier runs" in str(third.message)
    # Another budget name is another budget.
    other = batch_campaign(items=items(1), max_credits=8, budget_name="capped-2", **options)
    assert other.budget_left == 4 and imagine_calls(journey_env) == 3


@BOTH_MODES
def test_retries_count_against_the_budget(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """The possibly-billed 500 is retried after the ladder's first pause (2 s +/- 50 %), one
    image at a time."""
    journey_env.admin("faults", {"queue": {"api": ["500"]}})
    state = batch_campaign(
        images_per_task_run=images_per_task_run,
        items=items(3),
        destination=str(tmp_path),
        max_credits=12,
        max_concurrency=1,
        return_state=True,
    )
    # 3 items fit the budget, but the possibly-billed retry of the first used a share of it.
    assert state.is_failed()
    ledger = journey_env.ledger()
    assert ledger["credits_charged"] == 12 and imagine_calls(journey_env) == 3


@BOTH_MODES
@pytest.mark.parametrize(
    ("repay", "calls", "status"),
    [(None, 2, "possibly_billed"), (0, 1, "possibly_billed"), (2, 3, "stored")],
)
def test_a_possibly_billed_failure_is_paid_again_only_within_the_allowance(
    journey_env: EmulatorServer,
    tmp_path: Path,
    images_per_task_run: int,
    repay: int | None,
    calls: int,
    status: str,
) -> None:
    """One image whose answer is lost twice: the default pays again once, 0 never, 2 twice;
    each repay waits the ladder's pause (2 s, then 4 s, +/- 50 %). An image left possibly
    billed is counted apart from the failures, in the report, its ledger line and the
    summary table."""
    journey_env.admin("faults", {"queue": {"api": ["500", "drop"]}})
    state = batch_campaign(
        items=items(1),
        campaign="repays",
        destination=str(tmp_path),
        images_per_task_run=images_per_task_run,
        allow_failures=True,
        return_state=True,
        **({} if repay is None else {"repay_possibly_billed": repay}),
    )
    report: CampaignReport = state.result()
    [outcome] = report.outcomes
    assert outcome.status == status and imagine_calls(journey_env) == report.calls == calls
    assert report.credits_charged == journey_env.ledger()["credits_charged"] == 4 * calls
    left = int(status == "possibly_billed")
    assert (report.failed, report.possibly_billed_not_repaid) == (0, left)
    assert report.possibly_billed_retries == calls - 1
    assert f"failed=0 possibly_billed_not_repaid={left} " in report.ledger_line()
    [table] = [
        a for a in prefect_api.artifacts([prefect_api.flow_run_id(state)]) if a.type == "table"
    ]
    assert f"possibly_billed_not_repaid={left}" in table.description
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["status"] for row in rows] == [status]


@BOTH_MODES
def test_concurrency_never_exceeds_max_concurrency(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """12 images of 0.3 s, three at a time: four rounds at least."""
    journey_env.admin("config", {"fixed": 0.3})
    batch_campaign(
        images_per_task_run=images_per_task_run,
        items=items(12),
        destination=str(tmp_path),
        max_concurrency=3,
        concurrency_limit=None,
    )
    assert journey_env.ledger()["peak_concurrency"] == 3


@BOTH_MODES
def test_global_concurrency_limit_is_shared(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """8 images of 0.3 s through a limit of 2 slots taken from the Prefect server: four rounds
    at least; Prefect 3.8's client waits much longer between tries for a busy slot (about a
    minute in all)."""
    name = f"journey-imagine-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))
    journey_env.admin("config", {"fixed": 0.3})
    batch_campaign(
        images_per_task_run=images_per_task_run,
        items=items(8),
        destination=str(tmp_path),
        max_concurrency=8,
        concurrency_limit=name,
    )
    assert journey_env.ledger()["peak_concurrency"] == 2


@BOTH_MODES
def test_failed_items_do_not_stop_the_batch_and_rerun_redoes_only_them(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """Two campaign runs of 6 images, the first one image at a time."""
    batch = items(6)
    journey_env.admin("faults", {"queue": {"api": ["failed"]}})
    state = batch_campaign(
        images_per_task_run=images_per_task_run,
        items=batch,
        destination=str(tmp_path),
        max_concurrency=1,
        return_state=True,
    )
    assert state.is_failed() and "1 of 6 items not stored" in str(state.message)
    assert "Content policy violation" in str(state.message)
    assert len(list(tmp_path.rglob("*.png"))) == 5
    journey_env.admin("reset")
    report = batch_campaign(
        items=batch, destination=str(tmp_path), images_per_task_run=images_per_task_run
    )
    assert (report.stored, report.cache_hits, report.calls) == (6, 5, 1)
    assert imagine_calls(journey_env) == 1 and len(list(tmp_path.rglob("*.png"))) == 6


def test_rerun_of_a_finished_campaign_runs_no_task_and_restores_a_deleted_object(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    """Three campaign runs, and a wait for the server to record the task runs (Prefect records
    them from their events, a moment after they ran)."""
    batch = items(4)
    batch_campaign(items=batch, destination=str(tmp_path), max_concurrency=4)
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 4
    deleted, content = files[0], files[0].read_bytes()
    deleted.unlink()  # someone cleaned the bucket by hand

    state = batch_campaign(items=batch, destination=str(tmp_path), return_state=True)
    report: CampaignReport = state.result()
    assert (report.stored, report.cache_hits, report.calls) == (4, 4, 0)
    assert deleted.read_bytes() == content  # stored again, from the cached image
    runs = prefect_api.task_runs([prefect_api.flow_run_id(state)], at_least=2)
    # Only the deleted object's item ran. Both are untagged: a campaign's calls are bounded
    # per attempt (max_concurrency, its global concurrency limit), and a tagged task run
    # would first ask the server for tag slots.
    assert len(runs) == 2
    assert {run.name.split(" ")[0]: set(run.tags) for run in runs} == {
        "image": set(),
        "assets:": set(),
    }

    state = batch_campaign(items=batch, destination=str(tmp_path), return_state=True)
    report = state.result()
    assert (report.stored, report.cache_hits, report.calls) == (4, 4, 0)
    assert {o.uri for o in report.outcomes} == {f.as_uri() for f in files}
    assert prefect_api.task_runs([prefect_api.flow_run_id(state)]) == []
    assert imagine_calls(journey_env) == 4


def test_bad_campaign_input_is_reported_before_any_call(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    batch = items(60)
    batch[56]["aspect_ratio"] = "5:4"
    state = batch_campaign(items=batch, destination=str(tmp_path), return_state=True)
    assert state.is_failed() and "row 57: aspect_ratio" in str(state.message)
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("text\nhello\n")
    state = batch_campaign(source=str(csv_file), destination=str(tmp_path), return_state=True)
    assert state.is_failed() and "no 'prompt' column" in str(state.message)
    state = batch_campaign(
        items=items(2),
        key_template="../x-{index}.{ext}",
        destination=str(tmp_path),
        return_state=True,
    )
    assert state.is_failed() and "row 1" in str(state.message) and "'..'" in str(state.message)
    assert journey_env.ledger()["calls_total"] == 0


def put_sheet(bucket: Bucket, key: str) -> str:
    """A three-item JSONL campaign sheet at ``key`` in ``bucket``; returns its URL."""
    lines = "\n".join(f'{{"prompt": "jsonl item {i} {uuid.uuid4().hex[:6]}"}}' for i in range(3))
    bucket.fs().pipe(f"{bucket.name}/{key}", lines.encode())
    return f"{bucket.url}/{key}"


def test_campaign_from_a_file_in_a_bucket_with_the_ambient_credentials(
    journey_env: EmulatorServer, bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A campaign run whose items are read from a bucket on the moto server, with s3fs started
    for it: the destination is a local folder, so the sheet is read with what the
    environment gives."""
    source = put_sheet(bucket, "input/c.jsonl")
    for variable, value in bucket.env().items():
        monkeypatch.setenv(variable, value)
    report = batch_campaign(source=source, destination=str(tmp_path))
    assert report.stored == 3 and len(list((tmp_path / "campaign").iterdir())) == 3


@pytest.fixture
def s3_bucket_block(
    bucket: Bucket, emulator_server: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A prefect-aws ``S3Bucket`` block (with ``AwsCredentials``) for the bucket's ``brand``
    folder, saved on the Prefect server; the ambient AWS configuration points at the
    emulator, which holds no bucket, so only the block's options reach the bucket. Returns
    ``s3-bucket/<name>``."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters
    from pydantic import SecretStr

    for variable in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", emulator_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ambient")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ambient")
    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key=SecretStr("testing"),
        aws_client_parameters=AwsClientParameters(endpoint_url=bucket.endpoint),
    )
    name = f"brand-{bucket.name}"
    S3Bucket(bucket_name=bucket.name, bucket_folder="brand", credentials=credentials).save(name)
    return f"s3-bucket/{name}"


def test_a_campaign_into_an_s3_bucket_block_reads_its_sheet_with_the_block(
    journey_env: EmulatorServer, bucket: Bucket, s3_bucket_block: str, tmp_path: Path
) -> None:
    """A dry run and three campaign runs on a real Prefect server: into the block, its sheet
    read with the destination's options; the same sheet refused with the ambient
    configuration (a local destination); and read with the block named as
    ``source_block``."""
    source = put_sheet(bucket, "sheets/spring.jsonl")
    quote = price_campaign(source=source, campaign="Spring", destination_block=s3_bucket_block)
    assert (quote.items, quote.to_generate) == (3, 3)
    report = batch_campaign(source=source, campaign="Spring", destination_block=s3_bucket_block)
    assert report.stored == 3 and report.calls == 3
    assert sorted(o.uri for o in report.outcomes) == [
        f"{bucket.url}/{key}" for key in bucket.objects() if key.startswith("brand/spring/")
    ]

    # Without a block for it, a sheet on S3 beside a local destination is read with the
    # ambient configuration, which reaches no bucket here: the block's options did the work.
    state = batch_campaign(source=source, destination=str(tmp_path), return_state=True)
    assert state.is_failed() and "cannot read campaign file" in str(state.message)

    report = batch_campaign(
        source=source,
        source_block=s3_bucket_block,
        campaign="Spring",
        destination=str(tmp_path),
    )
    assert report.stored == 3 and len(list((tmp_path / "spring").iterdir())) == 3
    assert imagine_calls(journey_env) == 3  # the images are cached; the sheet cost nothing


def test_blocks_that_cannot_serve_are_refused_before_any_call(
    journey_env: EmulatorServer, s3_bucket_block: str, tmp_path: Path
) -> None:
    state = batch_campaign(
        source=str(tmp_path / "sheet.csv"),
        source_block=s3_bucket_block,
        destination=str(tmp_path),
        return_state=True,
    )
    assert state.is_failed() and "is for s3://, the campaign file is file://" in str(state.message)
    state = batch_campaign(items=items(2), source_block=s3_bucket_block, return_state=True)
    assert state.is_failed() and "pass it with source" in str(state.message)
    if not find_spec("prefect_gcp"):
        state = batch_campaign(
            items=items(2), destination_block="gcs-bucket/assets", return_state=True
        )
        assert state.is_failed() and "pip install prefect-gcp" in str(state.message)
    assert journey_env.ledger()["calls_total"] == 0


@BOTH_MODES
def test_a_retry_after_pauses_every_new_call_of_the_campaign(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """Six 0.5 s images, three at a time; the first call's 429 asks for 2 s."""
    journey_env.admin("config", {"fixed": 0.5})
    journey_env.admin("faults", {"queue": {"api": ["429"]}, "retry_after": 2})
    report = batch_campaign(
        items=items(6),
        destination=str(tmp_path),
        max_concurrency=3,
        images_per_task_run=images_per_task_run,
    )
    assert report.stored == 6 and imagine_calls(journey_env) == 7
    log = [c for c in journey_env.ledger()["log"] if c["endpoint"] == "imagine"]
    [refused] = [c for c in log if c["status"] == 429]
    # The calls already in flight finish; none starts until the pause ends.
    started_during = [c for c in log if refused["at"] + 0.2 < c["at"] < refused["at"] + 1.8]
    assert started_during == []


@BOTH_MODES
def test_a_pause_longer_than_max_pause_leaves_the_rest_not_started_and_unpaid(
    journey_env: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    journey_env.admin("faults", {"rates": {"429": 1.0}, "retry_after": 120})
    report = batch_campaign(
        items=items(5),
        destination=str(tmp_path),
        max_concurrency=2,
        max_pause=30,
        images_per_task_run=images_per_task_run,
        allow_failures=True,
    )
    assert (
        [o.status for o in report.outcomes]
        == ["not_started"] * 5
        == ["not_started"] * (report.not_started)
    )
    assert all("max_pause=30" in o.reason and o.credits == 0 for o in report.outcomes)
    assert "not_started=5" in report.ledger_line()
    # Only the calls already under way when the first 429 came: no item burned its retries.
    assert imagine_calls(journey_env) <= 2 and journey_env.ledger()["credits_charged"] == 0
