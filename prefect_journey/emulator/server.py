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
    """An ASGI app served by uvicorn on a loopback port, in a daemon thread.

    The socket is bound when the object is built, so :attr:`url` is known before
    :meth:`start`. Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        app: The ASGI app to serve.
        host: The IPv4 address to bind; ``127.0.0.1`` by default.
        port: The port to bind; 0 (the default) picks a free one.
        log_level: uvicorn's log level; ``"warning"`` by default.

    Attributes:
        host: The bound address.
        port: The bound port.
    """

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
        """The server's root URL, ``http://<host>:<port>``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        """Start serving and wait until the server accepts connections.

        Returns:
            The server itself.

        Raises:
            RuntimeError: The server did not start within :data:`STARTUP_TIMEOUT` seconds,
                or its thread ended.
        """
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask the server to exit, wait for its thread (up to 15 s) and close the socket."""
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

    Args:
        config: The emulator's settings; None for the defaults.
        host: The IPv4 address to bind; ``127.0.0.1`` by default.
        port: The port to bind; 0 (the default) picks a free one.
        log_level: uvicorn's log level; ``"warning"`` by default.

    Attributes:
        config: The emulator's settings.
        state: The running app's state, read and changed directly by tests.

    Example:
        ```python
        from prefect_journey import JourneyClient
        from prefect_journey.emulator import EmulatorConfig, EmulatorServer, LatencyModel

        config = EmulatorConfig(credits=100, latency=LatencyModel(time_scale=0.01))
        with EmulatorServer(config) as emulator:
            with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
                result = client.imagine(prompt="a lighthouse at dusk")
            print(result.image_url, emulator.ledger()["credits_remaining"])  # ... 96
        ```
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
        # One client for the admin endpoints, which tests poll: a new httpx client loads the
        # system's CA certificates each time, plain http or not.
        self._admin = httpx.Client(base_url=f"{self.url}/_emulator", timeout=10)

    def stop(self) -> None:
        """Stop serving and close the admin endpoints' client."""
        self._admin.close()
        super().stop()

    @property
    def api_key(self) -> str:
        """The first key the emulator accepts, to give a client."""
        return self.config.api_keys[0]

    def ledger(self) -> dict[str, Any]:
        """The emulator's ledger, read over HTTP (``GET /_emulator/ledger``).

        Returns:
            The ledger, as :meth:`EmulatorState.ledger` describes it.
        """
        return self._admin.get("/ledger").json()  # type: ignore[no-any-return]

    def admin(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST to an admin endpoint: ``reset``, ``faults`` or ``config``.

        Args:
            action: ``"reset"``, ``"faults"`` (a new :class:`FaultPlan`'s fields) or
                ``"config"`` (``time_scale``, ``fixed``, ``per_reference``, ``jitter``,
                ``credits``, ``jpeg_as_png_rate``, ``realistic_sizes``, ``cdn_chunk_delay``,
                ``quota``: a :class:`Quota`'s fields, or None to remove it).
            body: The JSON body; None sends ``{}``.

        Returns:
            The endpoint's JSON answer.

        Raises:
            httpx.HTTPStatusError: The endpoint refused the request (a bad fault plan or
                quota).
        """
        response = self._admin.post(f"/{action}", json=body or {})
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


def serve_forever(config: EmulatorConfig, *, host: str, port: int) -> None:
    """Run in the foreground until interrupted (the CLI).

    Args:
        config: The emulator's settings.
        host: The IPv4 address to bind.
        port: The port to bind.
    """
    server = _uvicorn_server(create_app(config), "info")
    server.run(sockets=[_bind(host, port)])
