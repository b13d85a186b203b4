"""Throwaway servers on loopback, each a real process on a free port: PostgreSQL, Redis, a
moto S3 server, a Prefect server, and any other long-running command (the emulator, the
webhook receiver, Prefect workers).

``make ui`` (:mod:`tools.showcase`), ``make bench`` (:mod:`benchmarks.postgres`) and
``make scale`` (:mod:`tools.scale`) start their parts with these. PostgreSQL and Redis are
Debian's ``postgresql`` and ``redis-server`` packages, which the Makefile installs.
PostgreSQL refuses to run as root: as root, it runs as the ``postgres`` user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PREFECT = (sys.executable, "-m", "prefect")
# How long a server may take to answer after it starts: a Prefect server migrates an empty
# database first, which takes a minute or more on a busy 2-core machine.
STARTUP_TIMEOUT = 180.0
# A server asked to stop (SIGTERM) that is still there after this is killed.
STOP_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` of the loopback interface."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def healthy(api: str) -> bool:
    """Whether the Prefect API answers its health check."""
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(
    condition: Callable[[], Any],
    what: str,
    process: subprocess.Popen[Any] | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> Any:
    """Poll ``condition`` until it is truthy; fail naming ``what`` on timeout or exit.

    Returns:
        The condition's first truthy value.

    Raises:
        SystemExit: ``process`` exited, or ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if process is not None and process.poll() is not None:
            raise SystemExit(f"gave up waiting for {what}: the process exited")
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.5)
    return value


@contextlib.contextmanager
def this_process(env: Mapping[str, str | None]) -> Iterator[None]:
    """``env`` in this process's environment until the block ends (``None``: unset), the
    ``PREFECT_*`` names also as Prefect's settings.

    Prefect reads the environment into its settings once, when it is first imported, so a
    variable set later reaches only the subprocesses; this process's clients (a benchmark that
    imported Prefect earlier in the same run) see the temporary settings.
    """
    import prefect.settings
    from prefect.settings import temporary_settings

    saved = {name: os.environ.get(name) for name in env}
    prefect_names = [name for name in env if name.startswith("PREFECT_")]
    try:
        for name, value in env.items():
            _set_variable(name, value)
        with temporary_settings(
            updates={getattr(prefect.settings, n): env[n] for n in prefect_names if env[n]},
            restore_defaults={getattr(prefect.settings, n) for n in prefect_names if not env[n]},
        ):
            yield
    finally:
        for name, value in saved.items():
            _set_variable(name, value)


