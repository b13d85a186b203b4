"""The Redis the workers share (``JOURNEY_REDIS_URL``): its clients, its keys, and what
"cannot reach it" means.

With ``JOURNEY_REDIS_URL`` set, three things that keep money safe move from one machine into
Redis, so that workers on several machines share them: the image locks
(:class:`~prefect_journey.redis_locking.LeasedRedisLockManager`), the campaigns' credit budgets
(:class:`~prefect_journey.budget.CreditBudget`) and the webhook receiver's memory of
deliveries (:mod:`prefect_journey.webhooks`). Every key starts with
``JOURNEY_REDIS_PREFIX``.

A Redis that does not answer is a :class:`~prefect_journey.errors.RedisUnavailableError`,
raised before the call it would have guarded: at a run's start (:func:`check_reachable`),
or for one item mid-run. Messages show the URL without its password.

The other modules import this one only when ``JOURNEY_REDIS_URL`` is set: it needs the
``redis`` extra (``pip install 'prefect-journey[redis]'``), which brings prefect-redis.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from prefect_journey import policy, settings
from prefect_journey.errors import ConfigurationError, RedisUnavailableError

try:
    import redis
    import redis.asyncio
    from prefect_redis.connection import redis_from_url
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
except ImportError:  # the extra is not installed
    raise ConfigurationError(
        f"{settings.REDIS_URL.name} is set, but prefect-redis is not installed: "
        "pip install 'prefect-journey[redis]'"
    ) from None

# What "Redis did not answer" looks like from redis-py (AuthenticationError, a wrong
# password, is a ConnectionError too).
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def _options(*, asynchronous: bool) -> dict[str, object]:
    """Timeouts and retries of every client (redis-py retries a connection error or a
    timeout by default)."""
    base, cap = policy.REDIS_RETRY_BACKOFF
    retry = AsyncRetry if asynchronous else Retry
    return {
        "socket_timeout": policy.REDIS_SOCKET_TIMEOUT,
        "socket_connect_timeout": policy.REDIS_SOCKET_TIMEOUT,
        "retry": retry(ExponentialBackoff(cap=cap, base=base), policy.REDIS_RETRIES),
    }


@functools.cache
def sync_client(url: str) -> redis.Redis:
    """The process's client of the Redis at ``url`` (a pool, thread-safe; opens no
    connection until used).

    Args:
        url: A Redis URL, as :func:`prefect_journey.settings.redis_url` checks it.

    Returns:
        The client, the same one for every caller in this process.
    """
    client: redis.Redis = redis_from_url(url, **_options(asynchronous=False))
    return client


_ASYNC_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, redis.asyncio.Redis]]
_ASYNC_CLIENTS = weakref.WeakKeyDictionary()


def async_client(url: str) -> redis.asyncio.Redis:
    """The running event loop's client of the Redis at ``url``: an asyncio connection
    belongs to the loop that opened it, and a process runs several loops (each sync task
    its own).

    Args:
        url: A Redis URL.

    Returns:
        The client, the same one for every caller on this loop.
    """
    clients = _ASYNC_CLIENTS.setdefault(asyncio.get_running_loop(), {})
    if url not in clients:
        clients[url] = redis_from_url(url, asynchronous=True, **_options(asynchronous=True))
    return clients[url]


def key(name: str) -> str:
    """The Redis key of ``name``: ``JOURNEY_REDIS_PREFIX`` followed by it.

    Args:
        name: The key's own part, such as ``lock:<cache key>``.

    Returns:
        The prefixed key.
    """
    return settings.redis_prefix() + name


@contextmanager
def reaching(url: str, purpose: str) -> Iterator[None]:
    """Turn "Redis did not answer" inside the block into :class:`RedisUnavailableError`.

    Args:
        url: The Redis the block talks to (shown without its password).
        purpose: What the block needed Redis for, as "to ...".

    Raises:
        RedisUnavailableError: The block could not reach Redis.
    """
    try:
        yield
    except UNREACHABLE as exc:
        raise RedisUnavailableError(
            f"Redis at {settings.redacted_url(url)} ({settings.REDIS_URL.name}) did not "
            f"answer {purpose} ({type(exc).__name__})"
        ) from None


def check_reachable(url: str) -> None:
    """Fail now, before any paid call, if the Redis at ``url`` does not answer.

    Args:
        url: The Redis URL.

    Raises:
        RedisUnavailableError: It does not answer; the message says to start it or fix
            ``JOURNEY_REDIS_URL``.
    """
    with reaching(url, "at the start, so nothing was started: start it, or fix the URL"):
        sync_client(url).ping()
