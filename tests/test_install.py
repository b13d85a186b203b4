"""The wheel, as another team gets it: built, installed into a fresh virtual environment outside
the checkout, and its campaign flow run from an empty folder against the emulator and the
session's Prefect server (the fresh environment is a client of it, as a team's worker is of
theirs; the server runs the same Prefect, from the same frozen versions).

Marked ``install`` (a wheel built and a fresh environment filled), so a quick ``pytest`` leaves
it out; ``make test``, and so CI, runs it with the rest of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.install

# Runs in the fresh environment, from an empty folder: nothing of the checkout is importable.
SCRIPT = """
import json, os, sys
from pathlib import Path

from prefect.flows import load_flow_from_entrypoint

import prefect_journey
from prefect_journey import CampaignReport
from prefect_journey.emulator import EmulatorConfig, EmulatorServer, LatencyModel
from prefect_journey.flows import batch_campaign

config = EmulatorConfig(latency=LatencyModel(time_scale=0.01))
with EmulatorServer(config) as emulator:
    os.environ["JOURNEY_API_KEY"] = emulator.api_key
    os.environ["JOURNEY_BASE_URL"] = emulator.url
    loaded = load_flow_from_entrypoint("prefect_journey.flows.campaign:batch_campaign")
    items = [{"prompt": f"wheel item {i}"} for i in range(3)]
    report = loaded(items=items, campaign="wheel", destination="./images")
    again = batch_campaign(items=items, campaign="wheel", destination="./images")
    calls = emulator.ledger()["calls"].get("imagine", 0)
print(json.dumps({
    "package": prefect_journey.__file__,
    "same_flow": loaded.name == batch_campaign.name,
    "report_type": isinstance(report, CampaignReport),
    "first": report.ledger_line(),
    "again": again.ledger_line(),
    "calls": calls,
    "files": sorted(str(p) for p in Path("images").rglob("*.png")),
    "checkout_importable": any(Path(p, "flows", "demo.py").exists() for p in sys.path if p),
}))
"""


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_wheel_runs_the_campaign_flow_outside_the_checkout(
    tmp_path: Path, prefect_harness: Path
) -> None:
    """Builds the wheel, fills a fresh virtual environment from uv's cache (seconds; pip took a
    minute on 2 cores) and runs a campaign in it against the session's Prefect server."""
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist,
        ROOT, cwd=tmp_path)  # fmt: skip
    [wheel] = dist.glob("prefect_journey-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("flows/campaign.py", "campaigns/pipeline.py", "_compat.py", "py.typed"):
        assert f"prefect_journey/{shipped}" in names, shipped
    assert not any(name.startswith(("flows/", "tests/")) for name in names)

    # The versions this checkout was tested with: the install resolves nothing new.
    frozen = run(sys.executable, "-m", "pip", "freeze", "--exclude-editable", cwd=tmp_path)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(frozen)
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # uv (the installer of `make test`'s own environment) resolves the wheel's requirements as
    # pip does, from the packages that environment already fetched. Not compiled: the one run
    # compiles what it imports, not all of Prefect ahead.
    run(sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python", python,
        f"{wheel}[emulator]", "-c", constraints, cwd=tmp_path)  # fmt: skip

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "JOURNEY_", "PYTHON", "VIRTUAL_ENV"))
    }
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The session's Prefect server, as another team's flows use theirs.
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
    }
    result = json.loads(run(python, "-c", SCRIPT, cwd=empty, env=env).strip().splitlines()[-1])

    assert Path(result["package"]).is_relative_to(venv)
    assert not result["checkout_importable"]
    assert result["same_flow"] and result["report_type"]
    assert "items=3 stored=3 failed=0" in result["first"] and "calls=3" in result["first"]
    assert "cache_hits=3 calls=0" in result["again"] and result["calls"] == 3
    assert [Path(f).parent.as_posix() for f in result["files"]] == ["images/wheel"] * 3
