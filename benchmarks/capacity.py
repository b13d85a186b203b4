"""Capacity of the default: what a user gets without choosing how images are grouped into
task runs, against the hand-written script making the same calls and writes.

At each shape the project sets a target for (:data:`SHAPES`), an emulator process of its
own takes exactly L per generation, and a round measures one after the other: the
hand-written script (benchmarks/orchestration.py), ``batch_campaign`` as the default runs
it (``images_per_task_run=None``: it chooses with
:func:`~prefect_journey.campaigns.executor.auto_images_per_task_run`), Prefect's floor of
the shape the default chooses (the same untagged task runs, artifacts and events, no work)
and, where the shape says so, the campaign with a task run per image and with
orchestration.GROUPED images per task run. RUNS rounds; each figure is the median of its
kind's rounds, the rounds interleaved so that a busy stretch of the machine falls on
every kind alike. Every Prefect run has a fresh Prefect server (the test harness's SQLite)
of its own.

``python -m benchmarks.capacity`` measures only this and renders the report again, like
``python -m benchmarks.timeline``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from benchmarks import orchestration
from benchmarks.common import RUNS, Figure, commit, emulator_process, measured_since, median


@dataclass(frozen=True)
class Shape:
    """A campaign shape and the target of the default's figure there.

    Attributes:
        name: The shape's key in results.json.
        n: Images.
        concurrency: Calls in flight (``max_concurrency``).
        latency: Seconds every generation takes.
        throughput: The figure is images/s (higher is better) instead of the makespan.
        target: The default's ratio to the hand-written script, as a :class:`Figure`'s.
        groupings: The fixed groupings measured beside the default
            (orchestration.FIXED_GROUPINGS keys).
    """

    name: str
    n: int
    concurrency: int
    latency: float
    throughput: bool
    target: str
    groupings: tuple[str, ...] = ()

    @property
    def ideal(self) -> float:
        """Back-to-back waves of ``concurrency`` calls: ceil(N/C) * L."""
        return math.ceil(self.n / self.concurrency) * self.latency

    def label(self) -> str:
        return f"N={self.n}, C={self.concurrency}, L={self.latency:g} s"


# A real latency at moderate concurrency, where the default keeps a task run per image and
# must cost next to nothing; and high demand on short generations, where Prefect's work per
# task run, not the API, would set the pace.
SHAPES = (
    Shape("A", 100, 25, 20.0, throughput=False, target="<= 1.03"),
    Shape("B", 400, 100, 4.0, throughput=True, target=">= 0.8", groupings=("per_image", "grouped")),
)


def on_a_fresh_server(run: Callable[..., float], *args: Any) -> float:
    """``run(*args)`` on a Prefect server and database of its own."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        return run(*args)


def measure_shape(shape: Shape) -> dict[str, Any]:
    """RUNS interleaved rounds of every kind at ``shape``; makespans in seconds."""
    import prefect_journey.flows.campaign  # noqa: F401 - imported before any run is timed
    from prefect_journey.campaigns.executor import auto_images_per_task_run

    size = auto_images_per_task_run(shape.n, shape.concurrency)
    c, n = shape.concurrency, shape.n
    prefect_kinds: dict[str, tuple[Callable[..., float], tuple[Any, ...]]] = {
        "default": (orchestration.ours, (n, None, c)),
        "floor": (orchestration.prefect_floor_of_our_shape, (n, size, c, shape.latency)),
        **{
            grouping: (orchestration.ours, (n, orchestration.FIXED_GROUPINGS[grouping], c))
            for grouping in shape.groupings
        },
    }
    rounds: dict[str, list[float]] = {"handwritten": [], **{kind: [] for kind in prefect_kinds}}
    with emulator_process("--fixed-latency", str(shape.latency)) as url:
        os.environ.update({"JOURNEY_API_KEY": orchestration.KEY, "JOURNEY_BASE_URL": url})
        for _ in range(RUNS):
            rounds["handwritten"].append(orchestration.handwritten(url, n, c))
            for kind, (run, args) in prefect_kinds.items():
                rounds[kind].append(on_a_fresh_server(run, *args))
    return {
        "n": n,
        "concurrency": c,
        "latency": shape.latency,
        "ideal": shape.ideal,
        "default_images_per_task_run": size,
        "runs": RUNS,
        "rounds": rounds,
    }


