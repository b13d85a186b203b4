"""The two groupings of a campaign's items are one code path: the same scenarios, run with a
task run per image and with three images per task run, give the same report, field by field.

Each scenario runs twice on the emulator, a real Prefect server and a local folder (or the
moto bucket): once per grouping, on new prompts each time. What depends on the prompt or the
clock (task ids, uris, checksums, latencies) is left out; every count of the report and,
per item, its status, the class of its failure, its credits, attempts, cache and recovery
flags are compared.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

from prefect_journey import policy
from prefect_journey.campaigns.pipeline import CampaignReport
from prefect_journey.emulator import BackgroundServer, EmulatorServer, FaultPlan
from prefect_journey.flows.campaign import batch_campaign
from prefect_journey.storage import slugify
from prefect_journey.webhooks import WEBHOOK_PATH, create_webhook_app
from reliability.soak import READ_TIMEOUT, SLOW_SECONDS

from .conftest import process_env

pytestmark = pytest.mark.usefixtures("prefect_harness", "fast_retries")

GROUPINGS = (1, 3)
ITEMS = 3
ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec-executors-test-8f14e45fceea167a5a36dedd4bea2543f9a2b1c0d3e4f5a6"


@dataclass
class Run:
    """One scenario's run in one grouping."""

    emulator: EmulatorServer
    folder: Path
    images_per_task_run: int
    monkeypatch: pytest.MonkeyPatch

    def campaign(self, rows: list[dict[str, Any]], **options: Any) -> CampaignReport:
        report: CampaignReport = batch_campaign(
            items=rows,
            campaign="compare",
            # A budget outlives runs: each grouping spends from its own.
            budget_name=f"compare-{self.images_per_task_run}",
            destination=str(self.folder),
            images_per_task_run=self.images_per_task_run,
            allow_failures=True,
            **{"max_concurrency": ITEMS, **options},
        )
        return report


def rows(n: int = ITEMS) -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    return [{"prompt": f"compared poster {i} #{tag}"} for i in range(n)]


def api_fault(kind: str) -> Callable[[Run], CampaignReport]:
    """Every item's first call answered with ``kind``."""

    def scenario(run: Run) -> CampaignReport:
        run.monkeypatch.setenv("JOURNEY_READ_TIMEOUT", str(READ_TIMEOUT))
        run.emulator.admin(
            "faults",
            {"queue": {"api": [kind] * ITEMS}, "slow_seconds": SLOW_SECONDS, "retry_after": 0.2},
        )
        return run.campaign(rows())

    return scenario


def cdn_fault(kind: str) -> Callable[[Run], CampaignReport]:
    """Every item's first download answered with ``kind``."""

    def scenario(run: Run) -> CampaignReport:
        run.emulator.admin("faults", {"queue": {"cdn": [kind] * ITEMS}})
        return run.campaign(rows())

    return scenario


def cache_hits(run: Run) -> CampaignReport:
    """The campaign again: every image and object from the first run."""
    batch = rows()
    run.campaign(batch)
    return run.campaign(batch)


def occupied_keys(run: Run) -> CampaignReport:
    """The first item's key holds a file nobody recorded: refused before its call."""
    (run.folder / "compare").mkdir(parents=True)
    batch = rows()
    slug = slugify(batch[0]["prompt"], 40)
    for ext in ("png", "jpg", "webp"):
        (run.folder / "compare" / f"0001-{slug}.{ext}").write_bytes(b"not ours")
    return run.campaign(batch)


def budget_exhausted(run: Run) -> CampaignReport:
    """A budget of two images for three: one item is skipped, unpaid."""
    return run.campaign(rows(), max_credits=8, partial_budget=True)


def long_pause(run: Run) -> CampaignReport:
    """Every call answered 429 with a Retry-After past max_pause: nothing started, unpaid.
    One call at a time, so that the first answer reaches the shared pause before a second
    call starts: with several in flight, how many are made is the clock's."""
    run.emulator.admin("faults", {"rates": {"429": 1.0}, "retry_after": 120})
    return run.campaign(rows(), max_pause=5, max_concurrency=1)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch, journey_env: EmulatorServer) -> Iterator[None]:
    with BackgroundServer(create_webhook_app(SECRET, api_url=PREFECT_API_URL.value())) as server:
        monkeypatch.setenv("JOURNEY_WEBHOOK_URL", f"{server.url}{WEBHOOK_PATH}")
        monkeypatch.setenv("JOURNEY_WEBHOOK_SECRET", SECRET)
        monkeypatch.setenv("JOURNEY_RECOVERY_WINDOW", "20")
        monkeypatch.setattr(journey_env.state.config, "webhook_retry_delays", (0.5, 1.0, 2.0))
        monkeypatch.setattr(policy, "CONNECT_TIMEOUT", 1.0)
        monkeypatch.setattr(policy, "ATTEMPT_TIMEOUT_MARGIN", 0.5)
        yield


