"""Never pay twice: a possibly-billed attempt is recovered from its webhook delivery, through
the emulator (which delivers whatever happened to the HTTP answer), the package's receiver
and a real Prefect server's events API, in both executors of the campaign pipeline."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events import Event
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

from prefect_journey import policy
from prefect_journey.attempts import (
    AttemptRecord,
    recorded_attempts,
    records_left,
    save_attempts,
    sweep_expired,
)
from prefect_journey.deliveries import Delivery, proven_result, signed_task
from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.errors import JourneyConnectionError, NotFoundError, TaskFailedError
from prefect_journey.flows.campaign import batch_campaign
from prefect_journey.models import ImagineRequest, ImagineResult, TaskStatus
from prefect_journey.signing import SIGNATURE_FIELD, WebhookKeys, new_secret
from prefect_journey.tasks import aimagine, imagine
from prefect_journey.tokens import attempt_id, attempt_resource, mint_token
from prefect_journey.webhooks import WEBHOOK_PATH, create_webhook_app
from reliability.soak import READ_TIMEOUT, SLOW_SECONDS

from . import prefect_api
from .conftest import process_env

pytestmark = pytest.mark.usefixtures("prefect_harness")

SECRET = "whsec-recovery-test-2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0"
KEYS = WebhookKeys.from_secret(SECRET)
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
    # An attempt's delivery is waited for until sent + its timeout + the window; the connect
    # timeout and the margin in that timeout are scaled down with everything else here.
    monkeypatch.setattr(policy, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(policy, "ATTEMPT_TIMEOUT_MARGIN", 0.5)
    return journey_env


def items(n: int) -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    return [{"prompt": f"recovered poster {i} #{tag}"} for i in range(n)]


def campaign_of(n: int, name: str, tmp_path: Path, images_per_task_run: int, **options: Any) -> Any:
    """``batch_campaign`` of ``n`` new items into ``tmp_path``, in the executor given."""
    return batch_campaign(
        items=items(n),
        campaign=name,
        destination=str(tmp_path),
        images_per_task_run=images_per_task_run,
        **options,
    )


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
    report = campaign_of(4, "recovered", tmp_path, images_per_task_run, max_concurrency=4)
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
    report = campaign_of(1, "undelivered", tmp_path, images_per_task_run)
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
    report = campaign_of(2, "duplicated", tmp_path, images_per_task_run)
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
        f"{receiver_url}/{mint_token(KEYS.token_key)}",
        json=foreign,
        headers={"x-webhook-secret": KEYS.provider_secret.get_secret_value()},
    )
    assert answer.status_code == 200
    monkeypatch.setenv("JOURNEY_RECOVERY_WINDOW", "3")
    recovering.admin("faults", {"queue": {"api": ["500"], "webhook": ["lost"]}})
    report = campaign_of(1, "foreign", tmp_path, images_per_task_run)
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


def signed(attempt: str, **task: Any) -> Delivery:
    """A delivery of ``task`` for ``attempt`` as the receiver signs it."""
    signature = KEYS.sign(
        attempt=attempt,
        task_id=task["task_id"],
        status=task["status"],
        image_url=task.get("image_url"),
    )
    return Delivery(uuid.uuid4(), attempt, {**task, SIGNATURE_FIELD: signature})


def test_only_a_signed_delivery_that_the_provider_confirms_is_believed() -> None:
    now = time.time()
    records = [AttemptRecord(id="a" * 32, sent_at=now, deadline=now + 9, expires_at=now + 99)]
    image = "https://cdn.example.com/t-1.png"
    finished = {"task_id": "t-1", "status": "finished", "image_url": image}
    delivery = signed("a" * 32, **finished)
    task = signed_task(delivery, KEYS)
    assert task is not None
    confirmed = TaskStatus(task_id="t-1", status="finished", image_url=image)
    found = proven_result(delivery, task, confirmed, records, charged=4)
    assert isinstance(found, ImagineResult) and found.recovered and found.credits_charged == 4
    # Unsigned, signed with another secret's key, or for another attempt: not a delivery.
    forged = Delivery(uuid.uuid4(), "a" * 32, {**finished, SIGNATURE_FIELD: "0" * 64})
    assert signed_task(forged, KEYS) is None
    assert signed_task(Delivery(uuid.uuid4(), "a" * 32, dict(finished)), KEYS) is None
    assert signed_task(delivery, WebhookKeys.from_secret(new_secret())) is None
    assert signed_task(Delivery(uuid.uuid4(), "b" * 32, delivery.payload), KEYS) is None
    # Signed, but the provider disagrees: another image, unknown, refused, not finished.
    moved = TaskStatus(task_id="t-1", status="finished", image_url="https://evil.example/x.png")
    assert proven_result(delivery, task, moved, records, charged=4) is None
    unknown = NotFoundError("Task not found")  # not yet, maybe: asked again, never believed
    assert proven_result(delivery, task, unknown, records, charged=4) == "again"
    refused = TaskFailedError("task t-1 failed: no", task_id="t-1")
    assert proven_result(delivery, task, refused, records, charged=4) is None
    pending = TaskStatus(task_id="t-1", status="processing")
    assert proven_result(delivery, task, pending, records, charged=4) == "again"
    cut = JourneyConnectionError("connection refused")
    assert proven_result(delivery, task, cut, records, charged=4) == "again"
    # A refusal is believed when the provider reports it too.
    failed = signed("a" * 32, task_id="t-2", status="failed", error="Content policy violation")
    failed_task = signed_task(failed, KEYS)
    assert failed_task is not None
    with pytest.raises(TaskFailedError):
        proven_result(failed, failed_task, refused, records, charged=4)
    done = TaskStatus(task_id="t-2", status="finished", image_url=image)
    assert proven_result(failed, failed_task, done, records, charged=4) is None


def emit_while_waiting(emulator: EmulatorServer, make_event: Any) -> threading.Thread:
    """Emit, with a plain Prefect client, the events ``make_event(attempt_id)`` describes
    (name, payload, how many) about the first attempt the emulator receives, as soon as it
    has received one."""

    def forge() -> None:
        deadline = time.monotonic() + 60
        while not [t for t in emulator.state.tasks.values() if t.request.webhook_url]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [task] = [t for t in emulator.state.tasks.values() if t.request.webhook_url]
        attempt = attempt_id(str(task.request.webhook_url).rsplit("/", 1)[1])
        event, payload, copies = make_event(attempt)
        bodies = [
            Event.model_validate(
                {
                    "event": event,
                    "resource": {"prefect.resource.id": attempt_resource(attempt)},
                    "payload": payload,
                    "id": uuid.uuid4(),
                }
            ).model_dump(mode="json")
            for _ in range(copies)
        ]
        with get_client(sync_client=True) as client:
            client.request("POST", "/events", json=bodies).raise_for_status()

    thread = threading.Thread(target=forge)
    thread.start()
    return thread


FOREIGN_IMAGE = "https://evil.example.com/not-from-the-provider.png"


@BOTH_MODES
@pytest.mark.parametrize(
    "forgery",
    [
        pytest.param(
            lambda attempt: (
                "journey.attempt.finished",
                {"task_id": "forged", "status": "finished", "image_url": FOREIGN_IMAGE},
                1,
            ),
            id="finished-unsigned",
        ),
        pytest.param(
            lambda attempt: (
                "journey.attempt.finished",
                {"task_id": "forged", "status": "finished", "image_url": FOREIGN_IMAGE},
                120,  # more than a page of the events API: the real one must still be read
            ),
            id="flood-unsigned",
        ),
        pytest.param(
            lambda attempt: (
                "journey.attempt.failed",
                {"task_id": "forged", "status": "failed", "error": "Content policy violation"},
                1,
            ),
            id="failed-unsigned",
        ),
        pytest.param(
            lambda attempt: (
                "journey.attempt.finished",
                {
                    "task_id": "unknown-task",
                    "status": "finished",
                    "image_url": FOREIGN_IMAGE,
                    SIGNATURE_FIELD: KEYS.sign(
                        attempt=attempt,
                        task_id="unknown-task",
                        status="finished",
                        image_url=FOREIGN_IMAGE,
                    ),
                },
                1,
            ),
            id="signed-unknown-task",
        ),
    ],
)
def test_a_forged_delivery_is_refused_and_the_real_one_waited_for(
    recovering: EmulatorServer,
    tmp_path: Path,
    images_per_task_run: int,
    forgery: Any,
) -> None:
    """The real delivery comes 4 s late, after the forged event: the run asks the events API
    once a second."""
    recovering.admin("faults", {"queue": {"api": ["500"], "webhook": ["late"]}, "late_seconds": 4})
    forger = emit_while_waiting(recovering, forgery)
    state = campaign_of(1, "forged", tmp_path, images_per_task_run, return_state=True)
    forger.join()
    report = state.result()
    ledger = recovering.ledger()
    [outcome] = report.outcomes
    # The real image, recovered from its real delivery: not the forged one, not bought again.
    assert outcome.status == "stored" and outcome.recovered
    assert outcome.task_id in ledger["billed_tasks"] and ledger["credits_charged"] == 4
    assert report.credits_charged == 4 and report.calls == 1
    stored = next(tmp_path.rglob("*.png")).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == ledger["images"][outcome.task_id]["sha256"]
    # The forgery was read and refused (the run's log says so), never downloaded.
    log = prefect_api.logs([prefect_api.flow_run_id(state)])
    # An unsigned event is refused; a signed one the provider does not know is never
    # believed, and asked about again until the deadline.
    judged = ("refused a delivery for attempt", "the provider does not confirm task")
    assert [line for line in log if line.startswith(judged)], log
    assert ledger["calls"]["cdn"] == 1  # the real image's download, and nothing else


@BOTH_MODES
def test_a_503_from_a_gateway_is_delivered_after_all_and_not_bought_again(
    recovering: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """The retry waits the 503's Retry-After, 3 s: time for the delivery to reach Prefect."""
    # A gateway answered 503 while the provider made (and billed) the image: the check
    # before the retry pays finds its delivery.
    recovering.admin("faults", {"queue": {"api": ["gateway_503"]}, "retry_after": 3})
    report = campaign_of(1, "gateway-503", tmp_path, images_per_task_run)
    ledger = recovering.ledger()
    assert report.stored == 1 and report.outcomes[0].recovered
    assert ledger["credits_charged"] == 4 and len(ledger["billed_tasks"]) == 1
    assert records_left() == []


