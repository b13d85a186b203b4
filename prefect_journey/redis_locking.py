"""The image locks in the Redis of ``JOURNEY_REDIS_URL``, for workers on several machines.

:class:`LeasedRedisLockManager` is prefect-redis's ``RedisLockManager`` with the leases of
:mod:`prefect_journey.locking`: each lock is a Redis key that lapses after a lease unless the
holder's process renews it. prefect-redis's own manager holds a lock for ever (or for a fixed
time), and cannot release from sync code a lock taken from async code, which Prefect's async
task engine does: the lock then stays in Redis for ever.

Imported only when ``JOURNEY_REDIS_URL`` is set (:func:`prefect_journey.cache.image_lock_manager`):
it needs the ``redis`` extra, and prefect-redis takes a quarter of a second to import.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prefect_redis.locking import RedisLockManager

from prefect_journey import coordination, policy, settings
from prefect_journey.errors import RedisUnavailableError
from prefect_journey.locking import LeaseRenewal

logger = logging.getLogger(__name__)

# Take the lock if it is free, or extend it if the holder has it already (taking it again is
# not an error, as with Prefect's managers): 1 if held now, else 0.
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# Remove the lock if the holder has it: 1 removed, 0 there was none, -1 another holder has it.
_RELEASE = """
local holder = redis.call('get', KEYS[1])
if not holder then return 0 end
if holder == ARGV[1] then
  redis.call('del', KEYS[1])
  return 1
end
return -1
"""
# Extend the holder's lease; a lock that vanished (a Redis restarted without its data) is
# taken again if nobody else took it meanwhile: 1 still held, else 0.
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
if not holder and redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


class LeasedRedisLockManager(LeaseRenewal, RedisLockManager):  # type: ignore[misc]  # untyped base
    """prefect-redis's lock manager with leases: each lock is a Redis key that lapses after
    ``lease_seconds`` unless renewed, and a daemon thread renews it while the holder's process
    lives, as :class:`LeasedFileSystemLockManager` does with files.

    Keys are ``<prefix>lock:<cache key>``. A Redis that does not answer is a
    :class:`~prefect_journey.errors.RedisUnavailableError` (not billed), so a run never pays
    for an image whose lock it could not take. A lock lost to a Redis restarted without its
    data is taken again at the next renewal, unless another run took it first.

    Args:
        url: The Redis URL (``JOURNEY_REDIS_URL``).
        prefix: The start of its keys; None reads ``JOURNEY_REDIS_PREFIX``.
        lease_seconds: The lease; None reads ``JOURNEY_LOCK_LEASE_SECONDS``.

    Example:
        ```python
        from prefect_journey.cache import IMAGINE_CACHE_POLICY
        from prefect_journey.redis_locking import LeasedRedisLockManager

        locks = LeasedRedisLockManager("redis://redis.internal:6379/0", lease_seconds=30)
        policy = IMAGINE_CACHE_POLICY.configure(lock_manager=locks)
        ```
    """

    def __init__(
        self, url: str, prefix: str | None = None, lease_seconds: float | None = None
    ) -> None:
        super().__init__(connection_url=url)
        self.url = url
        self.prefix = settings.redis_prefix() if prefix is None else prefix
        self.lease_seconds = (
            lease_seconds if lease_seconds is not None else settings.lock_lease_seconds()
        )
        # The process's shared client, with the package's timeouts and retries.
        self.client = coordination.sync_client(url)
        self._start_renewals()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.url, self.prefix, self.lease_seconds))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({settings.redacted_url(self.url)!r}, prefix={self.prefix!r})"

    def lock_key(self, key: str) -> str:
        """The Redis key of ``key``'s lock."""
        return f"{self.prefix}lock:{key}"

    def _milliseconds(self, hold_timeout: float | None) -> int:
        return max(1, int((hold_timeout or self.lease_seconds) * 1000))

    def _reaching(self, purpose: str) -> Any:
        return coordination.reaching(self.url, purpose)

    def _sync_script(self, source: str) -> Any:
        return self.client.register_script(source)

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        script = self._sync_script(_ACQUIRE)
        while True:
            with self._reaching("to take an image's lock, so its call was not made"):
                taken = script(
                    keys=[self.lock_key(key)], args=[holder, self._milliseconds(hold_timeout)]
                )
            if taken:
                self._track(key, holder)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(policy.LOCK_POLL_INTERVAL)

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        script = coordination.async_client(self.url).register_script(_ACQUIRE)
        while True:
            with self._reaching("to take an image's lock, so its call was not made"):
                taken = await script(
                    keys=[self.lock_key(key)], args=[holder, self._milliseconds(hold_timeout)]
                )
            if taken:
                self._track(key, holder)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(policy.LOCK_POLL_INTERVAL)

    def release_lock(self, key: str, holder: str) -> None:
        """Release ``key``'s lock, however it was taken.

        Raises:
            ValueError: Another holder has the lock (as Prefect's managers raise).
        """
        with self._held_lock:
            self._untrack(key)
            try:
                with self._reaching("to release an image's lock"):
                    released = self._sync_script(_RELEASE)(keys=[self.lock_key(key)], args=[holder])
            except RedisUnavailableError as exc:
                # The work under the lock is over either way: unrenewed, it lapses after
                # its lease, and failing here would fail a run whose image is recorded.
                logger.warning("%s; it lapses within %.0f s", exc, self.lease_seconds)
                return
        if released == -1:
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")

    def is_locked(self, key: str) -> bool:
        try:
            with self._reaching("to look at an image's lock"):
                return bool(self.client.exists(self.lock_key(key)))
        except RedisUnavailableError:
            holder = self._held.get(key)
            if holder is not None and self._within_lease(key, holder):
                return True  # this process's own, as is_lock_holder answers
            raise

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether ``holder`` has ``key``'s lock. With Redis unreachable, a lock this process
        took is still its own until its lease, as last renewed, passes: the image paid for
        under it is still recorded, so a later run does not pay for it again.

        Raises:
            RedisUnavailableError: Redis does not answer, and the lock is not one this
                process holds within its lease.
        """
        try:
            with self._reaching("to look at an image's lock"):
                current = self.client.get(self.lock_key(key))
        except RedisUnavailableError:
            if self._within_lease(key, holder):
                return True
            raise
        if current is None and self._within_lease(key, holder):
            # Redis came back empty (a restart without persistence) within the lease: take
            # the lock back now, as the next renewal would, so the paid image is recorded.
            return self._renew(key, holder) is True
        return current == holder.encode()

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(policy.LOCK_POLL_INTERVAL)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        client = coordination.async_client(self.url)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._reaching("to look at an image's lock"):
                if not await client.exists(self.lock_key(key)):
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(policy.LOCK_POLL_INTERVAL)

    def _renew(self, key: str, holder: str) -> bool | None:
        try:
            with self._reaching("to renew an image's lock"):
                held = self._sync_script(_RENEW)(
                    keys=[self.lock_key(key)], args=[holder, self._milliseconds(None)]
                )
        except Exception as exc:  # tried again at the next renewal; the lease may lapse
            logger.warning("could not renew the lock of %s: %s", key, exc)
            return None
        if not held:
            logger.warning("the lock of %s was lost to another holder", key)
        return bool(held)
