"""Prefect 3 integration for the JourneyAPI image API (``nano-banana-2``).

Nothing is imported until it is used: ``from prefect_journey import JourneyClient`` loads
the plain-Python client (httpx, pydantic) and not Prefect, whose import alone takes longer
than the emulator's whole start-up. The Blocks, which need Prefect, load when first asked
for; Prefect's collection loader imports them through :mod:`prefect_journey.blocks`, and
``prefect block register -m prefect_journey`` finds them here. Tasks live in
:mod:`prefect_journey.tasks`, flows in :mod:`prefect_journey.flows`, the campaign pipeline
in :mod:`prefect_journey.campaigns`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect_journey.budget import BudgetExceededError
    from prefect_journey.campaigns.pipeline import (
        CampaignFailedError,
        CampaignReport,
        ItemOutcome,
    )
    from prefect_journey.campaigns.plan import CampaignError
    from prefect_journey.client import AsyncJourneyClient, JourneyClient
    from prefect_journey.credentials import JourneyCredentials
    from prefect_journey.destinations import ImageDestination
    from prefect_journey.errors import JourneyError
    from prefect_journey.models import ImagineRequest, ImagineResult
    from prefect_journey.receiver import JourneyWebhookReceiver
    from prefect_journey.redis_block import JourneyRedis
    from prefect_journey.storage import Destination, StoredImage

# Each public name and the module that defines it.
_EXPORTS = {
    "AsyncJourneyClient": "prefect_journey.client",
    "BudgetExceededError": "prefect_journey.budget",
    "CampaignError": "prefect_journey.campaigns.plan",
    "CampaignFailedError": "prefect_journey.campaigns.pipeline",
    "CampaignReport": "prefect_journey.campaigns.pipeline",
    "ItemOutcome": "prefect_journey.campaigns.pipeline",
    "Destination": "prefect_journey.storage",
    "ImageDestination": "prefect_journey.destinations",
    "ImagineRequest": "prefect_journey.models",
    "ImagineResult": "prefect_journey.models",
    "JourneyClient": "prefect_journey.client",
    "JourneyCredentials": "prefect_journey.credentials",
    "JourneyError": "prefect_journey.errors",
    "JourneyWebhookReceiver": "prefect_journey.receiver",
    "JourneyRedis": "prefect_journey.redis_block",
    "StoredImage": "prefect_journey.storage",
}
__all__ = [
    "AsyncJourneyClient",
    "BudgetExceededError",
    "CampaignError",
    "CampaignFailedError",
    "CampaignReport",
    "Destination",
    "ImageDestination",
    "ImagineRequest",
    "ImagineResult",
    "ItemOutcome",
    "JourneyClient",
    "JourneyCredentials",
    "JourneyError",
    "JourneyRedis",
    "JourneyWebhookReceiver",
    "StoredImage",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    # inspect.getmembers, which `prefect block register -m` uses, lists what dir() names.
    return sorted({*globals(), *_EXPORTS})