@BOTH_MODES
def test_the_wait_for_a_delivery_counts_from_when_the_attempt_was_sent(
    recovering: EmulatorServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    images_per_task_run: int,
) -> None:
    """The generation takes 3.5 s after a gateway's early 502; the window is 3 s."""
    monkeypatch.setenv("JOURNEY_RECOVERY_WINDOW", "3")
    # Counted from the 502, the wait would end before the delivery; counted from the
    # sending, it ends 1 + 4 + 0.5 + 3 s after it (connect, read and margin scaled down).
    recovering.admin("config", {"fixed": 3.5})
    recovering.admin("faults", {"queue": {"api": ["gateway_502"]}})
    report = campaign_of(1, "early-502", tmp_path, images_per_task_run)
    # Counted from the failure, the window would have ended at 3 s and bought it again.
    assert report.stored == 1 and report.outcomes[0].recovered and report.calls == 1
    assert recovering.ledger()["credits_charged"] == 4
    assert records_left() == []


@BOTH_MODES
def test_a_refused_image_leaves_no_attempt_record(
    recovering: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """The retry after the 503 waits the ladder's first pause (2 s +/- 50 %)."""
    # The 503's record is kept for the check before the retry; the refusal that follows
    # settles the image, and nothing of it is left to read.
    recovering.admin("faults", {"queue": {"api": ["503", "failed"]}})
    before = set(records_left())
    report = campaign_of(1, "refused", tmp_path, images_per_task_run, allow_failures=True)
    assert report.failed == 1 and report.outcomes[0].reason.startswith("TaskFailedError")
    assert set(records_left()) - before == set()


def test_expired_attempt_records_are_swept_and_live_ones_kept() -> None:
    now = time.time()
    expired = AttemptRecord(id="e" * 32, sent_at=now - 900, deadline=now - 800, expires_at=now - 1)
    live = AttemptRecord(id="l" * 32, sent_at=now, deadline=now + 60, expires_at=now + 200)
    tag = uuid.uuid4().hex
    save_attempts(f"swept-{tag}", [expired])
    save_attempts(f"kept-{tag}", [expired, live])
    assert sweep_expired() >= 1
    left = records_left()
    assert f"journey-attempts-swept-{tag}.json" not in left
    assert f"journey-attempts-kept-{tag}.json" in left
    # The next reader of a document drops its expired records, and the last one deletes it.
    assert [r.id for r in recorded_attempts(f"kept-{tag}")] == [live.id]
    save_attempts(f"kept-{tag}", [])
    assert f"journey-attempts-kept-{tag}.json" not in records_left()


@pytest.mark.slow
@BOTH_MODES
def test_a_killed_runs_calls_are_recovered_by_the_next_run(
    recovering: EmulatorServer, receiver_url: str, tmp_path: Path, images_per_task_run: int
) -> None:
    """20 images, 5 at a time, killed with SIGKILL mid-run: the re-run pays for 20 in all."""
    recovering.admin("config", {"fixed": 3.0})
    env = process_env(PREFECT_LOCAL_STORAGE_PATH.value(), JOURNEY_LOCK_LEASE_SECONDS="2")
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


def test_an_image_paid_by_a_run_that_died_before_caching_it_is_recovered_not_bought_again(
    recovering: EmulatorServer, tmp_path: Path
) -> None:
    """The paid generation returns, and its process dies before the image's cache record is
    written: the next run finds the attempt's record and its delivery (the events API, once
    a second)."""
    from prefect import get_run_logger

    from prefect_journey.cache import imagine_cache_key
    from prefect_journey.client import AsyncJourneyClient
    from prefect_journey.generation import PaidCalls, generate
    from prefect_journey.receiver import load_receiver

    [row] = items(1)
    request = ImagineRequest(prompt=row["prompt"])
    key = imagine_cache_key(request, "", recovering.url)

    @flow
    def dies_before_caching() -> ImagineResult:
        async def paid() -> ImagineResult:
            async with AsyncJourneyClient(max_retries=0) as api:
                calls = PaidCalls(api, receiver=load_receiver())
                return await generate(request, calls, key=key, logger=get_run_logger())

        return asyncio.run(paid())

    first = dies_before_caching()
    assert [r.id for r in recorded_attempts(key)]  # the attempt is still on record
    report = batch_campaign(items=[row], destination=str(tmp_path))
    ledger = recovering.ledger()
    assert report.stored == 1 and report.outcomes[0].task_id == first.task_id
    assert report.calls == 0 and ledger["credits_charged"] == 4
    assert ledger["billed_tasks"] == [first.task_id] and recorded_attempts(key) == []
