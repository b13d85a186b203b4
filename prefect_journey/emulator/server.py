"""Run the emulator: in a background thread (tests, demos) or in the foreground (CLI)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn
from starlette.types import ASGIApp

from prefect_journey.emulator.app import EmulatorState, create_app
from prefect_journey.emulator.config import EmulatorConfig

STARTUP_TIMEOUT = 15.0


class _QuietCutShort(logging.Filter):
    # A deliberately dropped connection is a fault we injected, not an emulator bug.
    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _uvicorn_server(app: ASGIApp, log_level: str) -> uvicorn.Server:
    logging.getLogger("uvicorn.error").addFilter(_QuietCutShort())
    return uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_keep_alive=30)
    )


class BackgroundServer:
    """An ASGI app served by uvicorn on a loopback port, in a daemon thread."""

    def __init__(
        self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self._socket = _bind(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = _uvicorn_server(app, log_level)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=STARTUP_TIMEOUT)
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmulatorServer(BackgroundServer):
    """The emulator on a loopback port in a daemon thread.

    >>> with EmulatorServer(EmulatorConfig(credits=100)) as emulator:
    ...     client = JourneyClient(emulator.api_key, base_url=emulator.url)
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.config = config or EmulatorConfig()
        app = create_app(self.config)
        self.state: EmulatorState = app.state.emulator
        super().__init__(app, host=host, port=port, log_level=log_level)

    @property
    def api_key(self) -> str:
        return self.config.api_keys[0]

    def ledger(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_emulator/ledger", timeout=10)
        return response.json()  # type: ignore[no-any-return]

    def admin(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST to an admin endpoint: ``reset``, ``faults`` or ``config``."""
        response = httpx.post(f"{self.url}/_emulator/{action}", json=body or {}, timeout=10)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


def serve_forever(config: EmulatorConfig, *, host: str, port: int) -> None:
    """Run in the foreground until interrupted (the CLI)."""
    server = _uvicorn_server(create_app(config), "info")
    server.run(sockets=[_bind(host, port)])
