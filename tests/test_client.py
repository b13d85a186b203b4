"""The client against the emulator over real loopback HTTP."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest

from prefect_journey import client as client_module
from prefect_journey.client import AsyncJourneyClient, JourneyClient
from prefect_journey.emulator import EmulatorServer
from prefect_journey.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionDroppedError,
    InsufficientCreditsError,
    JourneyConnectionError,
    JourneyError,
    JourneyTimeoutError,
    MalformedResponseError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    ServiceUnavailableError,
    TaskFailedError,
)
from prefect_journey.imageformat import inspect_bytes
from prefect_journey.models import ASPECT_RATIOS, RESOLUTIONS, output_size

from .conftest import SENTINEL_KEY, SENTINEL_WEBHOOK_SECRET, free_port


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Record the client's back-off sleeps instead of waiting them out.

    Only the client module sees the recording clock: patching ``time.sleep`` itself made
    every other thread that sleeps in a loop (the lock renewer left by earlier tests) spin,
    appending to this list until the machine ran out of memory."""
    recorded: list[float] = []
    clock = SimpleNamespace(monotonic=time.monotonic, sleep=recorded.append)
    monkeypatch.setattr(client_module, "time", clock)
    yield recorded


def make_client(emulator: EmulatorServer, **options: object) -> JourneyClient:
    return JourneyClient(emulator.api_key, base_url=emulator.url, **options)  # type: ignore[arg-type]


def imagine_calls(emulator: EmulatorServer) -> int:
    return int(emulator.ledger()["calls"].get("imagine", 0))


def test_imagine_fetch_account(emulator: EmulatorServer) -> None:
    with make_client(emulator) as client:
        before = client.account()
        result = client.imagine(prompt="a lighthouse at dusk", aspect_ratio="3:4", resolution="2K")
        assert result.status == "finished" and result.credits_charged == 4
        assert result.attempts == 1 and result.elapsed_seconds > 0
        task = client.fetch(result.task_id)
        assert task.status == "finished" and task.image_url == result.image_url
        assert task.percentage == 100
        after = client.account()
    assert after.credits == before.credits - 4
    assert after.total_images == before.total_images + 1
    image = inspect_bytes(httpx.get(result.image_url).content)
    assert (image.format, image.width, image.height) == ("png", 1792, 2400)


def test_many_references_are_accepted(emulator: EmulatorServer) -> None:
    refs = [f"https://cdn.example.com/{i}.png" for i in range(14)]
    with make_client(emulator) as client:
        result = client.imagine(prompt="the same two characters", image_urls=refs)
    assert result.status == "finished"


def test_env_vars_configure_the_client(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNEY_API_KEY", emulator.api_key)
    monkeypatch.setenv("JOURNEY_BASE_URL", emulator.url + "/api/v1/")
    with JourneyClient() as client:
        assert client.account().credits > 0


def test_missing_key_says_how_to_provide_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNEY_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="JOURNEY_API_KEY"):
        JourneyClient()


@pytest.mark.parametrize(
    "base_url", ["http://api.example.com", "ftp://127.0.0.1", "not a url", "https://u:p@h.com"]
)
def test_unsafe_base_url_is_refused(base_url: str) -> None:
    with pytest.raises(ConfigurationError):
        JourneyClient("k", base_url=base_url)


def test_wrong_key_is_authentication_error_not_retried(emulator: EmulatorServer) -> None:
    with JourneyClient("wrong-key", base_url=emulator.url) as client:
        with pytest.raises(AuthenticationError) as caught:
            client.imagine(prompt="p")
    assert caught.value.status_code == 401 and not caught.value.retryable
    assert imagine_calls(emulator) == 1


def test_out_of_credits_is_insufficient_credits(emulator: EmulatorServer) -> None:
    emulator.admin("config", {"credits": 6})
    with make_client(emulator) as client:
        client.imagine(prompt="first")
        with pytest.raises(InsufficientCreditsError, match="402"):
            client.imagine(prompt="second")
        assert client.account().credits == 2
    emulator.admin("config", {"credits": 10_000})


def test_unknown_task_is_not_found(emulator: EmulatorServer) -> None:
    with make_client(emulator) as client, pytest.raises(NotFoundError):
        client.fetch("no-such-task")


