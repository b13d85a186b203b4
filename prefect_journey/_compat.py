"""The one place that touches Prefect names outside its documented, public API.

Every other module of the package uses Prefect's public API only. Each entry below says
what it relies on and why no public route does the job; ``tests/test_compat.py`` exercises
each one against the installed Prefect, so an upgrade that changes any of them fails that
test by name instead of misbehaving in a user's run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any, TypeVar, cast

from prefect.client.orchestration import PrefectClient, SyncPrefectClient
from prefect.context import AsyncClientContext, SyncClientContext
from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.protocol import LockManager
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.results import ResultStore, get_result_store
from prefect.tasks import Task
from rich.console import Console

R = TypeVar("R")


# --- async_dispatch's ``_sync`` keyword ------------------------------------------------------
# Relies on: the ``_sync=True`` keyword that ``prefect._internal.compatibility.async_dispatch``
# adds to ``Block.load``, ``create_*_artifact``, ``ResultStore.update_for_task`` and the like.
# Why: those functions return a coroutine whenever an async flow run is current, also on a
# worker thread of that run, where sync code cannot await it; Prefect's own engines ask for
# the sync variant this way.
def call_sync(function: Callable[..., R | Coroutine[Any, Any, R]], *args: Any, **kwargs: Any) -> R:
    """``function(*args, **kwargs)`` on the sync path of an async-dispatching Prefect
    function, whatever run is current.

    Args:
        function: A Prefect function wrapped by ``async_dispatch``.
        *args: Its positional arguments.
        **kwargs: Its keyword arguments.

    Returns:
        What its sync variant returns.
    """
    return cast(R, function(*args, _sync=True, **kwargs))


# --- ResultStore.update_for_task -------------------------------------------------------------
# Relies on: ``get_result_store().update_for_task(task)``, which the task engine uses to build
# the result store (storage, key storage, lock manager) of a task's cache records.
# Why: a campaign item does the imagine and store tasks' work outside their task runs and
# must read and write the very records the task engine would, under the same locks.
def result_store_for(task: Task[..., Any]) -> ResultStore:
    """The result store the task engine uses for ``task``'s cache records.

    Args:
        task: The task whose records to read or write.

    Returns:
        The store, with the lock manager of ``task``'s cache policy.
    """
    return call_sync(get_result_store().update_for_task, task)


# --- The current run's result store -----------------------------------------------------------
# Relies on: ``get_result_store()``, the current run's result store (the flow's result storage;
# outside a run, a store with none set), the one ``update_for_task`` starts from.
# Why: the attempt records live in the ``imagine`` tasks' result storage under their cache
# policy's lock manager, and the modules that keep them sit below the task module: they build
# the store from the cache policy, without the task object.
def run_result_store(lock_manager: LockManager | None) -> ResultStore:
    """The current run's result store, under ``lock_manager`` when one is given: the store
    the task engine builds for a task that sets no result storage of its own, with the
    storage left None when the run sets none (Prefect's default storage then applies).

    Args:
        lock_manager: A cache policy's lock manager; None keeps the run's.

    Returns:
        The store.
    """
    store = get_result_store()
    if lock_manager is None:
        return store
    return store.model_copy(update={"lock_manager": lock_manager})


# --- Client contexts ------------------------------------------------------------------------
# Relies on: ``prefect.context.SyncClientContext`` / ``AsyncClientContext.get_or_create()``
# (undocumented), which the engines use to share one Prefect client per thread or loop.
# Why: without one, each task run started from a worker thread of an async flow (or each
# campaign's task run on its loop) opens a client of its own: a TLS context and a
# connection per task run.
@contextmanager
def shared_sync_client() -> Iterator[SyncPrefectClient]:
    """One sync Prefect client for this thread and the task runs it starts."""
    with SyncClientContext.get_or_create() as context:
        yield context.client


@asynccontextmanager
async def shared_async_client() -> AsyncIterator[PrefectClient]:
    """One async Prefect client for this event loop and the task runs it starts."""
    async with AsyncClientContext.get_or_create() as context:
        yield context.client


# --- The worker-thread timeout notice ---------------------------------------------------------
# Relies on: the text of the warning ``prefect.task_engine`` logs on every run of a sync task
# with a timeout on a worker thread.
# Why: this package's tasks are built around that fact (the HTTP timeouts stop a call, the
# task timeout is a safety net), and one such warning per task run of a 500-image campaign
# buries the warnings that matter; each is also a log line sent to the Prefect API.
WORKER_THREAD_TIMEOUT_NOTICE = "Timeout of %s seconds configured for this task, but the task"


class WorkerThreadTimeoutNoticeFilter(logging.Filter):
    """Drops Prefect's worker-thread timeout notice for tasks whose name starts with
    ``task_name_prefix``."""

    def __init__(self, task_name_prefix: str) -> None:
        super().__init__()
        self.task_name_prefix = task_name_prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith(WORKER_THREAD_TIMEOUT_NOTICE)
            and str(getattr(record, "task_name", "")).startswith(self.task_name_prefix)
        )


def quiet_worker_thread_timeout_notice(task_name_prefix: str) -> None:
    """Install :class:`WorkerThreadTimeoutNoticeFilter` on Prefect's task-run logger, once.

    Args:
        task_name_prefix: The notice is dropped for tasks whose name starts so.
    """
    logger = logging.getLogger("prefect.task_runs")
    if not any(
        isinstance(f, WorkerThreadTimeoutNoticeFilter) and f.task_name_prefix == task_name_prefix
        for f in logger.filters
    ):
        logger.addFilter(WorkerThreadTimeoutNoticeFilter(task_name_prefix))


# --- FileSystemLockManager internals ------------------------------------------------------------
# Relies on: ``FileSystemLockManager._get_lock_info(key, use_cache)``,
# ``._lock_path_for_key(key)`` and its in-memory ``._locks`` cache of lock infos.
# Why: a lock held as a renewable lease rewrites its own lock file (the public API has no
# renewal), and Prefect writes a lock file in two steps (create, then fill), so a reader can
# see it empty for an instant and must read again rather than fail the task run; a writer
# killed between the two steps leaves it empty for good, and a lock nobody can read would
# fail every later run of its image.
_TORN_READ_RETRIES = 50
# An empty lock file this old was left by a writer that died between creating and filling
# it (a live one fills it at once): it is removed, and the image is free again.
ABANDONED_EMPTY_LOCK_SECONDS = 10.0


class RenewableFileSystemLockManager(FileSystemLockManager):
    """Prefect's file lock manager plus the two things a lease needs: where a key's lock file
    is and how to record a renewed expiration, and reads that survive a half-written file
    (or remove one abandoned empty)."""

    def _get_lock_info(self, key: str, use_cache: bool = True) -> Any:
        for _ in range(_TORN_READ_RETRIES):
            try:
                return super()._get_lock_info(key, use_cache)
            except ValueError:
                if self._remove_if_abandoned(key):
                    return None
                time.sleep(0.01)
        return super()._get_lock_info(key, use_cache)

    def _remove_if_abandoned(self, key: str) -> bool:
        path = self._lock_path_for_key(key)
        try:
            status = os.stat(path)
        except FileNotFoundError:
            return False
        if status.st_size or time.time() - status.st_mtime < ABANDONED_EMPTY_LOCK_SECONDS:
            return False
        path.unlink(missing_ok=True)
        self._locks.pop(key, None)
        return True

    def lock_file(self, key: str) -> Any:
        """The path of ``key``'s lock file."""
        return self._lock_path_for_key(key)

    def remember_expiration(self, key: str, expiration: datetime) -> None:
        """Record a renewed expiration in the in-memory cache of lock infos."""
        cached = self._locks.get(key)
        if cached is not None:
            cached["expiration"] = expiration


# --- Prefect's console log handler -----------------------------------------------------------
# Relies on: the ``console`` attribute (a rich ``Console``) of ``PrefectConsoleHandler``, the
# handler Prefect's logging configuration puts on the root logger.
# Why: a live progress bar has to draw on the console Prefect prints its log lines on, so that
# they scroll above the bar instead of tearing it; Prefect offers no accessor for it.
def prefect_console() -> Console | None:
    """The console Prefect prints its log lines on, if its console handler is installed.

    Returns:
        The root logger's ``PrefectConsoleHandler``'s console, else None.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            console: Console = handler.console
            return console
    return None
