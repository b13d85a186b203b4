"""make scale (tools/scale.py): the production shape on one machine, in its reduced size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.scale import Report, Tally
from tools.services import this_process

ROOT = Path(__file__).resolve().parent.parent


def test_the_line_names_every_failed_check_and_says_ok_only_when_none_failed() -> None:
    tally = Tally({"workers": 2})
    tally.check("overlap.paid_once", True, "10 generations billed for 10 images")
    assert tally.line() == "scale workers=2 checks_passed=1/1 failed=none ok=yes"
    tally.check("budget.never_past", False, "56 of 28")
    assert tally.line().endswith("checks_passed=1/2 failed=budget.never_past ok=NO")


def test_a_report_reads_its_counts_from_the_ledger_line() -> None:
    report = Report([], "items=7 stored=3 skipped=4 recovered=0 budget_left=0")
    assert report.count("skipped") == 4 and report.count("budget_left") == 0
    assert report.count("possibly_billed_not_repaid") is None


def test_the_shape_s_settings_reach_this_process_s_prefect_and_go_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefect read its settings when the suite imported it: the shape's server must reach
    this process's clients (run_deployment, Block.save) all the same, and nothing stays."""
    from prefect.settings import get_current_settings

    monkeypatch.setenv("JOURNEY_SCALE_GONE", "before")
    before = get_current_settings().api.url, os.environ.get("PREFECT_API_URL")
    api = "http://127.0.0.1:1/api"
    with this_process({"PREFECT_API_URL": api, "JOURNEY_SCALE_GONE": None, "JOURNEY_NEW": "x"}):
        assert get_current_settings().api.url == api
        assert os.environ["PREFECT_API_URL"] == api and os.environ["JOURNEY_NEW"] == "x"
        assert "JOURNEY_SCALE_GONE" not in os.environ
    assert (get_current_settings().api.url, os.environ.get("PREFECT_API_URL")) == before
    assert os.environ["JOURNEY_SCALE_GONE"] == "before" and "JOURNEY_NEW" not in os.environ


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_make_scale_keeps_every_guarantee_on_two_machines() -> None:
    """The whole shape for real: PostgreSQL, a Prefect server, Redis, moto S3, the emulator,
    the receiver and two workers, every scenario on tens of images. About three minutes
    alone, more beside the rest of the suite: a server migrating its database, a flow run
    process per run, generations of about 2 s."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    sizes = ["--shared", "4", "--own", "3", "--limit", "2", "--max-concurrency", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "tools.scale", *sizes, "--time-scale", "0.25"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    assert line.startswith("scale workers=2 ") and line.endswith("failed=none ok=yes")
    counts = dict(part.split("=", 1) for part in line.split()[1:])
    assert counts["overlap_generated"] == counts["overlap_images"] == "10"
    assert int(counts["peak_in_flight"]) <= 2
    assert counts["budget_charged"] == counts["budget_max_credits"] == "28"
    assert counts["kill_generated"] == counts["kill_objects"] == "7"
    assert counts["redis_generated"] == counts["redis_objects"] == "7"