def _set_variable(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it (read from ``/proc``), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name, in parentheses, may hold spaces: the fields follow its end.
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, index = [pid], 0
    while index < len(tree):
        tree += children.get(tree[index], [])
        index += 1
    return tree


class Service:
    """A long-running command with its own environment and log file, started and stopped
    as a machine would be: :meth:`stop` asks it to stop, :meth:`kill` takes it and every
    process it started down at once (SIGKILL), as a machine that dies.

    Args:
        name: What it is, in messages and as its log file's name.
        command: The command and its arguments (never a secret: those go in ``env``).
        env: Its whole environment.
        logs: The folder of its log file, ``<name>.log`` (appended to across restarts).
        ready: Whether it serves yet; None: as soon as it started.
        url: Where it serves, if it does.
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        logs: Path,
        ready: Callable[[], bool] | None = None,
        url: str = "",
    ) -> None:
        self.name = name
        self.url = url
        self.command = command
        self.env = env
        self.log = logs / f"{name}.log"
        self.ready = ready
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> Service:
        """Start it and wait until it is ready.

        Returns:
            The service itself.

        Raises:
            SystemExit: It exited, or was not ready within :data:`STARTUP_TIMEOUT`.
        """
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("ab")
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if self.ready is not None:
            wait_until(self.ready, f"{self.name} to answer (log: {self.log})", self.process)
        return self

    @property
    def running(self) -> bool:
        """Whether its process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Ask it to stop (SIGTERM); kill what is left of it after :data:`STOP_TIMEOUT`."""
        if self.process is not None:
            tree = process_tree(self.process.pid)
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT)
            # A worker's flow runs outlive it when it alone stops.
            self._kill(tree)
        self._closed()

    def kill(self) -> list[int]:
        """SIGKILL it and every process it started, at once.

        Returns:
            The processes killed.
        """
        tree = process_tree(self.process.pid) if self.running and self.process else []
        self._kill(tree)
        self._closed()
        return tree

    def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def _closed(self) -> None:
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    """``service`` started, and stopped on the way out."""
    service.start()
    try:
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def prefect_server(
    home: Path, port: int, *, database_url: str | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``prefect server start`` on ``port`` with its own home; yields its base URL (UI and
    ``/api``).

    Args:
        home: Its Prefect home, which holds its log (``server.log``).
        port: Its port.
        database_url: Its database; default a SQLite file in ``home``.
        env: Variables added to this process's environment.
    """
    base = f"http://127.0.0.1:{port}"
    server_env = {
        **os.environ,
        **(env or {}),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url
        or f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI asks the API at this address (its default is port 4200).
        "PREFECT_UI_API_URL": f"{base}/api",
    }
    server_env.pop("PREFECT_API_URL", None)
    command = [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = Service("server", command, server_env, home, lambda: healthy(f"{base}/api"), base)
    with running(server):
        yield base


def _postgres_bin_folder() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return Path(initdb).parent


@contextlib.contextmanager
def postgres_server(*, preload: tuple[str, ...] = ()) -> Iterator[str]:
    """Start PostgreSQL from a temporary folder; yield its URL without a database name
    (``postgresql+asyncpg://postgres@127.0.0.1:PORT``); stop it and delete its files.

    Args:
        preload: Libraries to load at start (``shared_preload_libraries``), such as
            ``pg_stat_statements``, which counts each statement's time.
    """
    bin_folder = _postgres_bin_folder()
    folder = Path(tempfile.mkdtemp(prefix="journey-postgres-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")

    def run(tool: str, *args: object, check: bool = True) -> None:
        command = [*as_postgres, str(bin_folder / tool), *map(str, args)]
        subprocess.run(command, check=check, capture_output=True)

    data, port = folder / "data", free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    if preload:
        options += f" -c shared_preload_libraries={','.join(preload)}"
    try:
        run("initdb", "-D", data, "-A", "trust", "-U", "postgres")
        run("pg_ctl", "-D", data, "-l", folder / "log", "-o", options, "-w", "start")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}"
    finally:
        run("pg_ctl", "-D", data, "-m", "fast", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A new, empty database on the PostgreSQL server at ``server_url``; returns its URL."""
    name = f"prefect_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        import asyncpg  # Prefect's own PostgreSQL driver

        connection = await asyncpg.connect(server_url.replace("+asyncpg", "") + "/postgres")
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(create())
    return f"{server_url}/{name}"


def redis_answers(port: int) -> bool:
    """Whether a Redis on ``port`` of loopback answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
            probe.sendall(b"PING\r\n")
            return probe.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server(logs: Path) -> Service:
    """Debian's ``redis-server`` on a free loopback port, keeping nothing on disk: stopped, it
    forgets everything, as a Redis restarted without persistence does. Not started yet.

    Raises:
        RuntimeError: redis-server is not installed.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    command = [
        executable,
        *("--port", str(port), "--bind", "127.0.0.1"),
        *("--save", "", "--appendonly", "no", "--dir", str(logs)),
    ]
    url = f"redis://127.0.0.1:{port}/0"
    return Service("redis", command, dict(os.environ), logs, lambda: redis_answers(port), url)


def moto_server(logs: Path) -> Service:
    """A moto S3 server in its own process on a free loopback port. Not started yet."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/moto-api/", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    return Service("s3", command, dict(os.environ), logs, answers, url)
