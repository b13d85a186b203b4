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

from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.common import free_port
from tools.services import new_database, postgres_server

# postgres_server lives with the other throwaway servers; the benchmarks import it from here.
__all__ = ["postgres_server", "prefect_on_postgres"]


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

    database_url = new_database(server_url)
    server = SubprocessASGIServer(port=free_port())
    # The server process takes its settings from this one's as it starts.
    with temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: database_url}):
        server.start(timeout=120)  # migrates the empty database first
    try:
        yield server.api_url
    finally:
        server.stop()