def recovery(run: Run) -> CampaignReport:
    """Every item's answer lost after it was billed, and recovered from its delivery."""
    run.monkeypatch.setenv("JOURNEY_READ_TIMEOUT", str(READ_TIMEOUT))
    run.emulator.admin("faults", {"queue": {"api": ["500"] * ITEMS}})
    return run.campaign(rows())


def kill_and_resume(run: Run) -> CampaignReport:
    """Killed with SIGKILL with calls in flight; the re-run recovers them and pays for the
    rest. Which items the first run finished is the clock's: only the re-run's totals and
    every item's status are compared."""
    run.emulator.admin("config", {"fixed": 2.0})
    env = process_env(PREFECT_LOCAL_STORAGE_PATH.value(), JOURNEY_LOCK_LEASE_SECONDS="2")
    batch = rows(6)
    command = [
        sys.executable,
        "-c",
        "from prefect_journey.flows.campaign import batch_campaign; "
        f"batch_campaign(items={batch!r}, campaign='compare', destination={str(run.folder)!r}, "
        f"max_concurrency=3, images_per_task_run={run.images_per_task_run})",
    ]
    first = subprocess.Popen(command, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while len(run.emulator.ledger()["billed_tasks"]) < 1:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    run.emulator.state.config.latency.fixed = None
    report = run.campaign(batch)
    ledger = run.emulator.ledger()
    assert len(ledger["billed_tasks"]) == 6 == len(list(run.folder.rglob("*.png")))
    return report.model_copy(
        update={
            "cache_hits": 0,
            "recovered": 0,
            "calls": 0,
            "credits_charged": ledger["credits_charged"],
            "outcomes": [
                o.model_copy(
                    update={"cached": False, "recovered": False, "credits": 0, "attempts": 0}
                )
                for o in report.outcomes
            ],
        }
    )


SCENARIOS: dict[str, Callable[[Run], CampaignReport]] = {
    **{
        f"api {kind}": api_fault(kind)
        for kind in ("429", "503", "500", "drop", "malformed", "slow", "failed", "400")
    },
    **{f"cdn {kind}": cdn_fault(kind) for kind in ("truncate", "corrupt")},
    "cache hits": cache_hits,
    "occupied keys": occupied_keys,
    "budget exhausted": budget_exhausted,
    "a pause past max_pause": long_pause,
}
WITH_RECEIVER: dict[str, Callable[[Run], CampaignReport]] = {
    "recovery": recovery,
    "kill and resume": kill_and_resume,
}


def compared(report: CampaignReport) -> dict[str, Any]:
    """What must not depend on the grouping: every count, each item's fate, and the attempts
    in all (which item's call meets a queued fault first is the clock's, under a shared
    pause)."""
    fields = report.model_dump(exclude={"outcomes", "campaign"})
    items = sorted(
        (o.status, o.reason.split(":")[0], o.credits, o.cached, o.recovered)
        for o in report.outcomes
    )
    return {**fields, "items": items, "attempts": sum(o.attempts for o in report.outcomes)}


def both_groupings(
    scenario: Callable[[Run], CampaignReport],
    emulator: EmulatorServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> list[dict[str, Any]]:
    reports = []
    for size in GROUPINGS:
        emulator.state.config.faults = FaultPlan()
        emulator.state.config.latency.fixed = None
        emulator.admin("reset")
        run = Run(emulator, tmp_path / f"grouped-{size}", size, monkeypatch)
        run.folder.mkdir()
        reports.append(compared(scenario(run)))
    return reports


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_both_groupings_report_the_same(
    journey_env: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    """Two campaigns or more per scenario, one per grouping; a "slow" answer waits out the
    client's read timeout (4 s) on every item."""
    per_image, grouped = both_groupings(SCENARIOS[scenario], journey_env, tmp_path, monkeypatch)
    assert per_image == grouped
    assert per_image["items"], "the scenario ran"


@pytest.mark.slow  # a receiver, deliveries through the events API, a killed process
@pytest.mark.usefixtures("receiver")
@pytest.mark.parametrize("scenario", list(WITH_RECEIVER))
def test_both_groupings_recover_the_same(
    journey_env: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    """Deliveries reach the events API within seconds; the kill waits for a billed call."""
    per_image, grouped = both_groupings(WITH_RECEIVER[scenario], journey_env, tmp_path, monkeypatch)
    assert per_image == grouped
