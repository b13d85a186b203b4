"""A campaign started from a terminal: a live progress bar beside Prefect's log lines, and
nothing of it when the output is not a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

from prefect_journey.campaigns.pipeline import ItemOutcome
from prefect_journey.campaigns.progress import CampaignProgress
from prefect_journey.emulator import EmulatorServer

from .conftest import SENTINEL_KEY, run_in_terminal

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "flows" / "batch_campaign.py"

pytestmark = pytest.mark.usefixtures("prefect_harness")


def sheet(folder: Path, items: int) -> Path:
    path = folder / "sheet.csv"
    run = uuid.uuid4().hex[:8]
    path.write_text("prompt\n" + "".join(f"poster {i} of run {run}\n" for i in range(items)))
    return path


def plain(text: str) -> str:
    """``text`` without a terminal's escape sequences (colours, cursor moves): what a person
    reads."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def example_env(emulator: EmulatorServer) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(PREFECT_LOCAL_STORAGE_PATH.value()),
        "JOURNEY_API_KEY": SENTINEL_KEY,
        "JOURNEY_BASE_URL": emulator.url,
    }


@pytest.mark.parametrize("images_per_task_run", [1, 3], ids=["per-image", "chunked"])
def test_a_terminal_shows_a_live_bar_beside_the_log_lines(
    emulator: EmulatorServer, tmp_path: Path, images_per_task_run: int
) -> None:
    """A campaign in a subprocess on a pseudo-terminal: the process imports Prefect and starts
    its own client before the first image."""
    emulator.admin("config", {"fixed": 0.4})
    # A name with format fields and rich markup in it: shown as it is, never interpreted.
    name = "posters {0} [/b]"
    command = [sys.executable, str(EXAMPLE), str(sheet(tmp_path, 6)), "--campaign", name]
    command += ["--destination", str(tmp_path / "out"), "--max-concurrency", "2"]
    command += ["--images-per-task-run", str(images_per_task_run)]
    text = plain(run_in_terminal(command, example_env(emulator)))
    # The bar is redrawn as items end (several states of it reach the terminal), and its
    # last state counts every item and the credits the emulator billed.
    assert text.count(f"campaign {name}") >= 3
    assert "6/6" in text and "stored 6 · cache hits 0 · failed 0 · left 0 · 24 credits" in text, (
        text[-1500:]
    )
    assert "Finished in state Completed" in text  # Prefect's log lines still reach it
    assert "credits_charged=24" in text  # the example's own last line
    assert SENTINEL_KEY not in text


def test_a_pipe_gets_the_log_lines_and_no_bar(emulator: EmulatorServer, tmp_path: Path) -> None:
    """A campaign in a subprocess writing into a pipe: the process imports Prefect and starts
    its own client before the first image."""
    command = [sys.executable, str(EXAMPLE), str(sheet(tmp_path, 3)), "--campaign", "posters"]
    command += ["--destination", str(tmp_path / "out")]
    # Colours forced, as CI logs often are: still not a terminal to draw a bar on.
    env = {**example_env(emulator), "FORCE_COLOR": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\x1b[?25l" not in done.stderr  # rich hides the cursor only to draw a live bar
    printed = plain(done.stdout + done.stderr)
    assert "Finished in state Completed" in printed
    assert "· cache hits" not in printed and "━" not in printed  # no bar, not even its end


def test_progress_counts_each_outcome_once_across_threads() -> None:
    progress = CampaignProgress(total=400)
    statuses = ["stored", "failed", "skipped", "stored"]
    outcomes = [
        ItemOutcome(row=row, prompt="p", status=statuses[row % 4], cached=row % 8 == 0)
        for row in range(1, 401)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(progress.finished, outcomes))
    assert (progress.done, progress.stored, progress.failed, progress.skipped) == (
        400,
        200,
        100,
        100,
    )
    assert progress.cache_hits == 50 and progress.share == 1.0
    assert CampaignProgress(total=0).share == 1.0
