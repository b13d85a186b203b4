"""The package's Blocks, for Prefect's collection loader.

The ``prefect.collections`` entry point names this module: Prefect imports it when its
server starts, when a worker starts and when a block is loaded by its type's slug, and
importing it defines the block types, so Prefect can find and register them. The
package root loads nothing until it is used (see :mod:`prefect_journey`).
"""

from prefect_journey.credentials import JourneyCredentials
from prefect_journey.destinations import ImageDestination
from prefect_journey.receiver import JourneyWebhookReceiver
from prefect_journey.redis_block import JourneyRedis

__all__ = ["ImageDestination", "JourneyCredentials", "JourneyRedis", "JourneyWebhookReceiver"]
