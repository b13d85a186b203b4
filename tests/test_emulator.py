"""The emulator as a product: CLI start-up, latency model, seeded faults, webhooks, ledger."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import httpx
import pytest

from prefect_journey.client import JourneyClient
from prefect_journey.emulator import EmulatorServer, FaultPlan, LatencyModel
from prefect_journey.emulator.images import EncodedAs, render_image
from prefect_journey.imageformat import inspect_bytes

from .conftest import free_port


def test_cli_emulator_answers_the_contract_curl() -> None:
    port = free_port()
    env = {**os.environ, "JOURNEY_API_KEY": "cli-key"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_journey.cli",
            "emulator",
            "--port",
            str(port),
            "--time-scale",
            "0.01",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/_emulator/ledger")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "emulator did not start"
                time.sleep(0.1)
        # The request from the model page, byte for byte.
        response = httpx.post(
            f"{base}/api/v1/imagine",
            headers={"Authorization": "cli-key", "Content-Type": "application/json"},
            content=json.dumps(
                {
                    "model": "nano-banana-2",
                    "prompt": "the character in a cozy coffee shop, watercolor style",
                    "image_url": "https://example.com/character-ref.jpg",
                    "resolution": "2K",
                    "aspect_ratio": "3:4",
                }
            ),
        )
        body = response.json()
        assert response.status_code == 200 and body["status"] == "finished"
        assert set(body) == {"task_id", "status", "image_url"}
        image = inspect_bytes(httpx.get(body["image_url"]).content)
        assert (image.width, image.height) == (1792, 2400)
        unauthorised = httpx.post(
            f"{base}/api/v1/imagine", headers={"Authorization": "nope"}, json={}
        )
        assert (unauthorised.status_code, unauthorised.json()) == (401, {})
        invalid = httpx.post(
            f"{base}/api/v1/imagine",
            headers={"Authorization": "cli-key"},
            json={"prompt": "x", "resolution": "8K"},
        )
        assert invalid.status_code == 400 and invalid.json()["errors"][0]["msg"]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_default_latency_is_realistic() -> None:
    model = LatencyModel()
    rng = random.Random(0)
    samples = [model.seconds(14, "1K", rng) for _ in range(200)]
    assert min(samples) >= 30 and max(samples) <= 60
    assert model.seconds(0, "4K", rng) > model.seconds(0, "1K", rng)
    assert LatencyModel(time_scale=0.01).seconds(14, "1K", rng) < 0.6
    assert LatencyModel(fixed=2.0).seconds(14, "4K", rng) == 2.0


def test_fault_plan_is_seeded_and_reproducible() -> None:
    rates = {"429": 0.1, "500": 0.1, "drop": 0.05, "truncate": 0.1}
    plan_a, plan_b = FaultPlan(rates=rates, seed=7), FaultPlan(rates=rates, seed=7)
    draws_a = [plan_a.draw("api") for _ in range(500)]
    draws_b = [plan_b.draw("api") for _ in range(500)]
    assert draws_a == draws_b
    share = sum(d is not None for d in draws_a) / 500
    assert 0.15 < share < 0.35
    with pytest.raises(ValueError, match="unknown fault"):
        FaultPlan(rates={"teapot": 0.1})


def test_cdn_faults_are_caught_by_verification(emulator: EmulatorServer) -> None:
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        result = client.imagine(prompt="p")
    emulator.admin("faults", {"queue": {"cdn": ["truncate", "corrupt"]}})
    for _ in range(2):
        with pytest.raises(ValueError):
            inspect_bytes(httpx.get(result.image_url).content)
    assert inspect_bytes(httpx.get(result.image_url).content).format == "png"
    assert emulator.ledger()["images"][result.task_id]["format"] == "png"


def test_cdn_serves_the_image_rendered_once_during_generation(emulator: EmulatorServer) -> None:
    emulator.admin("config", {"realistic_sizes": True})  # grain: a render is never repeated
    try:
        with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
            result = client.imagine(prompt="grainy")
        first, second = (httpx.get(result.image_url).content for _ in range(2))
    finally:
        emulator.admin("config", {"realistic_sizes": False})
    served = emulator.ledger()["images"][result.task_id]
    assert first == second and hashlib.sha256(first).hexdigest() == served["sha256"]


def test_cdn_keeps_a_bounded_number_of_rendered_bytes(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("prefect_journey.emulator.app.RENDERED_BYTES_KEPT", 1)
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        results = [client.imagine(prompt=f"image {i}") for i in range(3)]
        first = httpx.get(results[0].image_url).content
        for result in results[1:]:
            httpx.get(result.image_url)
    assert len(emulator.state.renders) == 1  # the newest only
    again = httpx.get(results[0].image_url).content  # dropped, so rendered again
    assert again == first  # without grain a render is deterministic
    assert inspect_bytes(again).format == "png"


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.received.append(
            {
                "secret": self.headers.get("x-webhook-secret"),
                "body": json.loads(self.rfile.read(length)),
            }
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook_url() -> Iterator[str]:
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_webhook_is_delivered_with_the_secret(emulator: EmulatorServer, hook_url: str) -> None:
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        result = client.imagine(prompt="p", webhook_url=hook_url, webhook_secret="whsec-1")
    deadline = time.monotonic() + 10
    while not _Hook.received and time.monotonic() < deadline:
        time.sleep(0.05)
    [delivery] = _Hook.received
    assert delivery["secret"] == "whsec-1"
    assert delivery["body"]["task_id"] == result.task_id
    assert (
        delivery["body"]["status"] == "finished"
        and delivery["body"]["image_url"] == result.image_url
    )
    # The emulator records the answer once it has read it, a moment after the hook has the body.
    while not (ledger := emulator.ledger())["webhooks"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ledger["webhooks_sent"] == 1 and ledger["webhooks"][0]["status_code"] == 204
    assert "whsec-1" not in json.dumps(ledger)


def test_ledger_tracks_peak_concurrency_and_reset(emulator: EmulatorServer) -> None:
    emulator.admin("config", {"fixed": 0.3})
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        threads = [
            threading.Thread(target=client.imagine, kwargs={"prompt": f"p{i}"}) for i in range(5)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    ledger = emulator.ledger()
    assert ledger["peak_concurrency"] == 5 and ledger["credits_charged"] == 20
    emulator.admin("reset")
    assert emulator.ledger()["calls_total"] == 0


def test_the_ledger_says_when_each_generation_started_and_ended(emulator: EmulatorServer) -> None:
    emulator.admin("config", {"fixed": 0.2})
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        before = time.time()
        client.imagine(prompt="timed")
        after = time.time()
    (call,) = [c for c in emulator.ledger()["log"] if c["endpoint"] == "imagine"]
    assert before <= call["at"] < call["ended_at"] <= after
    assert call["ended_at"] - call["at"] >= 0.19  # the generation's fixed latency, not less
    assert all("ended_at" not in c for c in emulator.ledger()["log"] if c["endpoint"] != "imagine")


def test_a_quota_refuses_calls_past_its_window_until_the_window_ends(
    emulator: EmulatorServer,
) -> None:
    """Up to 3 s: it waits for the quota's 2 s window to end (polling, with a deadline)."""
    from prefect_journey.errors import RateLimitedError

    with pytest.raises(httpx.HTTPStatusError):  # refused whole: nothing else changes
        emulator.admin("config", {"quota": {"calls": 0}, "credits": 8})
    emulator.admin("config", {"quota": {"calls": 2, "window": 2}})
    try:
        with JourneyClient(emulator.api_key, base_url=emulator.url, max_retries=0) as client:
            client.imagine(prompt="first")
            client.imagine(prompt="second")
            with pytest.raises(RateLimitedError) as refused:
                client.imagine(prompt="third")
            # The seconds until the window ends, rounded up.
            assert refused.value.status_code == 429
            assert refused.value.retry_after in (1, 2)
            deadline = time.monotonic() + 10
            while True:  # the next window opens
                try:
                    client.imagine(prompt="third")
                    break
                except RateLimitedError:
                    assert time.monotonic() < deadline, "the quota's window never ended"
                    time.sleep(0.05)
        calls = [c for c in emulator.ledger()["log"] if c["endpoint"] == "imagine"]
        over = [c for c in calls if c.get("quota")]
        assert [c["status"] for c in calls] == [200, 200] + [429] * len(over) + [200]
        assert over and all("credits" not in c and "fault" not in c for c in over)
        assert emulator.ledger()["credits_charged"] == 12  # three images, no refusal billed
    finally:
        emulator.admin("config", {"quota": None})
    assert emulator.state.config.quota is None and emulator.state.config.credits != 8


@pytest.mark.parametrize("encode_as", ["png", "jpeg"])
def test_plain_images_keep_their_size_and_format_and_differ_by_task(encode_as: EncodedAs) -> None:
    first, again, other = (
        render_image("a kite", task, (1376, 768), encode_as=encode_as, plain=True)
        for task in ("task-1", "task-1", "task-2")
    )
    assert first == again and first != other  # the task id is in each image's metadata
    found = inspect_bytes(first)
    assert (found.format, found.width, found.height) == (encode_as, 1376, 768)
    drawn = render_image("a kite", "task-1", (1376, 768), encode_as=encode_as)
    assert len(first) < len(drawn)