def measure() -> dict[str, Any]:
    """Every shape, with when, where and at which commit it was measured."""
    from benchmarks.run import machine

    started = datetime.now(UTC)
    shapes = {shape.name: measure_shape(shape) for shape in SHAPES}
    return {
        "measured_at": measured_since(started),
        "machine": machine(),
        "commit": commit(),
        **shapes,
    }


def medians(measured: dict[str, Any]) -> dict[str, float]:
    """Each kind's median makespan at one shape."""
    return {kind: median(times) for kind, times in measured["rounds"].items()}


def default_label(measured: dict[str, Any]) -> str:
    """What the default chose at one shape, as the report says it."""
    return orchestration.grouping_label(int(measured["default_images_per_task_run"]))


def figures(capacity: dict[str, Any]) -> list[Figure]:
    """The default against the hand-written script at every shape (with the target and
    Prefect's floor of the same shape), and the fixed groupings measured beside it."""
    rows = []
    for shape in SHAPES:
        measured = capacity[shape.name]
        m = medians(measured)
        note = f"median of {measured['runs']}"

        title = f"capacity {shape.name} ({shape.label()})"
        chosen = default_label(measured)
        rows.append(
            _figure(shape, f"{title}: the default ({chosen})", m, "default", note, shape.target)
        )
        for grouping in shape.groupings:
            size = orchestration.grouping_label(orchestration.FIXED_GROUPINGS[grouping])
            rows.append(_figure(shape, f"{title}: {size}", m, grouping, note))
    return rows


def _figure(
    shape: Shape, name: str, m: dict[str, float], kind: str, note: str, target: str = ""
) -> Figure:
    """``kind`` against the hand-written script at ``shape``, from its medians ``m``; the
    default's figure carries Prefect's floor of its shape."""
    floor = m["floor"] if kind == "default" else None
    if shape.throughput:  # images/s: the ratio reads "x the script's throughput"
        return Figure(
            f"{name} images/s vs hand-written ({note})",
            shape.n / m[kind],
            shape.n / m["handwritten"],
            "images/s",
            "asyncio+httpx",
            target,
            None if floor is None else shape.n / floor,
        )
    return Figure(
        f"{name} makespan vs hand-written ({note})",
        m[kind],
        m["handwritten"],
        "s",
        "asyncio+httpx",
        target,
        floor,
    )


def report_table(capacity: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's section on the capacity of the default: every kind's median and its
    rounds, at every shape."""
    lines = [
        "## Capacity of the default",
        "",
        f"Measured {capacity['measured_at']} at {capacity['commit']} (`python -m "
        "benchmarks.capacity` measures it alone). At each shape, rounds of: the hand-written "
        "script, `batch_campaign` with `images_per_task_run=None` (it chooses), Prefect's "
        "floor of the shape it chose (the same untagged task runs, image artifacts, events and "
        "log lines around sleeps, no work) and the fixed groupings; every Prefect run on a "
        "fresh server (the test harness's SQLite). Makespans (images/s):",
        "",
        "| shape | the default chooses | kind | makespan, median | images/s | vs hand-written "
        "| each round |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        measured = capacity[shape.name]
        m = medians(measured)
        for kind, times in measured["rounds"].items():
            if shape.throughput:
                ratio = f"{m['handwritten'] / m[kind]:.3f} x its images/s"
            else:
                ratio = f"{m[kind] / m['handwritten']:.3f} x its makespan"
            lines.append(
                f"| {shape.name}: {shape.label()} (ideal {shape.ideal:g} s) | "
                f"{default_label(measured)} | {KIND_LABELS.get(kind, kind)} | {m[kind]:.2f} s | "
                f"{shape.n / m[kind]:.1f} | {ratio} | "
                f"{', '.join(f'{t:.2f}' for t in times)} s |"
            )
    return [*lines, ""]


KIND_LABELS = {
    "handwritten": "hand-written script",
    "default": "batch_campaign, the default",
    "floor": "Prefect's floor of the default's shape",
    "per_image": "batch_campaign, a task run per image",
    "grouped": f"batch_campaign, {orchestration.GROUPED} images per task run",
}


def main(argv: list[str]) -> None:
    """Measure the capacity alone, merge it into the saved results, render them again."""
    from benchmarks import run

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    run.save_and_render("capacity", measure())


if __name__ == "__main__":
    main(sys.argv[1:])
