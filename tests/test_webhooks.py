"""The webhook receiver: the emulator calls it over HTTP; secrets, replays, Prefect events."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

from prefect_journey.client import JourneyClient
from prefect_journey.emulator import BackgroundServer, EmulatorServer
from prefect_journey.errors import ConfigurationError
from prefect_journey.signing import SIGNATURE_FIELD, WeakSecretError, WebhookKeys, new_secret
from prefect_journey.tokens import TASK_ID_LABEL, attempt_id, attempt_resource, mint_token
from prefect_journey.webhooks import (
    MAX_BODY_BYTES,
    WEBHOOK_PATH,
    create_webhook_app,
    prefect_api_url,
)

from . import prefect_api
from .conftest import free_port

SECRET = "whsec-receiver-test-5d41402abc4b2a76b9719d911017c592ae5e8a3e0f4b1f6f"
KEYS = WebhookKeys.from_secret(SECRET)
# What the provider is given, and sends back in x-webhook-secret: never SECRET itself.
PROVIDER_SECRET = KEYS.provider_secret.get_secret_value()


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


def events_about(name: str, resource_id: str, *, wait: bool = True) -> list[dict[str, Any]]:
    """The events called ``name`` about ``resource_id`` in Prefect, once there is one
    (events are stored asynchronously) unless ``wait`` is False."""
    deadline = time.monotonic() + 30
    while True:
        matching = [
            e
            for e in prefect_api.events(name)
            if e["resource"]["prefect.resource.id"] == resource_id
        ]
        if matching or not wait:
            return matching
        assert time.monotonic() < deadline, f"no {name} event about {resource_id} in Prefect"
        time.sleep(0.5)


def test_emulator_delivery_becomes_one_event(
    emulator: EmulatorServer, receiver: tuple[str, Recorder]
) -> None:
    url, recorder = receiver
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        result = client.imagine(prompt="hooked", webhook_url=url, webhook_secret=PROVIDER_SECRET)
    [delivery] = wait_for_webhooks(emulator, 1)
    assert delivery["status_code"] == 200
    [(event, payload)] = recorder.events
    assert event == "journey.task.finished"
    assert payload["task_id"] == result.task_id and payload["image_url"] == result.image_url
    fields = {"task_id": result.task_id, "status": "finished", "image_url": result.image_url}
    assert KEYS.signed(payload[SIGNATURE_FIELD], attempt=None, **fields)
    # The signature covers every field, and is the receiver's: another key does not make it.
    assert not KEYS.signed(payload[SIGNATURE_FIELD], attempt=None, **{**fields, "image_url": "x"})
    assert not KEYS.signed(payload[SIGNATURE_FIELD], attempt="a" * 32, **fields)
    other = WebhookKeys.from_secret(new_secret())
    assert not other.signed(payload[SIGNATURE_FIELD], attempt=None, **fields)


def test_failed_task_becomes_a_failed_event(
    emulator: EmulatorServer, receiver: tuple[str, Recorder]
) -> None:
    url, recorder = receiver
    emulator.admin("faults", {"queue": {"api": ["failed"]}})
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client, pytest.raises(Exception):
        client.imagine(prompt="refused", webhook_url=url, webhook_secret=PROVIDER_SECRET)
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
    answers = [
        httpx.post(url, json=body, headers={"x-webhook-secret": PROVIDER_SECRET}) for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[1].json() == {"duplicate": True}
    assert len(recorder.events) == 1


@pytest.mark.parametrize(
    ("headers", "content", "status"),
    [
        ({}, b'{"task_id": "t", "status": "finished"}', 401),
        ({"x-webhook-secret": ""}, b'{"task_id": "t", "status": "finished"}', 401),
        (
            {"x-webhook-secret": PROVIDER_SECRET[:-1]},
            b'{"task_id": "t", "status": "finished"}',
            401,
        ),
        ({"x-webhook-secret": PROVIDER_SECRET}, b"not json", 400),
        ({"x-webhook-secret": PROVIDER_SECRET}, b'{"status": "finished"}', 400),
        ({"x-webhook-secret": PROVIDER_SECRET}, b"[1, 2]", 400),
        ({"x-webhook-secret": PROVIDER_SECRET}, b'{"task_id": "t", "status": "processing"}', 202),
        ({"x-webhook-secret": PROVIDER_SECRET}, b" " * (MAX_BODY_BYTES + 1), 413),
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
    first = httpx.post(url, json=body, headers={"x-webhook-secret": PROVIDER_SECRET})
    second = httpx.post(url, json=body, headers={"x-webhook-secret": PROVIDER_SECRET})
    assert (first.status_code, second.status_code) == (503, 200) and len(recorder.events) == 1


@pytest.mark.parametrize(
    "weak",
    ["", "  ", "whsec-short", "0123456789abcdef" * 3, "a" * 200, "Ab1-" * 40, f" {SECRET}"],
    ids=["empty", "blank", "short", "192-bit-hex", "one-letter", "repeated", "padded"],
)
def test_a_weak_secret_is_refused(weak: str) -> None:
    with pytest.raises(WeakSecretError, match="prefect-journey new-secret") as refused:
        create_webhook_app(weak, emit=Recorder())
    assert weak.strip() == "" or weak.strip() not in str(refused.value)


def test_the_secret_has_one_job_per_derived_key() -> None:
    secret = new_secret()
    keys = WebhookKeys.from_secret(secret)
    provider = keys.provider_secret.get_secret_value()
    derived = {provider, keys.token_key.hex(), keys.event_key.hex()}
    assert len(derived) == 3 and secret not in derived
    assert secret not in repr(keys) and provider not in repr(keys)
    assert WebhookKeys.from_secret(secret) == keys  # the receiver and the runs agree


@pytest.mark.usefixtures("prefect_harness")
def test_events_reach_prefect(emulator: EmulatorServer) -> None:
    """Waits for the Prefect server to store the emitted events (the events API shows them a
    moment after they were accepted)."""
    with BackgroundServer(create_webhook_app(SECRET)) as server:
        url = f"{server.url}{WEBHOOK_PATH}"
        with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
            result = client.imagine(
                prompt="to prefect", webhook_url=url, webhook_secret=PROVIDER_SECRET
            )
        wait_for_webhooks(emulator, 1)
        httpx.post(
            url,
            json={"task_id": result.task_id, "status": "finished"},
            headers={"x-webhook-secret": PROVIDER_SECRET},
        )
        resource = f"journey.task.{result.task_id}"
        events_about("journey.task.finished", resource)
        time.sleep(1)  # a second delivery would be stored by now
        matching = events_about("journey.task.finished", resource, wait=False)
        assert len(matching) == 1 and matching[0]["payload"]["image_url"] == result.image_url
        assert SECRET not in str(matching) and PROVIDER_SECRET not in str(matching)


# --- Per-attempt tokens --------------------------------------------------------------------


class ResourceRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.resources: list[dict[str, str]] = []

    def __call__(
        self, event: str, resource: dict[str, str], payload: dict[str, Any], event_id: uuid.UUID
    ) -> bool:
        self.resources.append(resource)
        return super().__call__(event, resource, payload, event_id)


def test_token_deliveries_are_checked_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    recorder = ResourceRecorder()
    token = mint_token(KEYS.token_key)
    task = {"task_id": "t-9", "status": "finished", "image_url": "https://cdn.example.com/9.png"}
    with (
        caplog.at_level(logging.DEBUG),
        BackgroundServer(create_webhook_app(SECRET, emit=recorder)) as server,
    ):
        base = f"{server.url}{WEBHOOK_PATH}"
        signed = {"x-webhook-secret": PROVIDER_SECRET}

        def post(path: str, **kwargs: Any) -> int:
            return httpx.post(f"{base}/{path}", **kwargs).status_code

        assert post(token, json=task, headers=signed) == 200
        assert post(token, json=task, headers=signed) == 200  # a replay: acknowledged, once
        other_task = {**task, "task_id": "t-10"}
        assert post(token, json=other_task, headers=signed) == 409  # a reused token
        # A task already delivered, posted under another token: not that attempt's image.
        another = mint_token(KEYS.token_key)
        assert post(another, json=task, headers=signed) == 409
        assert post(another, json=other_task, headers=signed) == 200  # the token is still free
        assert (
            post(
                mint_token(WebhookKeys.from_secret(new_secret()).token_key),
                json=task,
                headers=signed,
            )
            == 404
        )
        assert post(token[:-1], json=task, headers=signed) == 404  # malformed
        assert post(token.upper(), json=task, headers=signed) == 404
        assert post(token, json=task, headers={"x-webhook-secret": "wrong"}) == 401
        assert post(mint_token(KEYS.token_key), content=b"not json", headers=signed) == 400

        def endless() -> Iterator[bytes]:  # no content-length: read until the limit only
            for _ in range(MAX_BODY_BYTES // 1024 + 2):
                yield b" " * 1024

        assert post(mint_token(KEYS.token_key), content=endless(), headers=signed) == 413
        no_image = {"task_id": "t-11", "status": "finished"}
        assert post(mint_token(KEYS.token_key), json=no_image, headers=signed) == 400
    assert [event for event, _ in recorder.events] == ["journey.attempt.finished"] * 2
    assert recorder.resources == [
        {"prefect.resource.id": attempt_resource(attempt_id(token)), TASK_ID_LABEL: "t-9"},
        {"prefect.resource.id": attempt_resource(attempt_id(another)), TASK_ID_LABEL: "t-10"},
    ]
    # The receiver's own log lines; httpx's are the sending side's (the provider's here).
    for record in caplog.records:
        if not record.name.startswith("httpx"):
            message = record.getMessage()
            assert SECRET not in message and PROVIDER_SECRET not in message
            assert token not in message


def test_the_receiver_needs_a_reachable_prefect_api(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect.settings import temporary_settings

    from prefect_journey.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ConfigurationError, match="PREFECT_API_URL"):
            create_webhook_app(SECRET)
        monkeypatch.setenv("JOURNEY_WEBHOOK_SECRET", SECRET)
        assert main(["webhooks", "--port", "0"]) != 0
        assert "PREFECT_API_URL" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="does not answer"):
        prefect_api_url(f"http://127.0.0.1:{free_port()}/api")


class SwitchableProxy:
    """A TCP forwarder on a loopback port to ``target``, which can be taken down (connections
    refused, open ones cut) and brought back on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._open: set[socket.socket] = set()

    def up(self) -> None:
        proxy = self

        class Pump(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(proxy.target)
                pair = (self.request, upstream)
                proxy._open.update(pair)
                try:
                    while True:
                        readable, _, _ = select.select(pair, [], [], 1.0)
                        for source in readable:
                            data = source.recv(65536)
                            if not data:
                                return
                            (upstream if source is self.request else self.request).sendall(data)
                except OSError:
                    return
                finally:
                    upstream.close()
                    proxy._open.difference_update(pair)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Pump)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for connection in list(self._open):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


