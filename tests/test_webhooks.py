"""The webhook receiver: the emulator calls it over HTTP; secrets, replays, Prefect events."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from prefect_journey.client import JourneyClient
from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.webhooks import MAX_BODY_BYTES, WEBHOOK_PATH, create_webhook_app

from . import prefect_api

SECRET = "whsec-receiver-test"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fail_next = False

    def __call__(
        self, event: str, resource: dict[str, str], payload: dict[str, Any], event_id: uuid.UUID
    ) -> bool:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("Prefect API unreachable")
        self.events.append((event, payload))
        return True


@pytest.fixture
def receiver() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    with BackgroundServer(create_webhook_app(SECRET, emit=recorder)) as server:
        yield f"{server.url}{WEBHOOK_PATH}", recorder


def wait_for_webhooks(emulator: EmulatorServer, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while len(emulator.ledger()["webhooks"]) < count:
        assert time.monotonic() < deadline, "webhook not delivered"
        time.sleep(0.05)
    return list(emulator.ledger()["webhooks"])


def test_emulator_delivery_becomes_one_event(
    emulator: EmulatorServer, receiver: tuple[str, Recorder]
) -> None:
    url, recorder = receiver
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        result = client.imagine(prompt="hooked", webhook_url=url, webhook_secret=SECRET)
    [delivery] = wait_for_webhooks(emulator, 1)
    assert delivery["status_code"] == 200
    [(event, payload)] = recorder.events
    assert event == "journey.task.finished"
    assert payload["task_id"] == result.task_id and payload["image_url"] == result.image_url


def test_failed_task_becomes_a_failed_event(
    emulator: EmulatorServer, receiver: tuple[str, Recorder]
) -> None:
    url, recorder = receiver
    emulator.admin("faults", {"queue": {"api": ["failed"]}})
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client, pytest.raises(Exception):
        client.imagine(prompt="refused", webhook_url=url, webhook_secret=SECRET)
    wait_for_webhooks(emulator, 1)
    [(event, payload)] = recorder.events
    assert event == "journey.task.failed" and payload["error"] == "Content policy violation"


def test_wrong_secret_is_refused_and_emits_nothing(
    emulator: EmulatorServer, receiver: tuple[str, Recorder]
) -> None:
    url, recorder = receiver
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        client.imagine(prompt="forged", webhook_url=url, webhook_secret="not-the-secret")
    [delivery] = wait_for_webhooks(emulator, 1)
    assert delivery["status_code"] == 401 and recorder.events == []


def test_replayed_delivery_emits_once(receiver: tuple[str, Recorder]) -> None:
    url, recorder = receiver
    body = {"task_id": "t-1", "status": "finished", "image_url": "https://cdn.example.com/t-1.png"}
    answers = [httpx.post(url, json=body, headers={"x-webhook-secret": SECRET}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[1].json() == {"duplicate": True}
    assert len(recorder.events) == 1


@pytest.mark.parametrize(
    ("headers", "content", "status"),
    [
        ({}, b'{"task_id": "t", "status": "finished"}', 401),
        ({"x-webhook-secret": ""}, b'{"task_id": "t", "status": "finished"}', 401),
        ({"x-webhook-secret": SECRET[:-1]}, b'{"task_id": "t", "status": "finished"}', 401),
        ({"x-webhook-secret": SECRET}, b"not json", 400),
        ({"x-webhook-secret": SECRET}, b'{"status": "finished"}', 400),
        ({"x-webhook-secret": SECRET}, b"[1, 2]", 400),
        ({"x-webhook-secret": SECRET}, b'{"task_id": "t", "status": "processing"}', 202),
        ({"x-webhook-secret": SECRET}, b" " * (MAX_BODY_BYTES + 1), 413),
    ],
)
def test_bad_deliveries(
    receiver: tuple[str, Recorder], headers: dict[str, str], content: bytes, status: int
) -> None:
    url, recorder = receiver
    assert httpx.post(url, content=content, headers=headers).status_code == status
    assert recorder.events == []


def test_emit_failure_asks_the_provider_to_retry(receiver: tuple[str, Recorder]) -> None:
    url, recorder = receiver
    recorder.fail_next = True
    body = {"task_id": "t-2", "status": "finished", "image_url": "https://cdn.example.com/t-2.png"}
    first = httpx.post(url, json=body, headers={"x-webhook-secret": SECRET})
    second = httpx.post(url, json=body, headers={"x-webhook-secret": SECRET})
    assert (first.status_code, second.status_code) == (503, 200) and len(recorder.events) == 1


def test_blank_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="JOURNEY_WEBHOOK_SECRET"):
        create_webhook_app("  ")


@pytest.mark.usefixtures("prefect_harness")
def test_events_reach_prefect(emulator: EmulatorServer) -> None:
    with BackgroundServer(create_webhook_app(SECRET)) as server:
        url = f"{server.url}{WEBHOOK_PATH}"
        with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
            result = client.imagine(prompt="to prefect", webhook_url=url, webhook_secret=SECRET)
        wait_for_webhooks(emulator, 1)
        httpx.post(
            url,
            json={"task_id": result.task_id, "status": "finished"},
            headers={"x-webhook-secret": SECRET},
        )
        resource = f"journey.task.{result.task_id}"
        deadline = time.monotonic() + 30
        while True:
            matching = [
                e
                for e in prefect_api.events("journey.task.finished")
                if e["resource"]["prefect.resource.id"] == resource
            ]
            if matching:
                break
            assert time.monotonic() < deadline, "event not in Prefect"
            time.sleep(0.5)
        time.sleep(1)
        matching = [
            e
            for e in prefect_api.events("journey.task.finished")
            if e["resource"]["prefect.resource.id"] == resource
        ]
        assert len(matching) == 1 and matching[0]["payload"]["image_url"] == result.image_url
        assert SECRET not in str(matching)
