"""Every use of a Prefect name outside its public API, exercised against the installed Prefect.

``prefect_journey._compat`` is the only module that touches such names; each test here
pins one of them, so a Prefect upgrade that changes it fails here, by name.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import PrefectClient, SyncPrefectClient
from prefect.results import ResultStore, get_default_result_storage
from rich.console import Console

from prefect_journey import _compat
from prefect_journey.cache import IMAGINE_CACHE_POLICY
from prefect_journey.locking import LeasedFileSystemLockManager, SelectedLockManager
from prefect_journey.tasks import imagine

PACKAGE = Path(__file__).resolve().parent.parent / "prefect_journey"

pytestmark = pytest.mark.usefixtures("prefect_harness")


# Names outside Prefect's documented API, and what using them looks like.
UNDOCUMENTED_IMPORTS = {
    ("prefect.context", "AsyncClientContext"),
    ("prefect.context", "SyncClientContext"),
    ("prefect.utilities.callables", "get_call_parameters"),
    ("prefect.utilities.math", "clamped_poisson_interval"),
}
UNDOCUMENTED_ATTRIBUTES = {
    "update_for_task",
    "_lock_path_for_key",
    "_locks",
    "_get_lock_info",
    "console",
}


def test_only_the_compat_module_uses_private_or_undocumented_prefect_names() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', '?')}"
            module = getattr(node, "module", None) or ""
            if isinstance(node, ast.ImportFrom) and module.split(".")[0] == "prefect":
                for alias in node.names:
                    private = "._" in module or alias.name.startswith("_")
                    if private or (module, alias.name) in UNDOCUMENTED_IMPORTS:
                        offenders.append(f"{where} from {module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and node.attr in UNDOCUMENTED_ATTRIBUTES:
                offenders.append(f"{where} .{node.attr}")
            elif isinstance(node, ast.keyword) and node.arg == "_sync":
                offenders.append(f"{where} _sync=")
    assert offenders == []


def test_call_sync_gets_the_sync_variant_on_a_worker_thread_of_an_async_run() -> None:
    @flow
    async def async_run() -> Any:
        return await asyncio.to_thread(_compat.call_sync, create_markdown_artifact, "# compat")

    assert isinstance(asyncio.run(async_run()), UUID)


def test_result_store_for_a_task_reads_and_writes_its_records_under_its_lock_manager() -> None:
    store = _compat.result_store_for(imagine)
    assert isinstance(store, ResultStore)
    assert isinstance(store.lock_manager, SelectedLockManager)
    assert isinstance(store.lock_manager.select(), LeasedFileSystemLockManager)
    key = f"compat-{time.time_ns()}"
    store.write({"ok": 1}, key=key)
    assert store.read(key).result == {"ok": 1}


def test_the_run_result_store_is_the_one_the_task_engine_builds_for_imagine() -> None:
    """The attempt records use the store built from imagine's cache policy without the task:
    the same lock manager as the task engine's, and (with Prefect's default applied where the
    run sets no storage, as the engine does) the same storage, in a flow and outside any."""
    locks = IMAGINE_CACHE_POLICY.lock_manager
    assert _compat.run_result_store(None).lock_manager is None

    def both() -> tuple[ResultStore, ResultStore]:
        return _compat.run_result_store(locks), _compat.result_store_for(imagine)

    for built, engines in (both(), flow(both)()):
        assert built.lock_manager is locks is engines.lock_manager
        storage = built.result_storage or _compat.call_sync(get_default_result_storage)
        assert storage == engines.result_storage


def test_shared_clients_are_shared_within_their_context() -> None:
    with _compat.shared_sync_client() as outer, _compat.shared_sync_client() as inner:
        assert isinstance(outer, SyncPrefectClient) and inner is outer

    async def on_a_loop() -> bool:
        async with _compat.shared_async_client() as outer, _compat.shared_async_client() as inner:
            return isinstance(outer, PrefectClient) and inner is outer

    assert asyncio.run(on_a_loop())


def test_the_worker_thread_timeout_notice_is_still_the_text_the_filter_matches() -> None:
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Collect()
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)

    @task(name="other-slow-task", timeout_seconds=60)
    def theirs() -> None:
        return None

    @task(name="journey-slow-task", timeout_seconds=60)
    def ours() -> None:
        return None

    @flow
    def both() -> None:
        theirs.submit().wait()
        ours.submit().wait()

    _compat.quiet_worker_thread_timeout_notice("journey-")
    try:
        both()
    finally:
        logger.removeHandler(handler)
    notices = [r for r in seen if str(r.msg).startswith(_compat.WORKER_THREAD_TIMEOUT_NOTICE)]
    assert [getattr(r, "task_name", "") for r in notices] == ["other-slow-task"]


def test_lock_files_can_be_found_renewed_and_read_while_half_written(tmp_path: Path) -> None:
    locks = LeasedFileSystemLockManager(tmp_path, lease_seconds=30)
    assert locks.acquire_lock("key", "holder")
    path = locks.lock_file("key")
    assert path.exists()
    later = datetime.now(UTC) + timedelta(hours=1)
    locks.remember_expiration("key", later)
    assert locks.is_locked("key", use_cache=True)
    contents = path.read_bytes()
    path.write_bytes(b"")  # as Prefect leaves it between creating and filling the file
    threading.Timer(0.1, path.write_bytes, [contents]).start()
    assert locks.is_locked("key")  # read again until filled, not a ValueError
    locks.release_lock("key", "holder")
    assert not locks.is_locked("key")


def test_prefect_prints_its_log_lines_on_the_console_handlers_rich_console() -> None:
    console = _compat.prefect_console()
    assert isinstance(console, Console)
    with console.capture() as captured:
        logging.getLogger("prefect.journey-test").warning("a line for the progress bar's console")
    assert "a line for the progress bar's console" in captured.get()


def test_a_lock_file_left_empty_by_a_killed_writer_frees_its_image(tmp_path: Path) -> None:
    """Prefect creates a lock file, then fills it: a writer killed in between leaves it empty
    for good. Once old enough to be nobody's, it is removed and the key can be locked."""
    import os
    import time

    manager = _compat.RenewableFileSystemLockManager(lock_files_directory=tmp_path)
    abandoned = manager.lock_file("abandoned")
    abandoned.touch()
    past = time.time() - _compat.ABANDONED_EMPTY_LOCK_SECONDS - 1
    os.utime(abandoned, (past, past))
    assert not manager.is_locked("abandoned") and not abandoned.exists()
    assert manager.acquire_lock("abandoned", holder="next run", hold_timeout=30)
    assert manager.is_lock_holder("abandoned", "next run")
    # A lock file being written right now is read again, never taken for abandoned.
    fresh = manager.lock_file("fresh")
    fresh.touch()
    with pytest.raises(ValueError):
        manager.is_locked("fresh")
    assert fresh.exists()
