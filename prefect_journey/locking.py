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
(the lock files are local).

:class:`~prefect_journey.redis_locking.LeasedRedisLockManager` holds the same leases in
Redis, for workers on several machines, with the renewal of :class:`LeaseRenewal`.

Which one the ``imagine`` tasks and the campaigns use is decided at each call by
:func:`prefect_journey.cache.image_lock_manager` (``JOURNEY_REDIS_URL``), through
:class:`SelectedLockManager`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic_core
from prefect.locking.protocol import LockManager

from prefect_journey import settings
from prefect_journey._compat import RenewableFileSystemLockManager


class LeaseRenewal:
    """Renews the leases of the locks this process holds, from one daemon thread that wakes
    every third of a lease while any is held.

    A manager calls :meth:`_start_renewals` once, :meth:`_track` after each lock it takes,
    and releases under :attr:`_held_lock` after :meth:`_untrack`, so that a renewal cannot
    bring back a released lock; it renews one lock in :meth:`_renew`.
    """

    lease_seconds: float

    def _start_renewals(self) -> None:
        self._held: dict[str, str] = {}
        # When each held lock's lease, as last taken or renewed, ends (monotonic clock).
        self._leased_until: dict[str, float] = {}
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def _track(self, key: str, holder: str) -> None:
        with self._held_lock:
            self._held[key] = holder
            self._leased_until[key] = time.monotonic() + self.lease_seconds
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew_while_held, name="journey-lock-renewer", daemon=True
                )
                self._renewer.start()

    def _untrack(self, key: str) -> None:
        """Stop renewing ``key``'s lock; the caller holds :attr:`_held_lock`."""
        self._held.pop(key, None)
        self._leased_until.pop(key, None)

    def _within_lease(self, key: str, holder: str) -> bool:
        """Whether ``holder`` took ``key``'s lock in this process and its lease, as last
        taken or renewed, has not passed: no other holder can have it yet."""
        with self._held_lock:
            held = self._held.get(key) == holder
            return held and time.monotonic() < self._leased_until.get(key, 0.0)

    def _renew_while_held(self) -> None:
        # Ends once nothing is held: a long-lived worker keeps no idle thread waking for ever.
        while True:
            time.sleep(self.lease_seconds / 3)
            with self._held_lock:
                if not self._held:
                    self._renewer = None
                    return
                for key, holder in list(self._held.items()):
                    renewed_at = time.monotonic()
                    renewed = self._renew(key, holder)
                    if renewed is False:
                        self._untrack(key)
                    elif renewed:
                        self._leased_until[key] = renewed_at + self.lease_seconds

    def _renew(self, key: str, holder: str) -> bool | None:
        """Extend ``key``'s lease by a lease if ``holder`` holds it.

        Returns:
            True when renewed; False when ``holder`` has lost the lock, which is renewed no
            more; None when it cannot be told now (tried again at the next renewal).
        """
        raise NotImplementedError


class LeasedFileSystemLockManager(LeaseRenewal, RenewableFileSystemLockManager):
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
        self._start_renewals()

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
        with self._held_lock:
            self._untrack(key)
            super().release_lock(key, holder)

    def _renew(self, key: str, holder: str) -> bool | None:
        path = self.lock_file(key)
        try:
            current = pydantic_core.from_json(path.read_bytes())
        except FileNotFoundError:
            return False
        except ValueError:  # being written this instant: looked at again at the next renewal
            return None
        if current.get("holder") != holder:
            return False
        expiration = datetime.now(UTC) + timedelta(seconds=self.lease_seconds)
        renewed = path.with_name(f".{path.name}.{os.getpid()}.renew")
        renewed.write_bytes(
            pydantic_core.to_json({"holder": holder, "expiration": str(expiration)})
        )
        try:
            os.replace(renewed, path)  # readers see the old lease or the new one, never half
        except PermissionError:  # Windows: another process is reading it this instant
            renewed.unlink()
            return None
        self.remember_expiration(key, expiration)
        return True


class SelectedLockManager(LockManager):
    """The lock manager ``select()`` returns, asked again at each call: the package's cache
    policy holds this one object while the settings decide, when a lock is taken, which
    manager holds it (:func:`prefect_journey.cache.image_lock_manager`).

    Args:
        select: Returns the manager to use now; a module-level function, so that this
            object pickles as a reference to it.
    """

    def __init__(self, select: Callable[[], LockManager]) -> None:
        self.select = select

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.select,))

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        return self.select().acquire_lock(key, holder, acquire_timeout, hold_timeout)

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        return await self.select().aacquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        self.select().release_lock(key, holder)

    def is_locked(self, key: str) -> bool:
        return self.select().is_locked(key)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self.select().is_lock_holder(key, holder)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.select().wait_for_lock(key, timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await self.select().await_for_lock(key, timeout)
