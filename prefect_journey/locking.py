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
instead (see docs/scaling.md).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic_core

from prefect_journey import settings
from prefect_journey._compat import RenewableFileSystemLockManager


class LeasedFileSystemLockManager(RenewableFileSystemLockManager):
    """File locks held as leases of ``lease_seconds`` (default: ``JOURNEY_LOCK_LEASE_SECONDS``,
    else 60 s), renewed while the process lives.

    Args:
        lock_files_directory: Where the lock files live (one machine).
        lease_seconds: The lease; None reads :func:`prefect_journey.settings.lock_lease_seconds`.

    Example:
        ```python
        from pathlib import Path
        from prefect_journey.cache import IMAGINE_CACHE_POLICY
        from prefect_journey.locking import LeasedFileSystemLockManager

        locks = LeasedFileSystemLockManager(Path("/shared/locks"), lease_seconds=30)
        policy = IMAGINE_CACHE_POLICY.configure(lock_manager=locks)
        ```
    """

    def __init__(self, lock_files_directory: Path, lease_seconds: float | None = None):
        super().__init__(lock_files_directory)
        self.lease_seconds = (
            lease_seconds if lease_seconds is not None else settings.lock_lease_seconds()
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
        path = self.lock_file(key)
        try:
            current = pydantic_core.from_json(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return
        if current.get("holder") != holder:
            return
        expiration = datetime.now(UTC) + timedelta(seconds=self.lease_seconds)
        renewed = path.with_name(f".{path.name}.{os.getpid()}.renew")
        renewed.write_bytes(
            pydantic_core.to_json({"holder": holder, "expiration": str(expiration)})
        )
        os.replace(renewed, path)  # readers see the old lease or the new one, never half
        self.remember_expiration(key, expiration)
