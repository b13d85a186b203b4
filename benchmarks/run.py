"""``make bench``: run every benchmark and write BENCHMARKS.md and the figure table of
docs/benchmarks.md (figures as ratios)."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, RUNS, Figure, commit, measured_since, verdict

# BENCHMARKS.md from this line on is the analysis, written by hand: a run keeps it and
# rewrites only the figures above it.
ANALYSIS_MARKER = "<!-- analysis: written by hand, kept by make bench -->"
# What the last `make bench` measured, so the report can be rendered again without measuring.
RESULTS = ROOT / "benchmarks" / "results.json"
# What a run has measured so far, written after each module: a module that fails an hour in
# leaves the others' figures to read. Removed when the run completes.
PARTIAL = ROOT / "benchmarks" / "results.partial.json"
# The docs' figure table (FIGURES_PAGE) sits between these lines; a run rewrites it, so it
# cannot drift. (The names say README: the table lived there before the docs/ pages.)
README_FIGURES_START = "<!-- figures: written by make bench from benchmarks/results.json -->"
README_FIGURES_END = "<!-- /figures -->"
# The page that holds that table.
FIGURES_PAGE = ROOT / "docs" / "benchmarks.md"


def kept_analysis(text: str) -> list[str]:
    at = text.find(ANALYSIS_MARKER)
    return [text[at:].rstrip("\n")] if at >= 0 else []


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else "unknown CPU"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def reruns_by_database(orchestrated: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"SQLite": orchestrated["rerun"], "PostgreSQL": orchestrated["postgres_rerun"]}


def rerun_table(orchestrated: dict[str, Any]) -> list[str]:
    """The re-run figures of both flows on both databases."""
    from benchmarks.orchestration import TARGET_N

    return [
        "## Re-run cost",
        "",
        f"The same {TARGET_N}-image campaign run twice (medians of {RUNS} pairs), each flow and "
        "database on a fresh Prefect server:",
        "",
        "| flow | database | credits on the second run | second run | first run | ratio |",
        "|---|---|---|---|---|---|",
        *(
            f"| {kind} | {database} | **{r['second_run_credits']}** | {r['second']:.2f} s | "
            f"{r['first']:.2f} s | {r['second'] / r['first']:.3f} |"
            for database, reruns in reruns_by_database(orchestrated).items()
            for kind, r in reruns.items()
        ),
        "",
    ]


def readme_figures(results: dict[str, Any], rows: list[Figure]) -> list[str]:
    """The figure table of :data:`FIGURES_PAGE`: every figure with a target, met or missed,
    and the campaign under a quota window beside its ideal."""
    from benchmarks import quota, transfer

    return [
        README_FIGURES_START,
        "",
        f"From `make bench` at {results['commit']}, {results['measured_at']}, on "
        f"{results['machine']}. Each figure is a ratio to a baseline measured in the same run; "
        "[BENCHMARKS.md](benchmarks-report.md) has the values behind them, each round and "
        "Prefect's own floors. Prefect's database is the test harness's SQLite unless the "
        "figure says PostgreSQL.",
        "",
        "| figure | ratio | Prefect alone, same shape, no work | target |",
        "|---|---|---|---|",
        *(
            f"| {row.name} | {row.ratio:.3f} x {row.baseline_name} | "
            f"{'—' if row.floor is None else f'{row.floor / row.baseline:.3f} x'} | "
            f"{row.target}: **{row.status}** |"
            for row in rows
            if row.target
        ),
        *(
            f"| credits charged by that re-run, {kind}, {database} | "
            f"{r['second_run_credits']} | — | "
            f"0: **{verdict(r['second_run_credits'] == 0)}** |"
            for database, by_kind in reruns_by_database(results["orchestration"]).items()
            for kind, r in by_kind.items()
        ),
        *(
            f"| {row.name} | {row.ratio:.3f} x {row.baseline_name} | — | none set: "
            f"{row.value:g} {row.unit} against {row.baseline:g} |"
            for row in quota.figures(results["quota"])
        ),
        *(
            f"| peak memory growth, `store_image` to {m['destination']}, "
            f"{m['sizes_mib'][0]:.0f} / {m['sizes_mib'][1]:.0f} MiB object | "
            f"{m['growth_mib'][0]:.1f} / {m['growth_mib'][1]:.1f} MiB | — | constant in size "
            f"(within 3 x the {m['chunk_mib']:.0f} MiB chunk): "
            f"**{verdict(m['met'])}** |"
            for m in transfer.memory_growth(results["transfer"])
        ),
        "",
        "![Campaign makespan as a ratio to the hand-written script's, at N=200 (C=25, L=2 s) "
        "and at the two shapes of the capacity figures: batch_campaign by grouping and "
        "Prefect's floor of each shape](images/bench-orchestration.png)",
        "",
        *timeline_figure(results["timeline"]),
        README_FIGURES_END,
    ]


def timeline_figure(timeline: dict[str, Any]) -> list[str]:
    """The timeline chart on the figures page, with what its gaps are."""
    from benchmarks.timeline import MODES, moments

    n, ideal = timeline["n"], timeline["ideal"]
    per_image, grouped = (moments(timeline, mode) for mode in MODES)
    size = timeline["modes"]["grouped"]["images_per_task_run"]

    def both(say: Callable[[dict[str, float]], str]) -> str:
        return (
            f"{say(per_image)} with a task run per image, {say(grouped)} with {size} per task run"
        )

    return [
        f"![A {n}-image campaign's paid calls on a timeline, for each grouping, with the "
        "ideal makespan, the flow run's start and end, when the flow returns, and Prefect's "
        "client's retries](images/bench-timeline.png)",
        "",
        f"One {n}-image campaign per mode (of {timeline['runs']} runs, the one of median wall "
        f"time, measured {timeline['measured_at']} at {timeline['commit']}; every moment in "
        "[BENCHMARKS.md](benchmarks-report.md#a-campaigns-timeline)): a bar per paid call, "
        "from the emulator receiving it to its generation's end, on a row per concurrency "
        f"slot, against the ideal of back-to-back waves of {timeline['concurrency']} calls "
        f"ending at {ideal:g} s. The grey stretches have no call in flight: before the first "
        "call Prefect creates and starts the flow run, the campaign is planned and the first "
        "task runs start ("
        + both(lambda m: f"{m['first_call']:.1f} s")
        + "), after the last the last images are stored and published and Prefect ends the "
        "flow run ("
        + both(lambda m: f"{m['flow_end'] - m['last_call_end']:.1f} s")
        + "), and in between the calls stall while Prefect's client waits to retry a request "
        "the server (the test harness's SQLite) refused, in red ("
        + both(
            lambda m: (
                f"{m['retries']:.0f} wait{'s' if m['retries'] != 1 else ''} over "
                f"{m['retry_waits']:.1f} s"
                if m["retries"]
                else "none"
            )
        )
        + "); within the waves each freed slot waits for its next call (median "
        + both(lambda m: f"{m['slot_wait']:.2f} s")
        + "), so the waves drift apart.",
        "",
    ]


def with_readme_figures(page: str, lines: list[str]) -> str:
    """``page`` with ``lines`` in place of its figure table (markers included)."""
    start, end = page.index(README_FIGURES_START), page.index(README_FIGURES_END)
    return page[:start] + "\n".join(lines) + page[end + len(README_FIGURES_END) :]


def measure() -> dict[str, Any]:
    """Every benchmark, with when, where and at which commit it ran."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from benchmarks import (
        capacity,
        coordination,
        orchestration,
        quota,
        server_load,
        startup,
        timeline,
        transfer,
    )

    sizes = tuple(int(n) for n in os.environ.get("BENCH_SIZES", "200").split(","))
    started = datetime.now(UTC)
    steps: dict[str, Callable[[], Any]] = {
        "startup": startup.measure,
        "transfer": transfer.measure,
        # on fresh Prefect servers, one per figure
        "orchestration": lambda: orchestration.measure(sizes),
        # with its own time and commit: `python -m benchmarks.timeline` measures it alone
        "timeline": timeline.measure,
        # the same: `python -m benchmarks.capacity`
        "capacity": capacity.measure,
        "quota": quota.measure,
        # the same: `python -m benchmarks.coordination`
        "coordination": coordination.measure,
        # the same: `python -m benchmarks.server_load`
        "server_load": server_load.measure,
    }
    results: dict[str, Any] = {"machine": machine(), "commit": commit()}
    for key, step in steps.items():
        results[key] = step()
        # default=sorted: the modules an import loaded are a set
        PARTIAL.write_text(json.dumps(results, indent=1, default=sorted) + "\n")
    PARTIAL.unlink()
    return {"measured_at": measured_since(started), **results}


