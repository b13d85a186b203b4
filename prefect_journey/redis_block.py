"""The ``JourneyRedis`` Block: the Redis the workers share, saved once on the Prefect server
instead of a URL with its password in every worker's environment.

With ``JOURNEY_REDIS_BLOCK=<name>`` on the workers and the receiver, the first image lock,
campaign or receiver of a process loads the block (:func:`apply_redis_block`) and sets
``JOURNEY_REDIS_URL``, ``JOURNEY_REDIS_PREFIX`` and ``JOURNEY_LOCK_LEASE_SECONDS`` in the
process's environment from it, where every part reads them (:mod:`prefect_journey.settings`),
so the block and the variables behave the same. A variable set on the worker wins over the
block's field (``JOURNEY_REDIS_URL`` over the whole block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, HttpUrl, SecretStr, field_validator

from prefect_journey import settings
from prefect_journey._compat import call_sync
from prefect_journey.credentials import DOCUMENTATION_URL, LOGO_URL

if TYPE_CHECKING:
    import redis


class JourneyRedis(Block):
    """The Redis that workers on several machines share: the image locks, the campaigns'
    credit budgets and the receiver's memory of deliveries live there, so that two runs pay
    once for an image (docs/scaling.md).

    Example:
        Save it once; then set ``JOURNEY_REDIS_BLOCK=shared-redis`` on every worker:
        ```python
        from prefect_journey.redis_block import JourneyRedis

        JourneyRedis(url="redis://:PASSWORD@redis.internal:6379/0").save(
            "shared-redis", overwrite=True
        )
        ```

        Read it back where the settings are needed:
        ```python
        from prefect_journey.redis_block import JourneyRedis

        redis = JourneyRedis.load("BLOCK_NAME")
        print(redis.prefix)
        ```
    """

    # A validation error never echoes what it was given: the URL may hold a password.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "JourneyAPI Redis"
    # The card in the UI shows about two lines: one sentence, not the docstring.
    _description = "The Redis that workers share for image locks and credit budgets."
    _block_type_slug = "journeyapi-redis"
    _logo_url = LOGO_URL
    _documentation_url = HttpUrl(DOCUMENTATION_URL)

    url: SecretStr = Field(
        default=...,
        title="Redis URL",
        description=(
            "redis://, rediss://, unix:// or redis+sentinel://, with its password if it has "
            "one (kept secret)."
        ),
    )
    prefix: str = Field(
        default=settings.REDIS_PREFIX.default,
        min_length=1,
        description="The start of every key the package writes, so deployments can share a Redis.",
    )
    lock_lease_seconds: float = Field(
        default=settings.DEFAULT_LEASE_SECONDS,
        ge=settings.MIN_LEASE_SECONDS,
        title="Lock lease (seconds)",
        description="A killed worker's image locks are free for the others after this long.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        settings.check_redis_url(value.get_secret_value(), what="url")
        return value

    def get_client(self) -> redis.Redis:
        """The process's client of this Redis (needs the ``redis`` extra).

        Returns:
            A redis-py client, the one the package's locks and budgets use.
        """
        from prefect_journey import coordination

        return coordination.sync_client(self.url.get_secret_value().strip())


def apply_redis_block() -> None:
    """Set the Redis variables of this process from ``JOURNEY_REDIS_BLOCK``'s block, unless
    ``JOURNEY_REDIS_URL`` is set or no block is named; a prefix or lease variable already set
    stays. Loads the block once per process: the URL it sets makes every later call return at
    once.

    Raises:
        ValueError: No block of that name (Prefect's error).
    """
    name = settings.redis_block()
    if name is None or settings.redis_url() is not None:
        return
    block = cast(JourneyRedis, call_sync(JourneyRedis.load, name))
    settings.use_redis(block.url.get_secret_value(), block.prefix, block.lock_lease_seconds)
