"""The Prefect layer end to end: flows and tasks under a real Prefect server (the test
harness), against the emulator over HTTP and a moto S3 server."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL

from prefect_journey import ImageDestination, JourneyCredentials, policy
from prefect_journey.campaigns.pipeline import CampaignReport
from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.flows.character_series import character_series
from prefect_journey.flows.generate_and_store import generate_and_store
from prefect_journey.models import ImagineRequest, ImagineResult
from prefect_journey.signing import WebhookKeys
from prefect_journey.storage import StoredImage, slugify
from prefect_journey.tasks import aimagine, astore_image, imagine, store_image
from prefect_journey.webhooks import WEBHOOK_PATH, create_webhook_app

from . import prefect_api
from .conftest import SENTINEL_KEY, SENTINEL_WEBHOOK_SECRET, Bucket, assert_thumbnail
from .test_storage import local_files

pytestmark = pytest.mark.usefixtures("prefect_harness", "fast_retries")


def calls(emulator: EmulatorServer, endpoint: str = "imagine") -> int:
    return int(emulator.ledger()["calls"].get(endpoint, 0))


def unique(prompt: str) -> str:
    """Prompts are part of the cache key; each test asks for images nobody asked for yet."""
    import uuid

    return f"{prompt} #{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_destination(bucket: Bucket) -> str:
    name = f"dest-{bucket.name}"
    ImageDestination(url=f"{bucket.url}/out", storage_options=bucket.storage_options).save(
        name, overwrite=True
    )
    return name


def test_generate_and_store_to_a_local_folder(journey_env: EmulatorServer, tmp_path: Path) -> None:
    prompt = unique("a lighthouse at dusk")
    state = generate_and_store(
        prompt, destination=str(tmp_path), aspect_ratio="16:9", return_state=True
    )
    report: CampaignReport = state.result()
    [image] = report.outcomes
    assert image.status == "stored" and report.credits_charged == 4
    name = f"0001-{slugify(prompt, 40)}.png"
    assert image.uri == (tmp_path / "images" / name).as_uri()
    assert hashlib.sha256(Path(image.uri[7:]).read_bytes()).hexdigest() == image.sha256
    run_id = prefect_api.flow_run_id(state)
    artifacts = prefect_api.artifacts([run_id])
    # The campaign's own: the image, its progress, the summary table.
    assert sorted(a.type for a in artifacts) == ["image", "progress", "table"]
    picture = next(a for a in artifacts if a.type == "image")
    # A thumbnail carried in the artifact: it shows after every link has expired.
    assert_thumbnail(picture.data, (256, 143))  # 1376x768, the emulator's 16:9
    assert "[full size](http" in picture.description  # the full image, while the link lasts
    # The run says what it made, not a random name.
    [run] = prefect_api.flow_runs([run_id])
    assert run.name.startswith("image: a lighthouse at dusk")
    names = {run.name for run in prefect_api.task_runs([run_id])}
    assert any(name.startswith("image 1: a lighthouse at dusk") for name in names)
    assert f"assets: {name}" in names
    messages = prefect_api.logs([run_id])
    assert any(
        f"task_id={image.task_id}" in m and "latency=" in m and "credits=4" in m for m in messages
    )


def test_generate_and_store_to_s3(
    journey_env: EmulatorServer, bucket: Bucket, s3_destination: str
) -> None:
    prompt = unique("a red fox")
    state = generate_and_store(prompt, destination_block=s3_destination, return_state=True)
    assert bucket.objects() == [f"out/images/0001-{slugify(prompt, 40)}.png"]
    image = next(
        a for a in prefect_api.artifacts([prefect_api.flow_run_id(state)]) if a.type == "image"
    )
    assert image.data.startswith("data:image/jpeg;base64,")  # the thumbnail, read back
    link = image.description.split("[full size](")[1].split(")")[0]
    assert link.startswith(bucket.endpoint) and "Signature=" in link  # presigned


def test_tasks_are_tagged_and_bounded_by_their_whole_ladder() -> None:
    """Each attempt has its own deadline inside the task run (test_policy); the task's
    timeout bounds every attempt, pause and delivery wait of the slowest request."""
    slowest = policy.worst_case_attempt_timeout(recovering=True)
    assert imagine.timeout_seconds == aimagine.timeout_seconds
    assert imagine.timeout_seconds > (policy.GENERATION_RETRIES + 1) * slowest
    assert store_image.timeout_seconds > (policy.STORE_RETRIES + 1) * policy.STORE_TIMEOUT
    assert imagine.retries == store_image.retries == 0  # the package's rule retries, once
    assert set(imagine.tags) == set(store_image.tags) == {"journey", "nano-banana-2"}


@pytest.mark.parametrize(("repay", "calls_made"), [(0, 1), (1, 2)])
def test_a_possibly_billed_failure_is_paid_again_only_within_the_allowance(
    journey_env: EmulatorServer, repay: int, calls_made: int
) -> None:
    journey_env.admin("faults", {"queue": {"api": ["500", "drop"]}})

    @flow
    def one() -> ImagineResult:
        request = ImagineRequest(prompt=unique("twice lost"))
        return imagine(request, repay_possibly_billed=repay)

    state = one(return_state=True)
    assert state.is_failed() and "possibly billed" in str(state.message)
    assert calls(journey_env) == calls_made
    assert journey_env.ledger()["credits_charged"] == 4 * calls_made


def test_an_async_task_run_counts_its_own_repays(journey_env: EmulatorServer) -> None:
    """Two submitted runs of aimagine on the flow's task runner, one failing twice."""
    journey_env.admin("faults", {"queue": {"api": ["500", "drop"]}})

    @flow
    def two() -> list[ImagineResult]:
        lost = aimagine.submit(ImagineRequest(prompt=unique("lost twice")), repay_possibly_billed=2)
        other = aimagine.submit(ImagineRequest(prompt=unique("fine")), wait_for=[lost])
        return [lost.result(), other.result()]

    lost, other = two()
    assert (lost.possibly_billed_attempts, lost.attempts) == (2, 3)
    assert (other.possibly_billed_attempts, other.attempts) == (0, 1)
    assert calls(journey_env) == 4


