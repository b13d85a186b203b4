"""Shared fixtures: the emulator on a loopback port (real HTTP), free ports."""

from __future__ import annotations

import logging
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from prefect_journey.emulator import EmulatorConfig, EmulatorServer, FaultPlan, LatencyModel
from tools import services

# No cloud metadata lookups, no telemetry: the tests never leave loopback.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The test servers store events within half a second (Prefect's default is every 5 s): the
# recovery tests wait for deliveries that come through the events API.
os.environ.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "0.5")

# Each pytest process (each xdist worker) gets a Prefect home of its own, set before anything
# imports Prefect (which reads it once): the image locks live under it, so two workers never
# share one, and no test touches the user's ~/.prefect. Subprocesses of a test inherit it; a
# process a test spawns that imports this module again (multiprocessing) keeps it too.
_HOME_PREFIX = f"journey-prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-"
_INHERITED_HOME = os.environ.get("PREFECT_HOME", "")
_OWN_HOME = not os.path.basename(_INHERITED_HOME).startswith(_HOME_PREFIX)
if _OWN_HOME:
    _PREFECT_HOME = tempfile.mkdtemp(prefix=_HOME_PREFIX)
    os.environ["PREFECT_HOME"] = _PREFECT_HOME
    # Named too: some Prefect releases derive the default from the default home, not this one.
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "storage")
else:
    _PREFECT_HOME = _INHERITED_HOME

# Generation latency in tests: 1 % of the realistic model (a bare 1K image in ~80 ms).
TEST_TIME_SCALE = 0.01
# A fresh harness migrates its SQLite database before it answers (about 10 s alone); on a
# loaded 2-core machine, with other workers starting theirs, that passed the default 30 s.
HARNESS_STARTUP_TIMEOUT = 120
SENTINEL_KEY = "sk-SENTINEL-9f8e7d6c5b4a"
SENTINEL_WEBHOOK_SECRET = "whsec-SENTINEL-0a1b2c3d4e5f60718293a4b5c6d7e8f9fa0b1c2d3e4f5061728394a5"


def assert_thumbnail(uri: str, size: tuple[int, int]) -> None:
    """``uri`` is a JPEG thumbnail carried in a ``data:`` URI, ``size`` pixels."""
    import base64
    import io

    from PIL import Image

    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix), uri[:60]
    with Image.open(io.BytesIO(base64.b64decode(uri.removeprefix(prefix)))) as image:
        assert (image.format, image.size) == ("JPEG", size)