def merged(saved: str, key: str, measured: dict[str, Any]) -> str:
    """The saved results (the text of benchmarks/results.json) with ``measured`` in place of
    their ``key``; every other key is written back as it was."""
    # Parsed as saved (batch sizes stay JSON keys), not through load.
    results = json.loads(saved)
    results[key] = measured
    return json.dumps(results, indent=1) + "\n"


def load(path: Path) -> dict[str, Any]:
    """Saved results, with the batch sizes (JSON object keys) as numbers again."""
    results: dict[str, Any] = json.loads(path.read_text())
    by_n = results["orchestration"]["by_n"]
    results["orchestration"]["by_n"] = {int(n): r for n, r in by_n.items()}
    return results


def rendered(results: dict[str, Any], report: str, figures_page: str) -> tuple[str, str]:
    """BENCHMARKS.md and the figures page, docs/benchmarks.md (given as they are), with the
    figures of ``results``; the hand-written analysis below the report's marker and the rest
    of the figures page stay."""
    from benchmarks import (
        capacity,
        coordination,
        orchestration,
        quota,
        server_load,
        startup,
        timeline,
        transfer,
    )

    start, moved, orchestrated = (
        results["startup"],
        results["transfer"],
        results["orchestration"],
    )
    rows = (
        capacity.figures(results["capacity"])
        + quota.figures(results["quota"])
        + coordination.figures(results["coordination"])
        + server_load.figures(results["server_load"])
        + orchestration.figures(orchestrated)
        + transfer.figures(moved)
        + startup.figures(start)
    )
    lines = [
        "# Benchmarks",
        "",
        f"Measured {results['measured_at']} on {results['machine']}, commit {results['commit']}, by `make bench`.",
        f"Every figure is a median of {RUNS} runs (transfers: {transfer.TRANSFER_RUNS}, interleaved with their",
        "baseline) and is given as a ratio to a baseline measured in the same run.",
        f"Emulator latency fixed at L = {orchestration.LATENCY:g} s, concurrency C = "
        f"{orchestration.CONCURRENCY}, unless a figure names its shape.",
        "",
        "| figure | ours | baseline | ratio | target |",
        "|---|---|---|---|---|",
        *(row.row() for row in rows),
        "",
        "## Orchestration overhead by batch size",
        "",
        f"C = {orchestration.CONCURRENCY}, L = {orchestration.LATENCY:g} s; a task run per image is "
        "what the default chooses at this concurrency. Prefect's floor of a shape: the same "
        "untagged task runs, with a persisted result each, image artifacts, events and log lines "
        "around sleeps of L, no work.",
        "",
        "| N | ideal | hand-written | Prefect floor (sleep tasks) | grouping | batch_campaign | "
        "Prefect floor of its shape | overhead per image vs hand-written | of it ours (vs the "
        "floor of its shape) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {n} | {r['ideal']:.1f} s | {r['handwritten']:.2f} s | {r['prefect_floor']:.2f} s | "
            f"{orchestration.grouping_label(size)} | {r[key]:.2f} s | {r[f'{key}_floor']:.2f} s | "
            f"{r[f'{key}_ms_per_image']:.0f} ms | {r[f'{key}_over_floor_ms_per_image']:.0f} ms |"
            for n, r in orchestrated["by_n"].items()
            for key, size in orchestration.FIXED_GROUPINGS.items()
        ),
        "",
        *capacity.report_table(results["capacity"]),
        *quota.report_table(results["quota"]),
        *coordination.report_table(results["coordination"]),
        *server_load.report_table(results["server_load"]),
        *timeline.report_table(results["timeline"]),
        *rerun_table(orchestrated),
        "## Transfer memory",
        "",
        "Peak RSS growth of the transferring process during one transfer (the kernel's high-water mark,",
        "reset as the transfer starts; download chunk 1 MiB, S3 part 5 MiB):",
        "",
        transfer.memory_table(moved),
        "",
        *(
            f"Constant in size to {m['destination']}: {m['growth_mib'][0]:.1f} MiB for "
            f"{m['sizes_mib'][0]:.0f} MiB, {m['growth_mib'][1]:.1f} MiB for "
            f"{m['sizes_mib'][1]:.0f} MiB, within 3 x the {m['chunk_mib']:.0f} MiB chunk: "
            f"**{verdict(m['met'])}**."
            for m in transfer.memory_growth(moved)
        ),
        "",
        "## Start-up",
        "",
        startup.modules_note(start),
        "",
    ]
    return (
        "\n".join(lines + kept_analysis(report)) + "\n",
        with_readme_figures(figures_page, readme_figures(results, rows)),
    )


def render(results: dict[str, Any]) -> None:
    from benchmarks.charts import orchestration_chart, timeline_chart

    orchestration_chart(results)
    timeline_chart(results["timeline"])
    report = ROOT / "BENCHMARKS.md"
    new_report, new_figures_page = rendered(
        results, report.read_text() if report.exists() else "", FIGURES_PAGE.read_text()
    )
    print(new_report)
    report.write_text(new_report)
    FIGURES_PAGE.write_text(new_figures_page)


def save_and_render(key: str, measured: dict[str, Any]) -> None:
    """``measured`` in place of the saved results' ``key`` (a module measured alone, as
    ``python -m benchmarks.capacity``), then every figure rendered again."""
    RESULTS.write_text(merged(RESULTS.read_text(), key, measured))
    render(load(RESULTS))


def main(argv: list[str]) -> None:
    """Measure, save the raw results, then render them; ``--render`` renders the saved ones
    again (after a change to the report, without the hour of measuring)."""
    if "--render" not in argv:
        # default=sorted: the modules an import loaded are a set
        RESULTS.write_text(json.dumps(measure(), indent=1, default=sorted) + "\n")
    render(load(RESULTS))


if __name__ == "__main__":
    main(sys.argv[1:])
