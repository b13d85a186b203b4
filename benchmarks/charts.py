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
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

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
