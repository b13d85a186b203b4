"""Cache locks that a killed process cannot leave behind.

Two runs asking for the same image at the same moment must pay once: the ``imagine`` cache
policy runs under ``SERIALIZABLE`` isolation, so the second waits for the first's lock and
then reads its cached result. Prefect's ``FileSystemLockManager`` holds a lock forever
unless given a hold timeout, and Prefect asks for none; after a ``kill -9`` the next run of
that image would wait for ever. A fixed timeout long enough for a slow call with retries
(~25 minutes) would stall a resumed campaign just as badly.

:class:`LeasedFileSystemLockManager` holds each lock as a short lease (60 s, or
``JOURNEY_LOCK_LEASE_SECONDS``) that a daemon thread renews every third of a lease while the
holder's process lives. A dead process stops renewing, and its locks lapse within one lease:
a shorter lease resumes a killed run sooner, at the price of more renewals. One machine only
(the lock files are local); for several, configure prefect-redis's ``RedisLockManager``
instead (see the README).
"""

from __future__ import annotations

import math
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydantic_core
from prefect.locking.filesystem import FileSystemLockManager
from prefect.types._datetime import now

from prefect_journey.errors import ConfigurationError

# A killed run's images wait this long before another run may generate them; renewing every
# 20 s costs nothing next to calls that take minutes.
DEFAULT_LEASE_SECONDS = 60.0
LEASE_SECONDS_ENV = "JOURNEY_LOCK_LEASE_SECONDS"
# Renewal runs every third of a lease: below a second it would be a busy loop of file writes.
MIN_LEASE_SECONDS = 1.0
_TORN_READ_RETRIES = 50


def configured_lease_seconds() -> float:
    """The lease of every lock: ``JOURNEY_LOCK_LEASE_SECONDS``, or 60 s when unset."""
    raw = os.environ.get(LEASE_SECONDS_ENV)
    if not raw:
        return DEFAULT_LEASE_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= MIN_LEASE_SECONDS):
        raise ConfigurationError(
            f"{LEASE_SECONDS_ENV} must be a number of seconds >= {MIN_LEASE_SECONDS:g}, got {raw!r}"
        )
    return seconds


class LeasedFileSystemLockManager(FileSystemLockManager):
    """File locks held as leases of ``lease_seconds`` (default: :func:`configured_lease_seconds`),
    renewed while the process lives."""

    def __init__(self, lock_files_directory: Path, lease_seconds: float | None = None):
        super().__init__(lock_files_directory)
        self.lease_seconds = (
            lease_seconds if lease_seconds is not None else configured_lease_seconds()
        )
        self._held: dict[str, str] = {}
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses process boundaries (Dask workers) as its settings; threads stay behind.
        return (type(self), (self.lock_files_directory, self.lease_seconds))

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        acquired = super().acquire_lock(
            key, holder, acquire_timeout, hold_timeout or self.lease_seconds
        )
        if acquired:
            self._track(key, holder)
        return acquired

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        acquired = await super().aacquire_lock(
            key, holder, acquire_timeout, hold_timeout or self.lease_seconds
        )
        if acquired:
            self._track(key, holder)
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        # Under the same lock as renewals, so a renewal cannot recreate a released lock.
        with self._held_lock:
            self._held.pop(key, None)
            super().release_lock(key, holder)

    def _get_lock_info(self, key: str, use_cache: bool = True) -> Any:
        # Prefect writes a lock file in two steps (create, then fill), so a reader can see
        # it empty for an instant; read again rather than fail the task run.
        for _ in range(_TORN_READ_RETRIES):
            try:
                return super()._get_lock_info(key, use_cache)
            except ValueError:
                time.sleep(0.01)
        return super()._get_lock_info(key, use_cache)

    def _track(self, key: str, holder: str) -> None:
        with self._held_lock:
            self._held[key] = holder
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew_while_held, name="journey-lock-renewer", daemon=True
                )
                self._renewer.start()

    def _renew_while_held(self) -> None:
        # Ends once nothing is held: a long-lived worker keeps no idle thread waking for ever.
        while True:
            time.sleep(self.lease_seconds / 3)
            with self._held_lock:
                if not self._held:
                    self._renewer = None
                    return
                for key, holder in list(self._held.items()):
                    self._renew(key, holder)

    def _renew(self, key: str, holder: str) -> None:
        path = self._lock_path_for_key(key)
        try:
            current = pydantic_core.from_json(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return
        if current.get("holder") != holder:
            return
        expiration = now("UTC") + timedelta(seconds=self.lease_seconds)
        renewed = path.with_name(f".{path.name}.{os.getpid()}.renew")
        renewed.write_bytes(
            pydantic_core.to_json({"holder": holder, "expiration": str(expiration)})
        )
        os.replace(renewed, path)  # readers see the old lease or the new one, never half
        cached = self._locks.get(key)
        if cached is not None:
            cached["expiration"] = expiration
