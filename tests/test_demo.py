"""make demo (flows/demo.py): the main flow end to end against its own emulator, storing into
./outputs, and again: the second run finds the first one's image and pays nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.usefixtures("prefect_harness")
def test_make_demo_stores_an_image_and_a_second_demo_pays_nothing(tmp_path: Path) -> None:
    """Two demos, each a subprocess that imports Prefect, on the session's Prefect server."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("JOURNEY_")} | {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PYTHONPATH": str(ROOT),
    }
    printed = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "flows.demo"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        printed.append(done.stdout)
    [image] = (tmp_path / "outputs" / "images").glob("*.png")
    assert f"Image: {image.as_uri()}" in printed[0] and ", 4 credits," in printed[0]
    assert f"Image: {image.as_uri()}" in printed[1] and ", 0 credits," in printed[1]
