"""The command line: a real generation, and secrets kept out of its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_journey.cli import main
from prefect_journey.emulator import EmulatorServer

from .conftest import (
    SENTINEL_KEY,
    SENTINEL_WEBHOOK_SECRET,
    free_port,
    process_env,
    run_in_terminal,
)


def run(
    emulator: EmulatorServer, *args: str, env: dict[str, str] | None = None, code: str = ""
) -> subprocess.CompletedProcess[str]:
    """``prefect-journey *args`` in a subprocess, against ``emulator``; ``code`` runs first
    (in the same interpreter) when given."""
    env = {**(env or os.environ), "JOURNEY_API_KEY": SENTINEL_KEY, "JOURNEY_BASE_URL": emulator.url}
    command = ["-m", "prefect_journey.cli", *args]
    if code:
        entry = "import sys; from prefect_journey.cli import main; sys.exit(main(sys.argv[1:]))"
        command = ["-c", f"{code}; {entry}", *args]
    return subprocess.run(
        [sys.executable, *command], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_everyday_commands(emulator: EmulatorServer, tmp_path: Path) -> None:
    """Runs of the CLI, each a subprocess that imports the package."""
    # A plain command answers without importing Prefect (a second of start-up).
    said = "import atexit, sys; atexit.register(lambda: print(*sorted(sys.modules)))"
    done = run(emulator, "account", code=said)
    assert " prefect " not in done.stdout and " prefect_journey.client " in done.stdout
    assert done.returncode == 0 and done.stdout.startswith("10000 credits (2500 images)")
    assert "plan: " in done.stdout and "images made: 0" in done.stdout
    made = json.loads(run(emulator, "imagine", "a kite", "--json").stdout)
    task_id = made["result"]["task_id"]
    fetched = json.loads(run(emulator, "fetch", task_id).stdout)
    assert fetched["status"] == "finished" and fetched["image_url"] == made["result"]["image_url"]
    # The paid image stored later by its task id, free: a second copy of the same bytes.
    done = run(emulator, "fetch", task_id, "--destination", str(tmp_path / "again"))
    assert done.returncode == 0 and done.stdout.startswith(f"stored at file://{tmp_path}/again")
    assert (tmp_path / "again" / f"{task_id}.png").read_bytes()[:4] == b"\x89PNG"
    assert emulator.ledger()["calls"]["imagine"] == 1


@pytest.mark.usefixtures("prefect_harness")
def test_a_dry_run_checks_and_prices_a_sheet_without_a_call(
    journey_env: EmulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command in this process (the subprocess runs are the other tests'), on the
    session's Prefect server."""
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("prompt,aspect_ratio\na red chair,1:1\na blue chair,16:9\na sofa,3:4\n")
    out = str(tmp_path / "out")
    dry = ["campaign", str(sheet), "--dry-run", "--destination", out, "--campaign", "chairs"]
    assert main([*dry, "--max-credits", "40"]) == 0
    printed = capsys.readouterr().out
    assert "3 items, every row valid" in printed and "to generate: 3, up to 12" in printed
    assert "40 of max_credits=40 left" in printed and "no call made" in printed
    assert main([*dry, "--max-credits", "8"]) == 1
    assert "above the 8 left of max_credits=8" in capsys.readouterr().err
    sheet.write_text("prompt,aspect_ratio\na red chair,1:1\na blue chair,5:4\n")
    assert main(dry) == 2 and "row 2: aspect_ratio" in capsys.readouterr().err
    assert journey_env.ledger()["calls_total"] == 0  # a dry run calls nothing
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_help_version_and_choices_say_what_to_type(emulator: EmulatorServer) -> None:
    top = run(emulator, "--help")
    assert top.returncode == 0 and "``" not in top.stdout
    for command in ("imagine", "account", "fetch", "campaign", "emulator", "webhooks"):
        assert command in top.stdout
    # Every parameter of the campaign flow is an option of the campaign command.
    campaign = run(emulator, "campaign", "--help").stdout
    for option in ("--max-credits", "--partial-budget", "--webhook-block", "--max-pause"):
        assert option in campaign
    assert run(emulator, "--version").stdout.startswith("prefect-journey 0.1.0")
    wrong = run(emulator, "imagine", "x", "--aspect-ratio", "5:4")
    assert wrong.returncode == 2 and "16:9" in wrong.stderr  # the choices are listed