def test_429_and_503_are_retried_honouring_retry_after(
    emulator: EmulatorServer, sleeps: list[float]
) -> None:
    emulator.admin("faults", {"queue": {"api": ["429", "503"]}, "retry_after": 7})
    with make_client(emulator) as client:
        result = client.imagine(prompt="p")
    assert result.attempts == 3
    assert sleeps == [7.0, 7.0]
    ledger = emulator.ledger()
    assert [c["status"] for c in ledger["log"] if c["endpoint"] == "imagine"] == [429, 503, 200]
    assert ledger["credits_charged"] == 4


def test_retry_after_above_the_cap_is_handed_to_the_caller(
    emulator: EmulatorServer, sleeps: list[float]
) -> None:
    emulator.admin("faults", {"queue": {"api": ["429"]}, "retry_after": 600})
    with make_client(emulator) as client, pytest.raises(RateLimitedError) as caught:
        client.imagine(prompt="p")
    assert caught.value.retry_after == 600 and caught.value.retryable
    assert sleeps == []


def test_retries_stop_after_max_retries(emulator: EmulatorServer, sleeps: list[float]) -> None:
    emulator.admin("faults", {"queue": {"api": ["503"] * 5}, "retry_after": 1})
    with make_client(emulator, max_retries=2) as client:
        with pytest.raises(ServiceUnavailableError):
            client.imagine(prompt="p")
    assert imagine_calls(emulator) == 3 and len(sleeps) == 2


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [
        ("500", ServerError),
        ("drop", ConnectionDroppedError),
        ("malformed", MalformedResponseError),
    ],
)
def test_possibly_billed_failures_are_surfaced_not_retried(
    emulator: EmulatorServer, sleeps: list[float], fault: str, error_class: type[JourneyError]
) -> None:
    emulator.admin("faults", {"queue": {"api": [fault]}})
    with make_client(emulator) as client, pytest.raises(error_class) as caught:
        client.imagine(prompt="p")
    assert caught.value.possibly_billed and not caught.value.retryable
    assert "possibly billed" in str(caught.value)
    assert imagine_calls(emulator) == 1 and sleeps == []
    assert emulator.ledger()["credits_charged"] == 4  # the emulator did bill it


def test_read_timeout_is_possibly_billed(emulator: EmulatorServer) -> None:
    emulator.admin("faults", {"queue": {"api": ["slow"]}, "slow_seconds": 3})
    with make_client(emulator, read_timeout=0.5) as client:
        with pytest.raises(JourneyTimeoutError) as caught:
            client.imagine(prompt="p")
    assert caught.value.possibly_billed
    assert imagine_calls(emulator) == 1


def test_failed_task_is_task_failed_error(emulator: EmulatorServer) -> None:
    emulator.admin("faults", {"queue": {"api": ["failed"]}})
    with make_client(emulator) as client, pytest.raises(TaskFailedError) as caught:
        client.imagine(prompt="p")
    assert caught.value.reason == "Content policy violation" and caught.value.task_id
    assert emulator.ledger()["credits_charged"] == 0


def test_connection_refused_is_retried_then_raised(sleeps: list[float]) -> None:
    with JourneyClient("k", base_url=f"http://127.0.0.1:{free_port()}", max_retries=2) as client:
        with pytest.raises(JourneyConnectionError) as caught:
            client.account()
    assert caught.value.retryable and len(sleeps) == 2
    assert all(0 < delay <= 8 for delay in sleeps)


@pytest.mark.parametrize(
    ("ratio", "resolution"), [(r, s) for r in ASPECT_RATIOS for s in RESOLUTIONS]
)
def test_image_has_the_documented_size(
    emulator: EmulatorServer, ratio: str, resolution: str
) -> None:
    with make_client(emulator) as client:
        result = client.imagine(
            prompt=f"{ratio} at {resolution}", aspect_ratio=ratio, resolution=resolution
        )
    image = inspect_bytes(httpx.get(result.image_url, timeout=60).content)
    assert (image.width, image.height) == output_size(ratio, resolution)


def test_jpeg_served_under_png_url_is_detected(emulator: EmulatorServer) -> None:
    emulator.admin("config", {"jpeg_as_png_rate": 1.0})
    with make_client(emulator) as client:
        result = client.imagine(prompt="p", aspect_ratio="9:16")
    response = httpx.get(result.image_url)
    assert result.image_url.endswith(".png")
    assert response.headers["content-type"] == "image/png"
    image = inspect_bytes(response.content)
    assert (image.format, image.extension, image.width) == ("jpeg", "jpg", 768)