@pytest.mark.usefixtures("prefect_harness")
def test_a_delivery_is_acknowledged_only_once_prefect_has_its_event(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refused delivery comes again after 2 s, as the provider retries one."""
    api = httpx.URL(str(PREFECT_API_URL.value()))
    proxy = SwitchableProxy((api.host, api.port or 80))
    proxy.up()
    app = create_webhook_app(SECRET, api_url=f"http://127.0.0.1:{proxy.port}{api.path}")
    monkeypatch.setattr(emulator.state.config, "webhook_retry_delays", (2.0, 2.0, 10.0))
    token = mint_token(KEYS.token_key)
    try:
        with BackgroundServer(app) as server:
            proxy.down()  # the Prefect API is unreachable
            with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
                result = client.imagine(
                    prompt="acknowledged once safe",
                    webhook_url=f"{server.url}{WEBHOOK_PATH}/{token}",
                    webhook_secret=PROVIDER_SECRET,
                )
            [refused] = wait_for_webhooks(emulator, 1)
            assert refused["status_code"] == 503  # so the provider retries
            proxy.up()  # back
            deliveries = wait_for_webhooks(emulator, 2)
            assert [d["status_code"] for d in deliveries] == [503, 200]
    finally:
        proxy.down()
    matching = events_about("journey.attempt.finished", attempt_resource(attempt_id(token)))
    assert len(matching) == 1 and matching[0]["resource"][TASK_ID_LABEL] == result.task_id
    assert token not in str(matching) and SECRET not in str(matching)
