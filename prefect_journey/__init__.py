"""Prefect 3 integration for the JourneyAPI image API (``nano-banana-2``).

The plain-Python core (``client``, ``models``, ``storage``) needs no Prefect server; the
Blocks are imported here so that ``prefect block register -m prefect_journey`` finds them.
Tasks live in :mod:`prefect_journey.tasks`.
"""

from prefect_journey.client import AsyncJourneyClient, JourneyClient
from prefect_journey.credentials import JourneyCredentials
from prefect_journey.destinations import ImageDestination
from prefect_journey.errors import JourneyError
from prefect_journey.models import ImagineRequest, ImagineResult
from prefect_journey.storage import Destination, StoredImage

__all__ = [
    "AsyncJourneyClient",
    "Destination",
    "ImageDestination",
    "ImagineRequest",
    "ImagineResult",
    "JourneyClient",
    "JourneyCredentials",
    "JourneyError",
    "StoredImage",
]
__version__ = "0.1.0"