def run_in_terminal(command: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Run ``command`` with a pseudo-terminal as its stdin, stdout and stderr, as a person
    would in a shell; fail unless it exits 0 within ``timeout``. Returns everything it
    wrote, decoded."""
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "160"}
    deadline = time.monotonic() + timeout
    controller, terminal = pty.openpty()
    streams = {"stdin": terminal, "stdout": terminal, "stderr": terminal}
    with subprocess.Popen(command, env=env, **streams) as child:
        os.close(terminal)
        seen = b""
        try:
            while True:
                left = deadline - time.monotonic()
                assert left > 0, f"no end after {timeout} s: {seen[-3000:]!r}"
                if not select.select([controller], [], [], left)[0]:
                    continue
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            status = child.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if child.poll() is None:
                child.kill()
            os.close(controller)
    text = seen.decode(errors="replace")
    assert status == 0, text[-3000:]
    return text


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests (marked ``slow`` or ``install``) early, in every other place: xdist
    gives each worker the next two tests to begin with, then one more each time it is free.
    So each worker starts one long test beside a short one, the rest of the long ones go to
    the first workers to free up, and the run does not end waiting for a long test started
    last."""
    long: list[pytest.Item] = []
    short: list[pytest.Item] = []
    for item in items:
        is_long = item.get_closest_marker("slow") or item.get_closest_marker("install")
        (long if is_long else short).append(item)
    paired = [test for pair in zip(long, short, strict=False) for test in pair]
    items[:] = paired + long[len(short) :] + short[len(long) :]


# A test that runs longer than this says why in its docstring.
LONG_TEST_SECONDS = 5.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Marks the report of a test that ran longer than :data:`LONG_TEST_SECONDS` without a
    docstring; the mark travels with the report from an xdist worker to the main process."""
    report = yield
    explained = getattr(getattr(item, "function", None), "__doc__", None)
    if report.when == "call" and report.duration > LONG_TEST_SECONDS and not explained:
        report.user_properties.append(("long_without_reason", report.duration))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Lists the tests that ran longer than :data:`LONG_TEST_SECONDS` without saying why.

    A list, not a failure: a test's duration depends on the machine's load, and a check that
    fails on a busy machine would be a flaky one."""
    unexplained = [
        (report.nodeid, dict(report.user_properties)["long_without_reason"])
        for reports in terminalreporter.stats.values()
        for report in reports
        if "long_without_reason" in dict(getattr(report, "user_properties", []))
    ]
    if unexplained:
        terminalreporter.write_sep("=", f"tests over {LONG_TEST_SECONDS:.0f} s with no docstring")
        for nodeid, seconds in sorted(unexplained, key=lambda found: -found[1]):
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")


def pytest_configure(config: pytest.Config) -> None:
    if "prefect" in sys.modules:  # imported by a plugin, before this module set the home
        from prefect.settings import PREFECT_HOME

        assert str(PREFECT_HOME.value()) == _PREFECT_HOME, "Prefect was imported too early"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_HOME:
        shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(
        api_keys=("test-key", SENTINEL_KEY),
        latency=LatencyModel(time_scale=TEST_TIME_SCALE),
        plain_images=True,
    )
    with EmulatorServer(config) as server:
        yield server


def allow_private_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Adds the host:port of ``url`` (a server of the tests, on loopback) to
    ``JOURNEY_PRIVATE_ENDPOINTS``, which downloads and references may reach."""
    from urllib.parse import urlsplit

    endpoint = urlsplit(url).netloc
    before = os.environ.get("JOURNEY_PRIVATE_ENDPOINTS", "")
    monkeypatch.setenv("JOURNEY_PRIVATE_ENDPOINTS", ",".join(filter(None, [before, endpoint])))


@pytest.fixture
def emulator(
    emulator_server: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EmulatorServer]:
    """The shared emulator, reset to a clean ledger, full credits and no faults; its CDN on
    loopback is an allowed endpoint even where ``JOURNEY_BASE_URL`` does not name it."""
    allow_private_endpoint(monkeypatch, emulator_server.url)
    state = emulator_server.state
    state.config.faults = FaultPlan()
    state.config.jpeg_as_png_rate = 0.0
    state.config.realistic_sizes = False
    state.config.cdn_chunk_delay = 0.0
    state.config.latency.time_scale = TEST_TIME_SCALE
    state.config.latency.fixed = None
    emulator_server.admin("reset")
    yield emulator_server


@pytest.fixture(autouse=True)
def _own_budgets(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own campaign budgets: a budget outlives runs, and tests reuse campaign
    names."""
    monkeypatch.setenv("JOURNEY_BUDGET_DIR", str(tmp_path_factory.mktemp("budgets")))


@pytest.fixture(autouse=True)
def _fresh_s3_filesystems() -> None:
    """s3fs caches filesystem instances by their arguments and reads AWS_* variables only
    when it builds one; tests change those variables, so each test starts uncached."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def journey_env(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    """The emulator, with ``JOURNEY_API_KEY`` and ``JOURNEY_BASE_URL`` pointing at it."""
    monkeypatch.setenv("JOURNEY_API_KEY", emulator.api_key)
    monkeypatch.setenv("JOURNEY_BASE_URL", emulator.url)
    return emulator


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry ladders without their pauses (same number of retries), for tests that
    exercise several attempts; a server's ``Retry-After`` is still waited as given."""
    from prefect_journey import policy

    monkeypatch.setattr(policy, "GENERATION_RETRY_DELAYS", (0.0,) * policy.GENERATION_RETRIES)
    monkeypatch.setattr(policy, "STORE_RETRY_DELAYS", (0.0,) * policy.STORE_RETRIES)


def process_env(storage: Path | str, **variables: str) -> dict[str, str]:
    """The environment of a process a test starts (a campaign to kill and resume): this one's,
    with the session's Prefect server, results folder ``storage`` and ``variables``."""
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(storage),
        **variables,
    }


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real (subprocess) Prefect server with a temporary database, and a private folder
    for persisted results and cache keys. Yields that folder."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    # The variable too, so that a test's subprocesses (which inherit it) store there as well:
    # Prefect reads it before PREFECT_LOCAL_STORAGE_PATH.
    before = os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(storage)
    try:
        with (
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}),
            prefect_test_harness(server_startup_timeout=HARNESS_STARTUP_TIMEOUT),
        ):
            yield storage
    finally:
        os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = before


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on a loopback port (s3fs cannot see moto's in-process mock), in a
    thread of this process, as moto's ``ThreadedMotoServer`` runs it but for two costs: moto
    finds the backend of a request's host by listing its own package folder and trying every
    service's URL patterns, at every request, and werkzeug logs every request at INFO, which
    Prefect's console handler renders. Together they were a fifth of an S3 test's CPU."""
    import functools
    import threading

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class Dispatcher(DomainDispatcherApplication):
        @functools.cache  # noqa: B019 (one dispatcher, kept for the session)
        def get_backend_for_host(self, host: str | None) -> Any:
            return super().get_backend_for_host(host)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(
        "127.0.0.1",
        0,
        Dispatcher(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


@dataclass
class Bucket:
    name: str
    endpoint: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": "testing", "secret": "testing", "endpoint_url": self.endpoint}

    def env(self) -> dict[str, str]:
        """The variables that point a process's S3 clients at this bucket's server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }

    def fs(self) -> Any:
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)
        return fs

    def objects(self) -> list[str]:
        """Every committed object key in the bucket."""
        return sorted(path.split("/", 1)[1] for path in self.fs().find(self.name))

    def pending_uploads(self) -> int:
        """Multipart uploads begun and neither completed nor aborted."""
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        return len(client.list_multipart_uploads(Bucket=self.name).get("Uploads", []))


