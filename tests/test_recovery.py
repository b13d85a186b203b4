"""Never pay twice: a possibly-billed attempt is recovered from its webhook delivery, through
the emulator (which delivers whatever happened to the HTTP answer), the package's receiver
and a real Prefect server's events API, in both executors of the campaign pipeline."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.errors import TaskFailedError
from prefect_journey.flows.campaign import batch_campaign
from prefect_journey.models import ImagineRequest, ImagineResult
from prefect_journey.recovery import AttemptRecord, delivered_result
from prefect_journey.tasks import aimagine, imagine
from prefect_journey.tokens import mint_token
from prefect_journey.webhooks import WEBHOOK_PATH, create_webhook_app
from reliability.soak import READ_TIMEOUT, SLOW_SECONDS

pytestmark = pytest.mark.usefixtures("prefect_harness")

SECRET = "whsec-recovery-test"
# Long enough for the server to store a delivered event, short enough for a test.
WINDOW = 20.0
BOTH_MODES = pytest.mark.parametrize("images_per_task_run", [1, 4])
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def receiver_url() -> Iterator[str]:
    with BackgroundServer(create_webhook_app(SECRET, api_url=PREFECT_API_URL.value())) as server:
        yield f"{server.url}{WEBHOOK_PATH}"


@pytest.fixture
def recovering(
    journey_env: EmulatorServer, receiver_url: str, monkeypatch: pytest.MonkeyPatch
) -> EmulatorServer:
    """The emulator, a receiver, and the variables that turn recovery on."""
    monkeypatch.setenv("JOURNEY_WEBHOOK_URL", receiver_url)
    monkeypatch.setenv("JOURNEY_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("JOURNEY_RECOVERY_WINDOW", str(WINDOW))
    # Seconds of room over a generation, as in the soak (reliability/soak.py says why).
    monkeypatch.setenv("JOURNEY_READ_TIMEOUT", str(READ_TIMEOUT))
    monkeypatch.setattr(journey_env.state.config, "webhook_retry_delays", (0.5, 1.0, 2.0))
    return journey_env


def items(n: int) -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    return [{"prompt": f"recovered poster {i} #{tag}"} for i in range(n)]


@BOTH_MODES
def test_lost_answers_are_recovered_not_bought_again(
    recovering: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """Each lost answer waits for its webhook delivery: the emulator, the receiver and the
    Prefect events API, which the run asks once a second."""
    # Every way an answer can be lost after the image was made and billed.
    recovering.admin(
        "faults",
        {"queue": {"api": ["500", "drop", "malformed", "slow"]}, "slow_seconds": SLOW_SECONDS},
    )
    report = batch_campaign(
        items=items(4),
        campaign="recovered",
        destination=str(tmp_path),
        max_concurrency=4,
        images_per_task_run=images_per_task_run,
    )
    ledger = recovering.ledger()
    assert (report.stored, report.recovered, report.calls) == (4, 4, 4)
    assert report.credits_charged == ledger["credits_charged"] == 16
    assert report.possibly_billed_retries == 0
    assert all(o.recovered and o.credits == 4 for o in report.outcomes)
    assert sorted(o.task_id for o in report.outcomes) == sorted(ledger["billed_tasks"])
    assert "recovered=4" in report.ledger_line()


@BOTH_MODES
@pytest.mark.parametrize("delivery_fault", ["lost", "wrong_secret", "late"])
def test_an_undelivered_attempt_is_retried_after_the_window(
    recovering: EmulatorServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    images_per_task_run: int,
    delivery_fault: str,
) -> None:
    """The attempt waits out a 3 s recovery window, then the retry ladder's first pause (2 s
    +/- 50 %), before it pays again."""
    monkeypatch.setenv("JOURNEY_RECOVERY_WINDOW", "3")
    recovering.admin(
        "faults", {"queue": {"api": ["500"], "webhook": [delivery_fault]}, "late_seconds": 30}
    )
    report = batch_campaign(
        items=items(1),
        campaign="undelivered",
        destination=str(tmp_path),
        images_per_task_run=images_per_task_run,
    )
    assert (report.stored, report.recovered, report.calls) == (1, 0, 2)
    assert report.credits_charged == recovering.ledger()["credits_charged"] == 8
    assert report.possibly_billed_retries == 1


@BOTH_MODES
def test_a_duplicated_delivery_is_one_result(
    recovering: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """The dropped answer waits for its delivery through the receiver and the events API, which
    the run asks once a second."""
    recovering.admin("faults", {"queue": {"api": ["drop"], "webhook": ["duplicate"]}})
    report = batch_campaign(
        items=items(2),
        campaign="duplicated",
        destination=str(tmp_path),
        images_per_task_run=images_per_task_run,
    )
    assert (report.stored, report.recovered, report.calls, report.credits_charged) == (2, 1, 2, 8)
    assert len(list(tmp_path.rglob("*.png"))) == 2


@BOTH_MODES
def test_another_runs_delivery_never_becomes_this_runs_result(
    recovering: EmulatorServer,
    receiver_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    images_per_task_run: int,
) -> None:
    """The attempt waits out a 3 s recovery window, then the retry ladder's first pause (2 s
    +/- 50 %), before it pays again."""
    # Another run's attempt (a token minted with the same secret) delivers an image while
    # this run's own delivery is lost: this run buys its image again rather than take that one.
    foreign = {
        "task_id": "foreign-task",
        "status": "finished",
        "image_url": "https://cdn.example.com/f.png",
    }
    answer = httpx.post(
        f"{receiver_url}/{mint_token(SECRET)}", json=foreign, headers={"x-webhook-secret": SECRET}
    )
    assert answer.status_code == 200
    monkeypatch.setenv("JOURNEY_RECOVERY_WINDOW", "3")
    recovering.admin("faults", {"queue": {"api": ["500"], "webhook": ["lost"]}})
    report = batch_campaign(
        items=items(1),
        campaign="foreign",
        destination=str(tmp_path),
        images_per_task_run=images_per_task_run,
    )
    assert (report.stored, report.recovered, report.calls) == (1, 0, 2)
    assert report.outcomes[0].task_id in recovering.ledger()["billed_tasks"]


def test_without_a_receiver_a_lost_answer_is_bought_again(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    """The possibly-billed 500 is paid again after the retry ladder's first pause (2 s +/- 50
    %)."""
    journey_env.admin("faults", {"queue": {"api": ["500"]}})
    report = batch_campaign(items=items(1), campaign="no-receiver", destination=str(tmp_path))
    assert (report.stored, report.recovered, report.calls, report.credits_charged) == (1, 0, 2, 8)
    assert journey_env.ledger()["webhooks_sent"] == 0


def test_aimagine_recovers_too(recovering: EmulatorServer) -> None:
    recovering.admin("faults", {"queue": {"api": ["drop"]}})

    @flow
    async def one() -> ImagineResult:
        return await aimagine(ImagineRequest(prompt=f"async recovered {uuid.uuid4().hex}"))

    result = asyncio.run(one())
    assert result.recovered and result.credits_charged == 4
    assert recovering.ledger()["credits_charged"] == 4


def test_a_request_with_its_own_webhook_is_not_recovered(recovering: EmulatorServer) -> None:
    own = "http://127.0.0.1:9/their-own-hook"

    @flow
    def one() -> ImagineResult:
        return imagine(ImagineRequest(prompt=f"own hook {uuid.uuid4().hex}", webhook_url=own))

    one()
    [task] = recovering.state.tasks.values()
    assert task.request.webhook_url == own  # the caller's webhook, not replaced by a token


def test_a_failed_delivery_is_the_typed_failure() -> None:
    record = AttemptRecord(id="a" * 32, sent_at=time.time())
    payload = {"task_id": "t-1", "status": "failed", "error": "Content policy violation"}
    with pytest.raises(TaskFailedError, match="Content policy violation"):
        delivered_result([payload], [record], charged=4)
    assert delivered_result([], [record], charged=4) is None
    # A payload that is not a task is passed over; a finished one wins over a refusal.
    finished = {"task_id": "t-2", "status": "finished", "image_url": "https://cdn.example/2.png"}
    found = delivered_result([{"status": "finished"}, payload, finished], [record], charged=0)
    assert found is not None and found.task_id == "t-2" and found.recovered


@pytest.mark.slow
@BOTH_MODES
def test_a_killed_runs_calls_are_recovered_by_the_next_run(
    recovering: EmulatorServer, receiver_url: str, tmp_path: Path, images_per_task_run: int
) -> None:
    """20 images, 5 at a time, killed with SIGKILL mid-run: the re-run pays for 20 in all."""
    recovering.admin("config", {"fixed": 3.0})
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(PREFECT_LOCAL_STORAGE_PATH.value()),
        "JOURNEY_LOCK_LEASE_SECONDS": "2",
    }
    command = [
        sys.executable,
        "-c",
        "import sys; from prefect_journey.flows.campaign import batch_campaign; "
        f"batch_campaign(items=[{{'prompt': f'killed poster {{i}} {uuid.uuid4().hex}'}} "
        "for i in range(20)], campaign='killed', "
        f"destination={str(tmp_path)!r}, max_concurrency=5, "
        f"images_per_task_run={images_per_task_run})",
    ]
    first = subprocess.Popen(command, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    # Killed while the second wave of five is in flight.
    while len(recovering.ledger()["billed_tasks"]) < 7:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    in_flight = len(recovering.ledger()["billed_tasks"])
    assert in_flight < 20
    second = subprocess.run(command, env=env, cwd=ROOT, timeout=300, check=False)
    assert second.returncode == 0
    ledger = recovering.ledger()
    assert ledger["credits_charged"] == 80 and len(ledger["billed_tasks"]) == 20
    assert len(list(tmp_path.rglob("*.png"))) == 20
