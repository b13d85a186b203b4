"""The package root: every public name resolves, and the plain-Python core and the
emulator start without importing Prefect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import prefect_journey


def _modules_loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _from_prefect(modules: set[str]) -> set[str]:
    return {name for name in modules if name == "prefect" or name.startswith("prefect.")}


def test_the_core_and_the_emulator_import_without_prefect() -> None:
    loaded = _modules_loaded_by(
        "import prefect_journey\n"
        "from prefect_journey import AsyncJourneyClient, Destination, ImagineRequest,"
        " ImagineResult, JourneyClient, JourneyError, StoredImage\n"
        "import prefect_journey.cli, prefect_journey.emulator, prefect_journey.policy"
    )
    assert "prefect_journey.client" in loaded and "prefect_journey.emulator.app" in loaded
    assert _from_prefect(loaded) == set()


def test_a_block_loads_prefect_when_first_asked_for() -> None:
    loaded = _modules_loaded_by("from prefect_journey import JourneyCredentials")
    assert {"prefect_journey.credentials", "prefect.blocks.core"} <= loaded
    assert "prefect_journey.destinations" not in loaded  # only what was asked for


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in prefect_journey.__all__:
        value = getattr(prefect_journey, name)
        assert value.__name__ == name
    assert set(prefect_journey.__all__) <= set(dir(prefect_journey))
    assert prefect_journey.__version__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'JourneyClinet'"):
        prefect_journey.JourneyClinet  # noqa: B018
    with pytest.raises(ImportError):
        from prefect_journey import JourneyClinet  # noqa: F401
