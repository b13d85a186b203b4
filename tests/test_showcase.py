"""tools/showcase.py: `make ui` (a real Prefect server with the example runs, until Ctrl-C)
and the pictures `make screenshots` takes, each shown by a docs page."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tools.showcase import PICTURES

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_picture_is_shown_by_a_docs_page() -> None:
    pages = "\n".join(page.read_text() for page in DOCS.glob("*.md"))
    for shot in PICTURES:
        assert f"](images/{shot.name})" in pages, shot.name
        assert (DOCS / "images" / shot.name).is_file(), shot.name


@pytest.mark.slow
def test_make_ui_shows_the_runs_until_ctrl_c(tmp_path: Path) -> None:
    """make ui starts a real prefect server on a database migrated from scratch, the emulator,
    the example flow, a campaign and the deployments."""
    port = free_port()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # As a person runs it: Prefect's API and results where make ui puts them.
    for name in ("PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        env.pop(name, None)
    command = ["-m", "tools.showcase", "--port", str(port), "--outputs", str(tmp_path / "outputs")]
    ui = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert ui.stdout is not None
        # Read on a thread: a wait for the addresses must end even if make ui hangs.
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in ui.stdout], daemon=True).start()
        printed: list[str] = []
        deadline = time.monotonic() + 300
        while not printed or "Ctrl-C stops" not in printed[-1]:
            try:
                printed.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
            except queue.Empty:
                pytest.fail(f"make ui printed no addresses: {''.join(printed[-30:])}")
        shown = dict(re.findall(r"^  (.+?) \.+ (http\S+)$", "".join(printed), re.MULTILINE))
        base = f"http://127.0.0.1:{port}"
        # The UI itself is served, and each address it printed is a real object of the API.
        assert "<html" in httpx.get(base, timeout=10).text.lower()
        api = f"{base}/api"
        for label in ("the example flow's run", "a campaign's run"):
            run_id = shown[label].rsplit("/", 1)[1]
            run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
            assert run["state"]["type"] == "COMPLETED", label
        image_id = shown["its image"].rsplit("/", 1)[1]
        artifact = httpx.get(f"{api}/artifacts/{image_id}", timeout=10).json()
        # The picture is in the artifact; the full-size image is served while the UI runs.
        assert artifact["data"].startswith("data:image/jpeg;base64,")
        link = artifact["description"].split("[full size](")[1].split(")")[0]
        picture = httpx.get(link, timeout=10)
        assert picture.headers["content-type"] == "image/png"
        deployment_id = shown["the scheduled deployment"].rsplit("/", 1)[1]
        deployment = httpx.get(f"{api}/deployments/{deployment_id}", timeout=10).json()
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 8 * * *"
        assert len(list((tmp_path / "outputs").rglob("*.png"))) == 7  # the flow and 6 items
        # The Blocks' logo is registered at the receiver make ui runs, which serves the file
        # shipped in the package: the UI shows it without internet.
        block_type = httpx.get(f"{api}/block_types/slug/journeyapi-credentials", timeout=10)
        logo = httpx.get(block_type.json()["logo_url"], timeout=10)
        assert logo.content == (ROOT / "prefect_journey" / "assets" / "logo.png").read_bytes()
    finally:
        ui.send_signal(signal.SIGINT)
        status = ui.wait(timeout=60)
    assert status == 0  # Ctrl-C is how it ends
    with pytest.raises(httpx.ConnectError):
        httpx.get(base, timeout=5)
