"""A throwaway PostgreSQL server, and Prefect API servers on it, for the benchmarks.

``prefect_test_harness`` keeps the Prefect database in SQLite, where concurrent writes take
turns on one file lock: under a campaign's load the API answers some tag-slot requests with
503 ("database is locked") and Prefect's client waits 2 s before asking again. Production
Prefect servers run on PostgreSQL. Measuring the same campaign on both tells which part of
the overhead is SQLite's.

PostgreSQL comes from Debian's ``postgresql`` package (``make bench`` installs it). It runs
from a temporary folder on a free loopback port, as the ``postgres`` user when the
benchmark runs as root (PostgreSQL refuses to run as root), and is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import free_port


def _bin_folder() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return Path(initdb).parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start PostgreSQL; yield its URL without a database name
    (``postgresql+asyncpg://postgres@127.0.0.1:PORT``); stop it and delete its files."""
    bin_folder = _bin_folder()
    folder = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")

    def run(tool: str, *args: object, check: bool = True) -> None:
        command = [*as_postgres, str(bin_folder / tool), *map(str, args)]
        subprocess.run(command, check=check, capture_output=True)

    data, port = folder / "data", free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    try:
        run("initdb", "-D", data, "-A", "trust", "-U", "postgres")
        run("pg_ctl", "-D", data, "-l", folder / "log", "-o", options, "-w", "start")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}"
    finally:
        run("pg_ctl", "-D", data, "-m", "fast", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


async def _create_database(server_url: str, name: str) -> None:
    import asyncpg  # Prefect's own PostgreSQL driver

    connection = await asyncpg.connect(server_url.replace("+asyncpg", "") + "/postgres")
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


@contextmanager
def prefect_on_postgres(server_url: str) -> Iterator[str]:
    """A Prefect API server (a subprocess, as ``prefect_test_harness`` starts one) on a new,
    empty database of ``server_url``; yields its API URL.

    Runs measured against it belong in another process started with ``PREFECT_API_URL`` set
    (:func:`benchmarks.common.call_in_subprocess`): Prefect's background services (events,
    logs, tag slots) are process-wide singletons holding the API URL they started with, and
    only the test harness knows how to swap them between servers."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    name = f"prefect_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(server_url, name))
    server = SubprocessASGIServer(port=free_port())
    # The server process takes its settings from this one's as it starts.
    with temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: f"{server_url}/{name}"}):
        server.start(timeout=120)  # migrates the empty database first
    try:
        yield server.api_url
    finally:
        server.stop()
