"""The benchmark report is rendered from saved results: the docs cannot drift from them.

No timing here: these tests read the figures `make bench` saved, they measure nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import capacity, run, timeline
from benchmarks.charts import (
    ORCHESTRATION_CHART,
    TIMELINE_CHART,
    orchestration_chart,
    timeline_chart,
)
from benchmarks.common import ROOT, Figure


def test_benchmarks_md_and_the_docs_figure_table_are_what_the_saved_results_say() -> None:
    report, figures_page = (ROOT / "BENCHMARKS.md").read_text(), run.FIGURES_PAGE.read_text()
    assert run.FIGURES_PAGE == ROOT / "docs" / "benchmarks.md"
    assert run.rendered(run.load(run.RESULTS), report, figures_page) == (report, figures_page)


def test_rendering_keeps_the_analysis_and_the_rest_of_the_figures_page() -> None:
    results = run.load(run.RESULTS)
    report = f"old figures\n{run.ANALYSIS_MARKER}\nwritten by hand\n"
    page = f"# intro\n{run.README_FIGURES_START}\nold table\n{run.README_FIGURES_END}\n## after\n"
    new_report, new_page = run.rendered(results, report, page)
    assert "old figures" not in new_report
    assert new_report.endswith(f"{run.ANALYSIS_MARKER}\nwritten by hand\n")
    assert new_page.startswith("# intro\n") and new_page.endswith("\n## after\n")
    assert "old table" not in new_page
    assert f"at {results['commit']}" in new_page


def test_a_figure_is_met_or_missed_against_its_target() -> None:
    def status(value: float, target: str) -> str:
        return Figure("f", value, 1.0, "s", "baseline", target).status

    assert status(1.05, "<= 1.05") == "met"
    assert status(1.051, "<= 1.05") == "missed"
    assert status(0.9, ">= 0.9") == "met"
    assert status(0.899, ">= 0.9") == "missed"
    assert status(3.0, "") == ""


def test_the_chart_is_drawn_from_the_saved_results_and_shown_on_the_page(tmp_path: Path) -> None:
    chart = orchestration_chart(run.load(run.RESULTS), tmp_path / "c.png")
    assert chart.read_bytes().startswith(b"\x89PNG") and chart.stat().st_size > 10_000
    assert ORCHESTRATION_CHART.exists()
    assert f"(images/{ORCHESTRATION_CHART.name})" in run.FIGURES_PAGE.read_text()


def test_the_timeline_chart_is_drawn_from_the_saved_results_and_shown_on_the_page(
    tmp_path: Path,
) -> None:
    saved = run.load(run.RESULTS)["timeline"]
    chart = timeline_chart(saved, tmp_path / "t.png")
    again = timeline_chart(saved, tmp_path / "again.png")
    assert chart.read_bytes().startswith(b"\x89PNG") and chart.stat().st_size > 10_000
    assert chart.read_bytes() == again.read_bytes()  # no timestamp: same results, same bytes
    assert TIMELINE_CHART.exists()
    assert f"(images/{TIMELINE_CHART.name})" in run.FIGURES_PAGE.read_text()
    assert set(saved["modes"]) == set(timeline.MODES)
    for mode in saved["modes"].values():
        assert len(mode["calls"]) == saved["n"]


@pytest.mark.parametrize("key", ["timeline", "capacity"])
def test_measuring_one_part_alone_rewrites_only_its_key(key: str) -> None:
    saved = run.RESULTS.read_text()
    assert run.merged(saved, key, run.load(run.RESULTS)[key]) == saved
    changed = run.merged(saved, key, {"n": 1})
    assert f'"{key}": {{\n  "n": 1\n }}' in changed
    assert changed.split(f'"{key}"')[0] == saved.split(f'"{key}"')[0]


def test_the_capacity_figures_are_the_default_against_the_script_with_its_floor() -> None:
    def shape(n: int, script: float, default: float, floor: float) -> dict[str, object]:
        rounds = {"handwritten": [script], "default": [default], "floor": [floor]}
        return {"runs": 1, "default_images_per_task_run": 4, "rounds": rounds}

    a, b = capacity.SHAPES
    measured = {"A": shape(a.n, 80.0, 82.0, 84.0), "B": shape(b.n, 20.0, 24.0, 22.0)}
    b_rounds = measured["B"]["rounds"]
    assert isinstance(b_rounds, dict)
    b_rounds |= {grouping: [40.0] for grouping in b.groupings}
    on_a, on_b, *fixed = capacity.figures(measured)
    # A: makespans, lower is better; its floor against the same script
    assert (on_a.ratio, on_a.target, on_a.floor) == (82.0 / 80.0, "<= 1.03", 84.0)
    assert on_a.status == "met"
    # B: images/s, higher is better: the script's makespan over ours
    assert on_b.ratio == pytest.approx(20.0 / 24.0) and on_b.status == "met"
    assert on_b.floor == pytest.approx(b.n / 22.0) and "4 images per task run" in on_b.name
    assert [f.ratio for f in fixed] == [pytest.approx(0.5)] * len(b.groupings)


def test_a_timeline_s_idle_stretches_slots_and_waits() -> None:
    from benchmarks.charts import slots

    calls = [[1.0, 3.0], [1.5, 3.5], [3.2, 5.0], [6.0, 8.0]]
    assert timeline.idle(calls, 9.0) == [(0.0, 1.0), (5.0, 6.0), (8.0, 9.0)]
    assert slots(calls) == [0, 1, 0, 0]
    assert timeline.covered([[0.0, 2.0], [1.0, 3.0], [5.0, 6.0]]) == 4.0
    shape = {
        "per_image": {
            "calls": calls,
            "retries": [[0.5, 0.5]],
            "flow_run_start": 0.2,
            "flow_run_end": 8.5,
            "flow_end": 9.0,
            "images_per_task_run": 1,
        }
    }
    m = timeline.moments({"concurrency": 2, "modes": shape}, "per_image")
    assert (m["first_call"], m["last_call_end"], m["stalled"], m["longest_stall"]) == (
        1.0,
        8.0,
        1.0,
        1.0,
    )
    # the third call takes the slot the first end freed, the fourth the second's
    assert m["slot_wait"] == pytest.approx((0.2 + 2.5) / 2) and m["retries"] == 1
