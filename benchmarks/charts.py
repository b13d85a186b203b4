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


def orchestration_panels(
    results: dict[str, Any],
) -> list[tuple[str, list[tuple[str, float]], float]]:
    """The chart's panels: a title, (bar label, makespan / the hand-written script's) per
    bar, and the target line (1.0 where none is set)."""
    from benchmarks.capacity import KIND_LABELS, SHAPES, default_label, medians
    from benchmarks.orchestration import CONCURRENCY, FIXED_GROUPINGS, LATENCY, grouping_label

    panels = []
    for n, r in results["orchestration"]["by_n"].items():
        bars = []
        for key, size in FIXED_GROUPINGS.items():
            bars.append((f"batch_campaign, {grouping_label(size)}", r[key] / r["handwritten"]))
            bars.append(("Prefect's floor of that shape", r[f"{key}_floor"] / r["handwritten"]))
        title = f"N={n}, C={CONCURRENCY}, L={LATENCY:g} s (asyncio + httpx script: {r['handwritten']:.1f} s)"
        panels.append((title, bars, 1.0))
    for shape in SHAPES:
        measured = results["capacity"][shape.name]
        m = medians(measured)
        labels = {**KIND_LABELS, "default": f"the default ({default_label(measured)})"}
        bars = [(labels[kind], m[kind] / m["handwritten"]) for kind in m if kind != "handwritten"]
        # A throughput target of x is a makespan of 1/x the script's.
        bound = float(shape.target.split()[1])
        target = 1 / bound if shape.throughput else bound
        title = f"capacity {shape.name}: {shape.label()} (asyncio + httpx script: {m['handwritten']:.1f} s)"
        panels.append((title, bars, target))
    return panels


def orchestration_chart(results: dict[str, Any], path: Path = ORCHESTRATION_CHART) -> Path:
    """A campaign's makespan as a ratio to the hand-written script's, at N=200 and at the
    shapes of the capacity figures: each grouping measured there, and Prefect's floor of its
    shape, all from the same run; the target of the default's figure dashed.

    Args:
        results: The saved results (``orchestration`` and ``capacity`` are drawn).
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    plt = _pyplot()

    panels = orchestration_panels(results)
    heights = [len(bars) + 1 for _, bars, _ in panels]
    figure, axes_list = plt.subplots(
        len(panels), 1, figsize=(8, 0.45 * sum(heights) + 1.2), dpi=110,
        gridspec_kw={"height_ratios": heights}, sharex=True,
    )  # fmt: skip
    for axes, (title, bars, target) in zip(axes_list, panels, strict=True):
        labels = [label for label, _ in bars]
        ratios = [ratio for _, ratio in bars]
        colours = ["C7" if "floor" in label else "C0" for label in labels]
        axes.barh(range(len(bars)), ratios, color=colours, height=0.6)
        for row, ratio in enumerate(ratios):
            axes.text(ratio, row, f" {ratio:.2f}", va="center", fontsize="small")
        axes.set_yticks(range(len(bars)), labels, fontsize="small")
        axes.invert_yaxis()
        axes.axvline(1.0, color="black", linewidth=0.8)
        if target != 1.0:
            axes.axvline(target, color="C3", linestyle="--", linewidth=1.2)
        axes.set_title(title, fontsize="medium")
        axes.grid(axis="x", alpha=0.3)
    right = max(ratio for _, bars, _ in panels for _, ratio in bars)
    axes_list[-1].set_xlim(0, 1.15 * right)
    axes_list[-1].set_xlabel(
        "makespan / the hand-written asyncio + httpx script's (lower is better)\n"
        "black line: the script; dashed red line: the target; grey bars: Prefect's floor"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the file: the same results draw the same bytes.
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return path


# The panels of the timeline chart: the grouping's key in results.json and its colour.
TIMELINE_PANELS = (("per_image", "C0"), ("grouped", "C1"))
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
    """One campaign's paid calls on a timeline, for each grouping: a bar per call, from
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
        axes.set_ylabel("concurrency slot (a bar: one paid call)")
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
