"""Shared fixtures: the emulator on a loopback port (real HTTP), free ports."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from prefect_journey.emulator import EmulatorConfig, EmulatorServer, FaultPlan, LatencyModel

# Generation latency in tests: 1 % of the realistic model (a bare 1K image in ~80 ms).
TEST_TIME_SCALE = 0.01
SENTINEL_KEY = "sk-SENTINEL-9f8e7d6c5b4a"
SENTINEL_WEBHOOK_SECRET = "whsec-SENTINEL-0a1b2c3d"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    config = EmulatorConfig(
        api_keys=("test-key", SENTINEL_KEY),
        latency=LatencyModel(time_scale=TEST_TIME_SCALE),
    )
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture
def emulator(emulator_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """The shared emulator, reset to a clean ledger, full credits and no faults."""
    state = emulator_server.state
    state.config.faults = FaultPlan()
    state.config.jpeg_as_png_rate = 0.0
    state.config.latency.time_scale = TEST_TIME_SCALE
    state.config.latency.fixed = None
    emulator_server.admin("reset")
    yield emulator_server