def test_imagine_checks_the_destination_before_paying_and_names_a_paid_image(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Two runs of the CLI, each a subprocess that imports the package."""
    (tmp_path / "a-file").write_text("not a folder")
    done = run(emulator, "imagine", "x", "--destination", str(tmp_path / "a-file/x"))
    assert done.returncode == 1 and "is not reachable" in done.stderr
    assert emulator.ledger()["calls_total"] == 0  # refused before any call
    # A store that fails after the image was paid names the image, to get it back: here
    # another object holds the key (a failure no retry fixes).
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fixed.png").write_bytes(b"someone else's")
    done = run(
        emulator,
        "imagine",
        "paid",
        "--destination",
        str(tmp_path / "out"),
        "--key-template",
        "fixed.{ext}",
    )
    [task_id] = emulator.ledger()["billed_tasks"]
    assert done.returncode == 1 and f"prefect-journey fetch {task_id}" in done.stderr


@pytest.mark.usefixtures("prefect_harness")
def test_a_missing_extra_says_what_to_install(emulator: EmulatorServer, tmp_path: Path) -> None:
    """The receiver told to share its memory through Redis, without the ``redis`` extra."""
    env = process_env(tmp_path / "results", JOURNEY_REDIS_URL="redis://127.0.0.1:1/0")
    env["JOURNEY_WEBHOOK_SECRET"] = SENTINEL_WEBHOOK_SECRET
    done = run(
        emulator,
        "webhooks",
        "--port",
        str(free_port()),
        env=env,
        code="sys_modules = __import__('sys').modules; sys_modules['prefect_redis'] = None",
    )
    assert done.returncode == 2 and "pip install 'prefect-journey[redis]'" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.usefixtures("prefect_harness")
def test_a_sheet_run_through_a_pipe_prints_the_ledger_and_no_bar(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """The campaign flow from the command line, on the session's Prefect server."""
    sheet = tmp_path / "sheet.jsonl"
    sheet.write_text('{"prompt": "a red chair"}\n{"prompt": "a blue chair"}\n')
    env = process_env(tmp_path / "results")
    out = str(tmp_path / "out")
    done = run(
        emulator,
        "campaign",
        str(sheet),
        "--destination",
        out,
        "--images-per-task-run",
        "2",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("items=2 stored=2 failed=0")
    assert "images/min" not in done.stdout + done.stderr  # not a terminal: no bar
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2
    # Priced again, the sheet costs nothing: an earlier run stored both.
    done = run(emulator, "campaign", str(sheet), "--destination", out, "--dry-run", env=env)
    assert "stored by an earlier run: 2" in done.stdout and "up to 0 credits" in done.stdout


@pytest.mark.usefixtures("prefect_harness")
def test_a_sheet_run_in_a_terminal_shows_the_rate_the_time_left_and_the_credits(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """The command runs in a pseudo-terminal, as a person types it: a process that imports
    Prefect and runs six generations of 0.4 s, two at a time, long enough for the bar to
    show a rate and the time left."""
    emulator.admin("config", {"fixed": 0.4})
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("prompt\n" + "".join(f"poster {i}\n" for i in range(6)))
    env = {**process_env(tmp_path / "results"), "JOURNEY_API_KEY": SENTINEL_KEY}
    env["JOURNEY_BASE_URL"] = emulator.url
    command = [sys.executable, "-m", "prefect_journey.cli", "campaign", str(sheet)]
    options = ["--destination", str(tmp_path / "out"), "--max-credits", "40"]
    text = run_in_terminal([*command, *options, "--max-concurrency", "2"], env, timeout=120)
    assert "images/min" in text and "left" in text  # the rate and the time left
    assert "24 of max_credits 40 spent" in text  # the credits against the budget
    assert "items=6 stored=6" in text and SENTINEL_KEY not in text


def test_imagine_and_store_from_the_command_line(emulator: EmulatorServer, tmp_path: Path) -> None:
    done = run(
        emulator,
        "imagine",
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
    done = run(emulator, "imagine", "after a short pause", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["attempts"] == 2
    emulator.admin("faults", {"queue": {"api": ["429"]}, "retry_after": 120})
    done = run(emulator, "imagine", "after a long pause")
    assert done.returncode == 1 and "wait 120 s" in done.stderr and "nothing billed" in done.stderr
    assert emulator.ledger()["calls"]["imagine"] == 3 and emulator.ledger()["credits_charged"] == 4


def test_a_lost_answer_is_paid_again_once_by_default_and_never_with_0(
    journey_env: EmulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command in this process; a repay waits the generation ladder's first pause
    (2 s +/- 50 %)."""
    journey_env.admin("faults", {"queue": {"api": ["500"]}})
    assert main(["imagine", "repaid once", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["possibly_billed_attempts"] == 1
    assert journey_env.ledger()["calls"]["imagine"] == 2
    journey_env.admin("faults", {"queue": {"api": ["500", "drop"]}})
    assert main(["imagine", "lost twice"]) == 1
    assert "possibly billed" in capsys.readouterr().err
    assert journey_env.ledger()["calls"]["imagine"] == 4
    journey_env.admin("faults", {"queue": {"api": ["500"]}})
    assert main(["imagine", "never twice", "--repay-possibly-billed", "0"]) == 1
    assert journey_env.ledger()["calls"]["imagine"] == 5


def test_cli_failures_never_print_the_key(
    journey_env: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four failures in this process, and a wrong key in a subprocess that imports the
    package."""
    monkeypatch.setenv("JOURNEY_API_KEY", SENTINEL_KEY)
    for fault in ["500", "drop", "malformed", "failed"]:
        journey_env.admin("faults", {"queue": {"api": [fault]}})
        assert main(["imagine", "p", "--repay-possibly-billed", "0"]) == 1
        printed = capsys.readouterr()
        assert printed.err.startswith("error: ")
        assert SENTINEL_KEY not in printed.out + printed.err
    wrong = subprocess.run(
        [sys.executable, "-m", "prefect_journey.cli", "imagine", "p"],
        env={
            **os.environ,
            "JOURNEY_API_KEY": "wrong-" + SENTINEL_KEY,
            "JOURNEY_BASE_URL": journey_env.url,
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
    done = run(emulator, "imagine", "a kite", "--destination", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("image ready in ") and lines[0].endswith(", 4 credits")
    assert lines[1].startswith(f"stored at file://{tmp_path}") and "png, 1024x1024" in lines[1]
    assert done.stderr == ""  # not a terminal: no spinner


def test_a_terminal_sees_that_it_is_working(emulator: EmulatorServer) -> None:
    emulator.admin("config", {"fixed": 1.5})
    env = {**os.environ, "JOURNEY_API_KEY": SENTINEL_KEY, "JOURNEY_BASE_URL": emulator.url}
    command = [sys.executable, "-m", "prefect_journey.cli", "imagine", "a kite"]
    text = run_in_terminal(command, env, timeout=60)
    assert "generating…" in text and "0:00:01" in text  # the spinner and the time elapsed
    assert "image ready in" in text and SENTINEL_KEY not in text


def test_the_cli_reference_page_is_what_the_parser_says() -> None:
    from tools.cli_reference import PAGE, render

    assert PAGE.read_text() == render(), "run: python -m tools.cli_reference"