def test_safe_failures_are_retried_within_the_task_run(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    journey_env.admin("faults", {"queue": {"api": ["429", "503"]}, "retry_after": 0.05})

    @flow
    def one() -> ImagineResult:
        return imagine(ImagineRequest(prompt=unique("retry me")))

    result = one()
    assert result.status == "finished" and result.possibly_billed_attempts == 0
    assert calls(journey_env) == 3
    assert journey_env.ledger()["credits_charged"] == 4


def test_the_real_flow_retries_a_429(journey_env: EmulatorServer, tmp_path: Path) -> None:
    journey_env.admin("faults", {"queue": {"api": ["429"]}, "retry_after": 0.05})
    report = generate_and_store(unique("retry in the flow"), destination=str(tmp_path))
    assert report.stored == 1 and report.outcomes[0].attempts == 2
    assert len(local_files(tmp_path)) == 1 and calls(journey_env) == 2


def test_possibly_billed_retry_is_counted(journey_env: EmulatorServer) -> None:
    journey_env.admin("faults", {"queue": {"api": ["500"]}})

    @flow
    def one() -> ImagineResult:
        return imagine(ImagineRequest(prompt=unique("ambiguous")))

    result = one()
    assert result.possibly_billed_attempts == 1
    assert calls(journey_env) == 2 and journey_env.ledger()["credits_charged"] == 8


@pytest.mark.parametrize("case", ["400", "401", "402"])
def test_client_errors_fail_at_once_without_retry(
    journey_env: EmulatorServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str
) -> None:
    if case == "400":
        journey_env.admin("faults", {"queue": {"api": ["400"]}})
    elif case == "401":
        monkeypatch.setenv("JOURNEY_API_KEY", "wrong-key")
    else:
        journey_env.admin("config", {"credits": 0})
    try:
        state = generate_and_store(unique("no retry"), destination=str(tmp_path), return_state=True)
    finally:
        journey_env.admin("config", {"credits": 10_000})
    assert state.is_failed()
    expected = {"400": "JourneyValidationError", "401": "AuthenticationError"}
    assert expected.get(case, "InsufficientCreditsError") in str(state.message)
    # A wrong key or an empty account is found by the balance check before the call.
    assert calls(journey_env) == (1 if case == "400" else 0)
    assert local_files(tmp_path) == []


def test_cached_rerun_is_free_and_a_new_variant_is_not(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    """Three flow runs, each with Prefect's per-run start-up."""
    prompt = unique("a daily postcard")

    def postcard(day: str) -> CampaignReport:
        return generate_and_store(
            prompt, destination=str(tmp_path), variant=day, key_template="{variant}-{slug}.{ext}"
        )

    first = postcard("2026-11-25")
    journey_env.admin("reset")
    again = postcard("2026-11-25")
    assert again.outcomes[0].uri == first.outcomes[0].uri and again.cache_hits == 1
    assert journey_env.ledger()["calls_total"] == 0 and calls(journey_env, "cdn") == 0
    tomorrow = postcard("2026-11-26")
    assert calls(journey_env) == 1 and tomorrow.outcomes[0].task_id != first.outcomes[0].task_id
    assert len(local_files(tmp_path)) == 2


def test_cache_ignores_credentials_and_webhook_fields(journey_env: EmulatorServer) -> None:
    prompt = unique("same image, other key")

    @flow
    def twice() -> tuple[ImagineResult, ImagineResult]:
        plain = imagine(ImagineRequest(prompt=prompt))
        other = JourneyCredentials(api_key=SENTINEL_KEY, base_url=journey_env.url)
        hooked = ImagineRequest(
            prompt=prompt, webhook_url="https://hooks.example.com/x", webhook_secret="s"
        )
        return plain, imagine(hooked, other)

    plain, hooked = twice()
    assert plain == hooked and calls(journey_env) == 1


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_bad_download_leaves_no_object_in_the_bucket(
    journey_env: EmulatorServer, bucket: Bucket, fault: str
) -> None:
    # Every attempt of the store's ladder gets the bad bytes.
    journey_env.admin("faults", {"queue": {"cdn": [fault] * (policy.STORE_RETRIES + 1)}})

    @flow
    def store_once() -> StoredImage:
        result = imagine(ImagineRequest(prompt=unique("fragile")))
        return store_image(result, bucket.url, bucket.storage_options)

    assert store_once(return_state=True).is_failed()
    assert bucket.objects() == [] and bucket.pending_uploads() == 0


def test_bad_download_is_retried_into_exactly_one_object(
    journey_env: EmulatorServer, bucket: Bucket
) -> None:
    journey_env.admin("faults", {"queue": {"cdn": ["truncate", "corrupt"]}})

    @flow
    def store_with_retries() -> StoredImage:
        result = imagine(ImagineRequest(prompt=unique("fragile")))
        return store_image(result, bucket.url, bucket.storage_options)

    stored = store_with_retries()
    assert bucket.objects() == [f"{stored.task_id}.png"]
    assert calls(journey_env, "cdn") == 3


def test_jpeg_bytes_are_stored_as_jpg(
    journey_env: EmulatorServer, bucket: Bucket, s3_destination: str
) -> None:
    journey_env.admin("config", {"jpeg_as_png_rate": 1.0})
    prompt = unique("jpeg in disguise")
    report = generate_and_store(prompt, destination_block=s3_destination)
    assert report.outcomes[0].uri.endswith(".jpg")
    assert bucket.objects() == [f"out/images/0001-{slugify(prompt, 40)}.jpg"]


def test_character_series_presigns_once_and_reruns_free(
    journey_env: EmulatorServer, bucket: Bucket, s3_destination: str
) -> None:
    """Two runs of the character series flow, three images each, with references presigned on
    the moto server."""
    fs = bucket.fs()
    for name in ("ana", "bo"):
        fs.pipe(f"{bucket.name}/characters/{name}.png", name.encode())
    refs = [f"{bucket.url}/characters/ana.png", f"{bucket.url}/characters/bo.png"]
    scenes = [
        unique("Ana and Bo at the market"),
        unique("Ana and Bo on a train"),
        unique("Ana and Bo at night"),
    ]
    report = character_series(refs, scenes, destination_block=s3_destination, series="Autumn Trip")
    stored = [o.uri for o in report.outcomes]
    assert [uri.rsplit("/", 1)[-1][:5] for uri in stored] == ["0001-", "0002-", "0003-"]
    assert all(uri.startswith(f"s3://{bucket.name}/out/autumn-trip/") for uri in stored)
    assert len(bucket.objects()) == 2 + 3
    sent = [c["references"] for c in journey_env.ledger()["log"] if c["endpoint"] == "imagine"]
    assert len(sent) == 3 and all(
        len(refs_sent) == 2 and "Signature=" in refs_sent[0] for refs_sent in sent
    )
    journey_env.admin("reset")
    again = character_series(refs, scenes, destination_block=s3_destination, series="Autumn Trip")
    assert [o.uri for o in again.outcomes] == stored and again.cache_hits == 3
    assert journey_env.ledger()["calls_total"] == 0


def test_character_series_stores_the_rest_when_one_scene_fails(
    journey_env: EmulatorServer, tmp_path: Path
) -> None:
    journey_env.admin("faults", {"queue": {"api": ["failed"]}})
    state = character_series(
        ["https://example.com/ana.png"],
        [unique("refused"), unique("fine")],
        destination=str(tmp_path),
        return_state=True,
    )
    assert state.is_failed() and "1 of 2 items not stored" in str(state.message)
    assert "TaskFailedError" in str(state.message)
    assert len(local_files(tmp_path)) == 1


def test_async_tasks(journey_env: EmulatorServer, tmp_path: Path) -> None:
    @flow
    async def both() -> list[StoredImage]:
        requests = [ImagineRequest(prompt=unique(f"async {i}")) for i in range(3)]
        results = await asyncio.gather(*(aimagine(r) for r in requests))
        return list(await asyncio.gather(*(astore_image(r, str(tmp_path)) for r in results)))

    stored = asyncio.run(both())
    assert len(local_files(tmp_path)) == 3 and {s.format for s in stored} == {"png"}


def test_sentinel_secrets_never_reach_logs_artifacts_results_or_errors(
    journey_env: EmulatorServer,
    tmp_path: Path,
    prefect_harness: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four flow runs: two wait out the retry ladder's first pauses (2 s +/- 50 % each), one
    recovers a lost answer through a receiver and the events API; then all they left in the API
    is read back."""
    JourneyCredentials(api_key=SENTINEL_KEY, base_url=journey_env.url).save(
        "sentinel", overwrite=True
    )
    states = []
    journey_env.admin("faults", {"queue": {"api": ["500", "429"]}, "retry_after": 0.05})
    states.append(
        generate_and_store(
            unique("sentinel one"),
            destination=str(tmp_path),
            credentials_block="sentinel",
            return_state=True,
        )
    )
    journey_env.admin("faults", {"queue": {"api": ["failed"]}})
    states.append(
        generate_and_store(
            unique("sentinel two"),
            destination=str(tmp_path),
            credentials_block="sentinel",
            return_state=True,
        )
    )

    @flow
    def with_webhook() -> ImagineResult:
        credentials = JourneyCredentials.load("sentinel")
        request = ImagineRequest(
            prompt=unique("sentinel hook"),
            webhook_url="http://127.0.0.1:9/hook",
            webhook_secret=SENTINEL_WEBHOOK_SECRET,
        )
        return imagine(request, credentials)

    states.append(with_webhook(return_state=True))

    # A lost answer recovered through the receiver: the attempt's token and the webhook
    # secret travel in the request only.
    receiver = BackgroundServer(
        create_webhook_app(SENTINEL_WEBHOOK_SECRET, api_url=PREFECT_API_URL.value())
    )
    with receiver:
        monkeypatch.setenv("JOURNEY_WEBHOOK_URL", f"{receiver.url}{WEBHOOK_PATH}")
        monkeypatch.setenv("JOURNEY_WEBHOOK_SECRET", SENTINEL_WEBHOOK_SECRET)
        monkeypatch.setenv("JOURNEY_RECOVERY_WINDOW", "20")
        journey_env.admin("faults", {"queue": {"api": ["500"]}})
        states.append(
            generate_and_store(
                unique("sentinel recovered"),
                destination=str(tmp_path),
                credentials_block="sentinel",
                return_state=True,
            )
        )
    assert [s.is_completed() for s in states] == [True, False, True, True]
    tokens = [
        t.request.webhook_url.rsplit("/", 1)[1]
        for t in journey_env.state.tasks.values()
        if t.request.webhook_url and t.request.webhook_url.startswith(receiver.url)
    ]
    assert len(tokens) == 1  # one paid attempt: its lost answer was recovered, not bought again
    run_ids = [prefect_api.flow_run_id(s) for s in states]

    seen: list[str] = prefect_api.logs(run_ids)
    seen += [json.dumps(a.model_dump(mode="json")) for a in prefect_api.artifacts(run_ids)]
    for run in prefect_api.task_runs(run_ids) + prefect_api.flow_runs(run_ids):
        seen.append(json.dumps(run.state.model_dump(mode="json", exclude={"data"})))
        seen.append(str(run.state.message))
        seen.append(json.dumps(run.model_dump(mode="json", exclude={"state"})))
    try:
        states[1].result()
    except Exception as error:  # the failed run's exception, as a caller sees it
        seen.append(repr(error) + str(error))
    persisted = [p for p in prefect_harness.rglob("*") if p.is_file()]
    assert persisted, "results and cache keys are persisted"
    seen += [p.read_bytes().decode("latin-1") for p in persisted]
    assert len(seen) > 20
    # What the provider was sent in the secret's place is a secret too (it passes the
    # receiver's header check).
    provider_secret = WebhookKeys.from_secret(SENTINEL_WEBHOOK_SECRET).provider_secret
    provider_secret = provider_secret.get_secret_value()
    for text in seen:
        assert SENTINEL_KEY not in text
        assert SENTINEL_WEBHOOK_SECRET not in text and provider_secret not in text
        assert tokens[0] not in text
