"""A campaign under the provider's quota window: the calls it makes and its makespan.

The emulator admits at most Q generations per window of W = 60 s, the first window opening
at the first call; a call past the quota is answered 429 with ``Retry-After``: the seconds
until its window ends (docs/emulator.md). A campaign of N images at C calls in flight,
every generation taking L, ideally makes N calls, and its last window's calls start as that
window opens: a makespan of (ceil(N/Q) - 1) * W + L. Measured: the ``imagine`` calls the
emulator received (429s included), read from its ledger, and the makespan, RUNS runs
(the default grouping, a fresh Prefect server each).

The window is 60 s of wall time: the emulator scales generations only, not the waits it
asks for.
"""

from __future__ import annotations

import math
import os
from typing import Any

import httpx

from benchmarks import orchestration
from benchmarks.common import RUNS, Figure, emulator_process, median

N = 20
CONCURRENCY = 10
LATENCY = 1.0
QUOTA = 10  # generations per window
WINDOW = 60.0


def ideal_makespan() -> float:
    """The last window's calls start as it opens and take L."""
    return (math.ceil(N / QUOTA) - 1) * WINDOW + LATENCY


def measure() -> dict[str, Any]:
    """RUNS campaigns under the quota: each one's imagine calls, 429s and makespan."""
    from prefect.testing.utilities import prefect_test_harness

    runs = []
    with emulator_process("--fixed-latency", str(LATENCY)) as url:
        os.environ.update({"JOURNEY_API_KEY": orchestration.KEY, "JOURNEY_BASE_URL": url})
        for _ in range(RUNS):
            # A reset and a quota set anew: the campaign's first call opens the first window.
            httpx.post(f"{url}/_emulator/reset").raise_for_status()
            quota = {"calls": QUOTA, "window": WINDOW}
            httpx.post(f"{url}/_emulator/config", json={"quota": quota}).raise_for_status()
            with prefect_test_harness():
                makespan = orchestration.ours(N, None, CONCURRENCY)
            log = httpx.get(f"{url}/_emulator/ledger").json()["log"]
            calls = [call for call in log if call["endpoint"] == "imagine"]
            runs.append(
                {
                    "makespan": makespan,
                    "calls": len(calls),
                    "refused": sum(call["status"] == 429 for call in calls),
                }
            )
    return {
        "n": N,
        "concurrency": CONCURRENCY,
        "latency": LATENCY,
        "quota": QUOTA,
        "window": WINDOW,
        "ideal_makespan": ideal_makespan(),
        "runs": runs,
    }


def figures(quota: dict[str, Any]) -> list[Figure]:
    """The calls made and the makespan, each against the ideal."""
    runs = quota["runs"]
    shape = (
        f"N={quota['n']}, C={quota['concurrency']}, L={quota['latency']:g} s, quota "
        f"{quota['quota']} per {quota['window']:g} s"
    )
    note = f"median of {len(runs)}"
    return [
        Figure(
            f"under a quota ({shape}): imagine calls made, 429s included ({note})",
            median([run["calls"] for run in runs]),
            quota["n"],
            "calls",
            "one per image",
        ),
        Figure(
            f"under a quota ({shape}): makespan ({note})",
            median([run["makespan"] for run in runs]),
            quota["ideal_makespan"],
            "s",
            "(ceil(N/Q)-1)*W+L",
        ),
    ]


def report_table(quota: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's section on the campaign under a quota window: every run."""
    n, q, window = quota["n"], quota["quota"], quota["window"]
    return [
        "## Under a quota window",
        "",
        f"The emulator admits {q} generations per {window:g} s window (the first opens at the "
        "first call) and answers a call past it 429 with `Retry-After`: the seconds until the "
        f"window ends. A campaign of N={n} at C={quota['concurrency']}, every generation "
        f"{quota['latency']:g} s, the default grouping, a fresh Prefect server per run. Ideal: "
        f"{n} calls, and a makespan of {quota['ideal_makespan']:g} s (the last window's calls "
        "start as it opens). Calls are the `imagine` calls the emulator received (its ledger).",
        "",
        "| run | imagine calls | of them 429 (past the quota) | makespan |",
        "|---|---|---|---|",
        *(
            f"| {i} | {run['calls']} | {run['refused']} | {run['makespan']:.2f} s |"
            for i, run in enumerate(quota["runs"], 1)
        ),
        "",
    ]
