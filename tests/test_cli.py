"""The command line: a real generation, and secrets kept out of its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect_journey.emulator import EmulatorServer

from .conftest import SENTINEL_KEY, run_in_terminal


def run(emulator: EmulatorServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JOURNEY_API_KEY": SENTINEL_KEY, "JOURNEY_BASE_URL": emulator.url}
    return subprocess.run(
        [sys.executable, "-m", "prefect_journey.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_imagine_and_store_from_the_command_line(emulator: EmulatorServer, tmp_path: Path) -> None:
    done = run(
        emulator,
        "imagine",
        "--prompt",
        "a kite",
        "--aspect-ratio",
        "16:9",
        "--destination",
        str(tmp_path),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert output["result"]["credits_charged"] == 4
    assert output["stored"]["width"] == 1376 and Path(output["stored"]["uri"][7:]).exists()
    assert SENTINEL_KEY not in done.stdout + done.stderr


def test_the_command_line_waits_a_retry_after_as_given_and_gives_up_past_the_limit(
    emulator: EmulatorServer,
) -> None:
    """Two runs of the CLI: the paid generation of every path, with its Retry-After rule."""
    emulator.admin("faults", {"queue": {"api": ["429"]}, "retry_after": 0.3})
    done = run(emulator, "imagine", "--prompt", "after a short pause", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["attempts"] == 2
    emulator.admin("faults", {"queue": {"api": ["429"]}, "retry_after": 120})
    done = run(emulator, "imagine", "--prompt", "after a long pause")
    assert done.returncode == 1 and "wait 120 s" in done.stderr and "nothing billed" in done.stderr
    assert emulator.ledger()["calls"]["imagine"] == 3 and emulator.ledger()["credits_charged"] == 4


def test_a_lost_answer_is_paid_again_once_by_default_and_never_with_0(
    emulator: EmulatorServer,
) -> None:
    """Four runs of the CLI, each a subprocess that imports the package; a repay waits the
    generation ladder's first pause (2 s +/- 50 %)."""
    emulator.admin("faults", {"queue": {"api": ["500"]}})
    done = run(emulator, "imagine", "--prompt", "repaid once", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["possibly_billed_attempts"] == 1
    assert emulator.ledger()["calls"]["imagine"] == 2
    emulator.admin("faults", {"queue": {"api": ["500", "drop"]}})
    done = run(emulator, "imagine", "--prompt", "lost twice")
    assert done.returncode == 1 and "possibly billed" in done.stderr
    assert emulator.ledger()["calls"]["imagine"] == 4
    emulator.admin("faults", {"queue": {"api": ["500"]}})
    done = run(emulator, "imagine", "--prompt", "never twice", "--repay-possibly-billed", "0")
    assert done.returncode == 1 and emulator.ledger()["calls"]["imagine"] == 5


def test_cli_failures_never_print_the_key(emulator: EmulatorServer) -> None:
    """Five runs of the CLI, each a subprocess that imports the package."""
    for fault in ["500", "drop", "malformed", "failed"]:
        emulator.admin("faults", {"queue": {"api": [fault]}})
        done = run(emulator, "imagine", "--prompt", "p", "--repay-possibly-billed", "0")
        assert done.returncode == 1 and done.stderr.startswith("error: ")
        assert SENTINEL_KEY not in done.stdout + done.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "prefect_journey.cli", "imagine", "--prompt", "p"],
        env={
            **os.environ,
            "JOURNEY_API_KEY": "wrong-" + SENTINEL_KEY,
            "JOURNEY_BASE_URL": emulator.url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 1 and "AuthenticationError" in wrong.stderr
    assert SENTINEL_KEY not in wrong.stdout + wrong.stderr


def test_a_person_reads_a_summary_and_a_pipe_gets_no_progress(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    done = run(emulator, "imagine", "--prompt", "a kite", "--destination", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("image ready in ") and lines[0].endswith(", 4 credits")
    assert lines[1].startswith(f"stored at file://{tmp_path}") and "png, 1024x1024" in lines[1]
    assert done.stderr == ""  # not a terminal: no spinner


def test_a_terminal_sees_that_it_is_working(emulator: EmulatorServer) -> None:
    emulator.admin("config", {"fixed": 1.5})
    env = {**os.environ, "JOURNEY_API_KEY": SENTINEL_KEY, "JOURNEY_BASE_URL": emulator.url}
    command = [sys.executable, "-m", "prefect_journey.cli", "imagine", "--prompt", "a kite"]
    text = run_in_terminal(command, env, timeout=60)
    assert "generating…" in text and "0:00:01" in text  # the spinner and the time elapsed
    assert "image ready in" in text and SENTINEL_KEY not in text