@pytest.fixture
def bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh, empty bucket on the moto server, an allowed endpoint (its presigned URLs
    serve as references)."""
    allow_private_endpoint(monkeypatch, moto_server)
    name = f"journey-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    return Bucket(name, moto_server)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's Redis: a real ``redis-server`` (Debian's package, which ``make test``
    installs) on a free loopback port, keeping nothing on disk (:func:`tools.services.redis_server`,
    which a test may stop and start again). Yields its URL."""
    server = services.redis_server(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_env(redis_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``JOURNEY_REDIS_URL`` naming the session's Redis, with a key prefix of this test's own
    (tests reuse campaign names and images). Returns the URL."""
    monkeypatch.setenv("JOURNEY_REDIS_URL", redis_server)
    monkeypatch.setenv("JOURNEY_REDIS_PREFIX", f"test-{uuid.uuid4().hex[:12]}:")
    return redis_server


@pytest.fixture
def shared_results(bucket: Bucket, prefect_harness: Path) -> Iterator[str]:
    """The runs' result storage in the bucket (a saved ``RemoteFileSystem`` block named by
    ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``), as workers on several machines share it.
    Yields the block's slug."""
    from prefect.filesystems import RemoteFileSystem
    from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

    name = f"results-{uuid.uuid4().hex[:12]}"
    RemoteFileSystem(basepath=f"{bucket.url}/results", settings=bucket.storage_options).save(name)
    slug = f"remote-file-system/{name}"
    with temporary_settings({PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: slug}):
        yield slug
