"""The benchmark figures as PNG charts for the Benchmarks page, drawn from saved results.

``make bench`` (and ``python -m benchmarks.run --render``) writes them into docs/images/;
the page shows them below the figure table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

IMAGES = ROOT / "docs" / "images"
ORCHESTRATION_CHART = IMAGES / "bench-orchestration.png"
TIMELINE_CHART = IMAGES / "bench-timeline.png"
# Every series of the chart: its label, the key of its time in results.json, its style.
SERIES = (
    ("batch_campaign, a task run per image", "ours", "o-"),
    ("batch_campaign, 50 images per task run", "chunked", "s-"),
    ("hand-written Prefect flow", "handwritten", "^--"),
    ("Prefect's floor: a sleep task per image", "prefect_floor", "x:"),
)


def orchestration_chart(orchestrated: dict[str, Any], path: Path = ORCHESTRATION_CHART) -> Path:
    """A campaign's wall time as a ratio to the ideal (images x latency / concurrency), by
    campaign size: ours in both execution modes beside a hand-written flow and Prefect's own
    floor, all measured in the same run.

    Args:
        orchestrated: The ``orchestration`` part of the saved results.
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    plt = _pyplot()

    by_n = {int(n): r for n, r in orchestrated["by_n"].items()}
    sizes = sorted(by_n)
    figure, axes = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for label, key, style in SERIES:
        axes.plot(sizes, [by_n[n][key] / by_n[n]["ideal"] for n in sizes], style, label=label)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_xticks(sizes, [str(n) for n in sizes])
    axes.set_xlabel("images in the campaign")
    axes.set_ylabel("wall time / ideal")
    axes.set_title("Campaign wall time, as a ratio to the ideal (lower is better)")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the file: the same results draw the same bytes.
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return path


# The panels of the timeline chart: the mode's key in results.json and its colour (that of
# the same mode in the orchestration chart).
TIMELINE_PANELS = (("per_image", "C0"), ("chunked", "C1"))
# The strip above the slots where Prefect's client's retry waits are drawn.
RETRY_ROW = -1.0


def slots(calls: list[list[float]]) -> list[int]:
    """A row for each call, ``[start, end]`` in order of start: the first row free when it
    starts, so the rows are the concurrency slots and no two calls of a row overlap."""
    ends: list[float] = []
    rows = []
    for start, end in calls:
        row = next((i for i, busy_until in enumerate(ends) if busy_until <= start), len(ends))
        if row == len(ends):
            ends.append(end)
        ends[row] = end
        rows.append(row)
    return rows


def timeline_chart(timeline: dict[str, Any], path: Path = TIMELINE_CHART) -> Path:
    """One campaign's paid calls on a timeline, in both execution modes: a bar per call, from
    the emulator receiving it to its generation's end, on a row per concurrency slot; x is
    seconds since the flow was called. The ideal makespan, the flow run's start and end as
    Prefect recorded them, the moment the flow returned, the stretches with no call in flight
    and the waits of Prefect's client before it retried a refused request are marked.

    Args:
        timeline: The ``timeline`` part of the saved results.
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    plt = _pyplot()

    from benchmarks.timeline import idle, mode_label

    modes = timeline["modes"]
    ideal = float(timeline["ideal"])
    right = 1.04 * max(float(modes[key]["flow_end"]) for key, _ in TIMELINE_PANELS)
    figure, panels = plt.subplots(2, 1, figsize=(8, 7), dpi=110, sharex=True)
    for axes, (key, colour) in zip(panels, TIMELINE_PANELS, strict=True):
        mode = modes[key]
        title = mode_label(timeline, key)
        calls = mode["calls"]
        rows = slots(calls)
        for row in range(max(rows) + 1):
            bars = [
                (start, end - start)
                for (start, end), r in zip(calls, rows, strict=True)
                if r == row
            ]
            axes.broken_barh(
                bars, (row + 0.1, 0.8), facecolors=colour, edgecolor="white", linewidth=0.3
            )
        end = float(mode["flow_end"])
        axes.axvline(
            ideal,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"ideal makespan, {ideal:g} s",
        )
        axes.axvline(end, color="C3", linewidth=1.6, label="the flow returns")
        for moment in (mode["flow_run_start"], mode["flow_run_end"]):
            axes.axvline(float(moment), color="dimgrey", linestyle=":", linewidth=1.4)
        axes.plot(
            [], [], color="dimgrey", linestyle=":", label="Prefect: the flow run starts, ends"
        )
        for since, until in idle(calls, end):
            axes.axvspan(since, until, color="grey", alpha=0.15, linewidth=0)
        axes.fill_between([], [], color="grey", alpha=0.15, label="no paid call in flight")
        # Waits of different threads overlap: translucent, so a stack of them reads darker.
        axes.broken_barh(
            [(float(at), float(wait)) for at, wait in mode["retries"]],
            (RETRY_ROW - 0.4, 0.8),
            facecolors="C3",
            alpha=0.5,
            label="Prefect's client waits to retry a refused request",
        )
        axes.set_title(
            f"batch_campaign, {title}: returns at {end:.1f} s, {end / ideal:.2f} x the ideal",
            fontsize="medium",
        )
        axes.set_ylim(max(rows) + 1.2, RETRY_ROW - 0.7)
        axes.set_ylabel("concurrency slot")
        axes.set_yticks([RETRY_ROW], ["retries"], fontsize="small")
        axes.grid(axis="x", alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize="small", frameon=False)
    panels[-1].set_xlim(0, right)
    panels[-1].set_xlabel("seconds since the flow was called")
    figure.suptitle(
        f"A {timeline['n']}-image campaign's paid calls (L = {timeline['latency']:g} s, "
        f"C = {timeline['concurrency']})"
    )
    figure.tight_layout(rect=(0, 0.09, 1, 1))  # the bottom strip holds the legend
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the file: the same results draw the same bytes.
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return path


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
