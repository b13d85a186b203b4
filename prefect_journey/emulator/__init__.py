"""A local JourneyAPI emulator that follows the documented contract.

Start it with ``prefect-journey emulator --port 8765`` or, in Python, with
:class:`EmulatorServer`. See docs/emulator.md.
"""

from prefect_journey.emulator.app import EmulatorState, create_app
from prefect_journey.emulator.config import (
    DEFAULT_API_KEY,
    EmulatorConfig,
    FaultPlan,
    LatencyModel,
    Quota,
)
from prefect_journey.emulator.server import BackgroundServer, EmulatorServer, serve_forever

__all__ = [
    "DEFAULT_API_KEY",
    "BackgroundServer",
    "EmulatorConfig",
    "EmulatorServer",
    "EmulatorState",
    "FaultPlan",
    "LatencyModel",
    "Quota",
    "create_app",
    "serve_forever",
]
