"""A quick re-check of the figures a code change can move, against the last full ``make bench``.

    python -m benchmarks.recheck            # N=200 orchestration rows (SQLite), transfers, memory

Measures, in this run, the N=200 rows of the orchestration table on the test harness's
SQLite server (the campaign in both groupings, the hand-written script, Prefect's floors)
and every transfer row, then prints each ratio beside the one saved in
``benchmarks/results.json``. Prefect's floors are measured again too: when they moved by as
much as ours, the machine moved, not the code. Nothing is written; the full run stays
``make bench``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from benchmarks.common import RUNS, emulator_process, median
from benchmarks.run import RESULTS, load


def measure() -> dict[str, Any]:
    """The N=200 orchestration rows (SQLite) and the transfer rows, measured now, with
    Prefect's logging as quiet as in ``make bench`` (set before Prefect is imported)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from benchmarks import orchestration, transfer

    n = orchestration.TARGET_N
    fresh = orchestration.median_on_a_fresh_server
    with emulator_process("--fixed-latency", str(orchestration.LATENCY)) as url:
        os.environ.update({"JOURNEY_API_KEY": orchestration.KEY, "JOURNEY_BASE_URL": url})
        row = {
            "ideal": math.ceil(n / orchestration.CONCURRENCY) * orchestration.LATENCY,
            "handwritten": median([orchestration.handwritten(url, n) for _ in range(RUNS)]),
        }
        for kind, (name, args) in orchestration.KINDS.items():
            row[kind] = fresh(RUNS, getattr(orchestration, name), n, *args)
    return {"orchestration": row, "transfer": transfer.measure()}


def ratios(orchestration_row: dict[str, float]) -> dict[str, float]:
    """The figures of one N=200 row as ratios to their baselines."""
    r = orchestration_row
    ratios = {"sleep tasks (Prefect floor) vs ideal": r["prefect_floor"] / r["ideal"]}
    for grouping in ("per_image", "grouped"):
        ratios |= {
            f"{grouping} vs ideal": r[grouping] / r["ideal"],
            f"{grouping} vs hand-written": r[grouping] / r["handwritten"],
            f"floor of {grouping} vs ideal": r[f"{grouping}_floor"] / r["ideal"],
            f"{grouping} vs its floor": r[grouping] / r[f"{grouping}_floor"],
        }
    return ratios


def main() -> None:
    saved = load(RESULTS)
    now = measure()
    from benchmarks import orchestration, transfer

    print(f"{'figure (N=200, SQLite)':<45} {'saved':>8} {'now':>8}")
    before = ratios(saved["orchestration"]["by_n"][orchestration.TARGET_N])
    for name, value in ratios(now["orchestration"]).items():
        print(f"{name:<45} {before[name]:>8.3f} {value:>8.3f}")
    saved_transfer = {f.name: f.ratio for f in transfer.figures(saved["transfer"])}
    for figure in transfer.figures(now["transfer"]):
        print(f"{figure.name:<45} {saved_transfer.get(figure.name, math.nan):>8.3f} "
              f"{figure.ratio:>8.3f}")  # fmt: skip
    # Memory: store_image's peak growth for the smallest and the largest object, in MiB.
    saved_memory = {v["destination"]: v for v in transfer.memory_growth(saved["transfer"])}
    for verdict in transfer.memory_growth(now["transfer"]):
        before = saved_memory[verdict["destination"]]["growth_mib"]
        small, large = verdict["growth_mib"]
        print(f"{'memory growth -> ' + verdict['destination'] + ' (small, large MiB)':<45} "
              f"{before[0]:>4.0f},{before[1]:<3.0f} {small:>4.0f},{large:<3.0f} "
              f"{'met' if verdict['met'] else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