def test_api_key_never_appears_in_errors(emulator: EmulatorServer, sleeps: list[float]) -> None:
    failures: list[BaseException] = []
    with JourneyClient(SENTINEL_KEY, base_url=emulator.url, read_timeout=0.5) as client:
        assert SENTINEL_KEY not in repr(client) and SENTINEL_KEY not in str(vars(client))
        for fault in ["500", "drop", "malformed", "failed", "slow"]:
            emulator.admin("faults", {"queue": {"api": [fault]}, "slow_seconds": 2})
            with pytest.raises(JourneyError) as caught:
                client.imagine(
                    prompt="p",
                    webhook_url="http://127.0.0.1:9/hook",
                    webhook_secret=SENTINEL_WEBHOOK_SECRET,
                )
            failures.append(caught.value)
        with pytest.raises(NotFoundError) as not_found:
            client.fetch("missing")
        failures.append(not_found.value)
    with JourneyClient(
        SENTINEL_KEY, base_url=f"http://127.0.0.1:{free_port()}", max_retries=0
    ) as dead:
        with pytest.raises(JourneyConnectionError) as refused:
            dead.account()
        failures.append(refused.value)
    for error in failures:
        text = "".join(traceback.format_exception(error)) + repr(error) + repr(error.args)
        assert SENTINEL_KEY not in text
        assert SENTINEL_WEBHOOK_SECRET not in text


def test_server_error_text_is_redacted() -> None:
    def echo_key(request: httpx.Request) -> httpx.Response:
        leaked = request.headers["Authorization"]
        return httpx.Response(400, json={"errors": [{"msg": f"bad key {leaked}"}]})

    with JourneyClient(SENTINEL_KEY, transport=httpx.MockTransport(echo_key)) as client:
        with pytest.raises(JourneyError) as caught:
            client.account()
    assert SENTINEL_KEY not in str(caught.value) and "[REDACTED]" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, "JourneyValidationError"),
        (401, "AuthenticationError"),
        (402, "InsufficientCreditsError"),
        (403, "AuthenticationError"),
        (404, "NotFoundError"),
        (409, "APIStatusError"),
        (422, "JourneyValidationError"),
        (429, "RateLimitedError"),
        (500, "ServerError"),
        (502, "ServerError"),
        (503, "ServiceUnavailableError"),
        (504, "ServerError"),
    ],
)
def test_status_mapping(status: int, error_class: str, sleeps: list[float]) -> None:
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={}, headers={"Retry-After": "1"})

    with JourneyClient("k", transport=httpx.MockTransport(answer), max_retries=1) as client:
        with pytest.raises(JourneyError) as caught:
            client.imagine(prompt="p")
    assert type(caught.value).__name__ == error_class
    retried = status in (429, 503)
    assert len(calls) == (2 if retried else 1)


def test_idempotent_calls_retry_possibly_billed_failures(sleeps: list[float]) -> None:
    answers = iter(
        [httpx.Response(502, json={}), httpx.Response(200, json={"email": "e", "credits": 3})]
    )
    with JourneyClient("k", transport=httpx.MockTransport(lambda r: next(answers))) as client:
        assert client.account().credits == 3
    assert len(sleeps) == 1


def test_redirects_are_not_followed_with_the_key() -> None:
    seen_hosts = []

    def redirect(request: httpx.Request) -> httpx.Response:
        seen_hosts.append(request.url.host)
        return httpx.Response(302, headers={"Location": "https://evil.example/steal"})

    with JourneyClient("k", transport=httpx.MockTransport(redirect)) as client:
        with pytest.raises(JourneyError):
            client.account()
    assert seen_hosts == ["api.journeyapi.com"]


def test_async_client(emulator: EmulatorServer) -> None:
    async def scenario() -> None:
        emulator.admin("faults", {"queue": {"api": ["429"]}, "retry_after": 0.05})
        async with AsyncJourneyClient(emulator.api_key, base_url=emulator.url) as client:
            results = await asyncio.gather(*(client.imagine(prompt=f"p{i}") for i in range(4)))
            assert {r.status for r in results} == {"finished"}
            assert sum(r.attempts for r in results) == 5
            task = await client.fetch(results[0].task_id)
            assert task.image_url == results[0].image_url
            account = await client.account()
            assert account.credits == 10_000 - 16
        async with AsyncJourneyClient("bad", base_url=emulator.url) as client:
            with pytest.raises(AuthenticationError):
                await client.account()

    asyncio.run(scenario())
