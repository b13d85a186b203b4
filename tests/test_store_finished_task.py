"""The webhook-triggered store: it stores only what the receiver signed and the provider
confirms, and downloads nothing before that."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL

from prefect_journey.client import JourneyClient
from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.errors import ConfigurationError, UnverifiedDeliveryError
from prefect_journey.flows import store_finished_task
from prefect_journey.signing import SIGNATURE_FIELD, WebhookKeys, new_secret
from prefect_journey.webhooks import WEBHOOK_PATH, create_webhook_app

from . import prefect_api

pytestmark = pytest.mark.usefixtures("prefect_harness")

SECRET = new_secret()
KEYS = WebhookKeys.from_secret(SECRET)


@pytest.fixture
def delivered(
    journey_env: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """A task generated with the receiver as its webhook: the payload of the
    ``journey.task.finished`` event the receiver emitted for it, read back from Prefect."""
    monkeypatch.setenv("JOURNEY_WEBHOOK_SECRET", SECRET)
    app = create_webhook_app(SECRET, api_url=PREFECT_API_URL.value())
    with BackgroundServer(app) as receiver:
        with JourneyClient(journey_env.api_key, base_url=journey_env.url) as client:
            result = client.imagine(
                prompt="announced by its webhook",
                webhook_url=f"{receiver.url}{WEBHOOK_PATH}",
                webhook_secret=KEYS.provider_secret,
            )
        deadline = time.monotonic() + 30
        while True:
            events = [
                e
                for e in prefect_api.events("journey.task.finished")
                if e["payload"]["task_id"] == result.task_id
            ]
            if events:
                break
            assert time.monotonic() < deadline, "the receiver's event never reached Prefect"
            time.sleep(0.2)
        yield events[0]["payload"]


def downloads(emulator: EmulatorServer) -> int:
    return int(emulator.ledger()["calls"].get("cdn", 0))


def test_a_proven_event_is_stored(
    journey_env: EmulatorServer, delivered: dict[str, Any], tmp_path: Path
) -> None:
    # The parameters the store-on-webhook deployment's trigger takes from the event.
    stored = store_finished_task(
        task_id=delivered["task_id"],
        image_url=delivered["image_url"],
        signature=delivered[SIGNATURE_FIELD],
        destination=str(tmp_path),
    )
    image = journey_env.ledger()["images"][delivered["task_id"]]
    [written] = list(tmp_path.iterdir())
    assert stored.sha256 == image["sha256"] == hashlib.sha256(written.read_bytes()).hexdigest()
    assert journey_env.ledger()["credits_charged"] == 4  # the generation only: /fetch is free


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda p: {**p, SIGNATURE_FIELD: None}, id="unsigned"),
        pytest.param(lambda p: {**p, SIGNATURE_FIELD: "0" * 64}, id="bad-signature"),
        pytest.param(
            lambda p: {**p, "image_url": "https://evil.example.com/x.png"},
            id="another-url-under-the-signature",
        ),
        pytest.param(
            lambda p: {
                **p,
                SIGNATURE_FIELD: WebhookKeys.from_secret(new_secret()).sign(
                    attempt=None, task_id=p["task_id"], status="finished", image_url=p["image_url"]
                ),
            },
            id="signed-with-another-secret",
        ),
        pytest.param(
            lambda p: {
                "task_id": "no-such-task",
                "image_url": p["image_url"],
                SIGNATURE_FIELD: KEYS.sign(
                    attempt=None,
                    task_id="no-such-task",
                    status="finished",
                    image_url=p["image_url"],
                ),
            },
            id="signed-but-unknown-to-the-provider",
        ),
        pytest.param(
            lambda p: {
                "task_id": p["task_id"],
                "image_url": "https://evil.example.com/x.png",
                SIGNATURE_FIELD: KEYS.sign(
                    attempt=None,
                    task_id=p["task_id"],
                    status="finished",
                    image_url="https://evil.example.com/x.png",
                ),
            },
            id="signed-but-not-the-providers-image",
        ),
    ],
)
def test_an_unproven_event_is_refused_before_any_download(
    journey_env: EmulatorServer, delivered: dict[str, Any], tmp_path: Path, forge: Any
) -> None:
    event = forge(delivered)
    before = downloads(journey_env)
    with pytest.raises(UnverifiedDeliveryError, match="refused, nothing downloaded") as refused:
        store_finished_task(
            task_id=event["task_id"],
            image_url=event["image_url"],
            signature=event[SIGNATURE_FIELD],
            destination=str(tmp_path),
        )
    assert refused.value.task_id == event["task_id"]
    assert downloads(journey_env) == before and list(tmp_path.iterdir()) == []
    assert SECRET not in str(refused.value)


def test_without_the_secret_nothing_can_be_proven(
    journey_env: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNEY_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ConfigurationError, match="JOURNEY_WEBHOOK_SECRET"):
        store_finished_task(
            task_id="t", image_url="https://cdn.example.com/t.png", destination=str(tmp_path)
        )
    assert downloads(journey_env) == 0


def test_the_deployment_trigger_passes_the_signature() -> None:
    import yaml

    root = Path(__file__).resolve().parent.parent
    deployments = yaml.safe_load((root / "deployments" / "prefect.yaml").read_text())
    [store] = [d for d in deployments["deployments"] if d["name"] == "store-on-webhook"]
    [trigger] = store["triggers"]
    assert trigger["parameters"][SIGNATURE_FIELD] == "{{ event.payload.signature }}"
