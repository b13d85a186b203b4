"""A campaign's timeline of calls: when each paid call ran, seen from the flow.

One campaign of N = TARGET_N images, in both groupings (a task run per image, and GROUPED
images per task run), run as benchmarks/orchestration.py runs them: against an emulator process whose every generation takes L, at concurrency C,
on a fresh Prefect server per mode. Each mode runs RUNS times; the run whose wall time is
the median is kept, so the timeline is that of a typical run, not of the first one.

Kept, in seconds since ``batch_campaign`` was called: each paid call's start (the emulator
received it) and end (its generation ended), read from the emulator's ledger; the flow
run's start and end as Prefect recorded them; every wait of Prefect's client before it
retried a request the server refused; and when the call to the flow returned. Around the
calls, these show where the time beyond the ideal goes: before the first call, after the
last one, stalls with no call in flight, and the gaps between waves of C calls.

``python -m benchmarks.timeline`` measures only this (a few minutes, against the hour of
``make bench``), puts it into benchmarks/results.json under ``timeline`` (the other keys
stay as they are) and renders the report and the charts again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx

from benchmarks.common import RUNS, commit, emulator_process, measured_since, median

# Each grouping measured, by its key in results.json (and in orchestration.GROUPINGS).
MODES = ("per_image", "grouped")
# The debug line of Prefect's client before it retries a refused request: the only place
# that says when it waits and for how long.
RETRY_LINE = re.compile(r"Another attempt will be made in ([0-9.]+)s")


def campaign(
    url: str, n: int, per_task_run: int | None, concurrency: int | None = None
) -> dict[str, Any]:
    """One ``batch_campaign`` of ``n`` new images against the emulator at ``url``, whose
    ledger it resets first, at ``concurrency`` (the benchmark's C by default); its times in
    seconds since the flow was called."""
    from prefect.client.orchestration import get_client

    from benchmarks.orchestration import CONCURRENCY, campaign_parameters
    from prefect_journey.flows.campaign import batch_campaign

    httpx.post(f"{url}/_emulator/reset").raise_for_status()
    with tempfile.TemporaryDirectory() as scratch, prefect_client_retries() as retries:
        parameters = campaign_parameters(
            n, scratch, images_per_task_run=per_task_run, concurrency=concurrency or CONCURRENCY
        )
        called = time.time()
        state = batch_campaign(**parameters, return_state=True)
        returned = time.time()
    if not state.is_completed():
        raise RuntimeError(f"the measured campaign ended {state.type.value}: {state.message}")
    flow_run_id = state.state_details.flow_run_id
    if flow_run_id is None:
        raise RuntimeError("the measured campaign's final state names no flow run")
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
    if flow_run.start_time is None or flow_run.end_time is None:
        raise RuntimeError("Prefect recorded no start or end for the measured flow run")
    log = httpx.get(f"{url}/_emulator/ledger").json()["log"]
    paid = sorted(
        (call["at"] - called, call["ended_at"] - called)
        for call in log
        if call["endpoint"] == "imagine" and call.get("credits")
    )
    if len(paid) != n:
        raise RuntimeError(f"{len(paid)} paid calls for {n} images")

    return {
        "flow_end": _rounded(returned - called),
        "flow_run_start": _rounded(flow_run.start_time.timestamp() - called),
        "flow_run_end": _rounded(flow_run.end_time.timestamp() - called),
        "calls": [[_rounded(start), _rounded(end)] for start, end in paid],
        "retries": [[_rounded(at - called), _rounded(wait)] for at, wait in retries],
    }


@contextlib.contextmanager
def prefect_client_retries() -> Iterator[list[tuple[float, float]]]:
    """While inside, every wait of Prefect's client before it retries a refused request, as
    (wall time, seconds), read from its debug line; its other lines show as before."""
    client = logging.getLogger("prefect.client")
    shown, level = client.getEffectiveLevel(), client.level
    waits: list[tuple[float, float]] = []

    def note(record: logging.LogRecord) -> bool:
        found = RETRY_LINE.search(record.getMessage())
        if found:
            waits.append((record.created, float(found.group(1))))
        return record.levelno >= shown

    client.addFilter(note)
    client.setLevel(logging.DEBUG)
    try:
        yield waits
    finally:
        client.removeFilter(note)
        client.setLevel(level)


def _rounded(seconds: float) -> float:
    """Rounded finer than anything the chart or the report shows, to keep the file short."""
    return round(seconds, 4)


def measure(n: int | None = None) -> dict[str, Any]:
    """Both modes' timelines of an ``n``-image campaign (TARGET_N by default), with when,
    where and at which commit they were measured."""
    from prefect.testing.utilities import prefect_test_harness

    from benchmarks.orchestration import CONCURRENCY, GROUPINGS, KEY, LATENCY, TARGET_N
    from benchmarks.run import machine

    n = n or TARGET_N
    started = datetime.now(UTC)
    modes: dict[str, Any] = {}
    with emulator_process("--fixed-latency", str(LATENCY)) as url:
        os.environ.update({"JOURNEY_API_KEY": KEY, "JOURNEY_BASE_URL": url})
        for mode in MODES:
            per_task_run = GROUPINGS[mode]
            with prefect_test_harness():
                runs = sorted(
                    (campaign(url, n, per_task_run) for _ in range(RUNS)),
                    key=lambda run: float(run["flow_end"]),
                )
            modes[mode] = {
                "images_per_task_run": per_task_run,
                "flow_ends": [run["flow_end"] for run in runs],
                **runs[len(runs) // 2],
            }
    return {
        "measured_at": measured_since(started),
        "machine": machine(),
        "commit": commit(),
        "n": n,
        "concurrency": CONCURRENCY,
        "latency": LATENCY,
        "ideal": math.ceil(n / CONCURRENCY) * LATENCY,
        "runs": RUNS,
        "modes": modes,
    }


def idle(calls: list[list[float]], flow_end: float) -> list[tuple[float, float]]:
    """The stretches from the flow's call to its return with no paid call in flight."""
    stretches, busy_until = [], 0.0
    for start, end in sorted(calls):
        if start > busy_until:
            stretches.append((busy_until, start))
        busy_until = max(busy_until, end)
    if flow_end > busy_until:
        stretches.append((busy_until, flow_end))
    return stretches


def covered(spans: list[list[float]]) -> float:
    """The time within at least one of ``spans`` (``[start, end]``, overlapping or not)."""
    total, busy_until = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, busy_until))
        busy_until = max(busy_until, end)
    return total


def moments(timeline: dict[str, Any], mode: str) -> dict[str, float]:
    """What the report says of ``mode``'s timeline, in seconds since the flow was called:
    ``flow_run_start``, ``first_call``, ``last_call_end``, ``flow_run_end``, ``flow_end``;
    ``stalled`` and ``longest_stall``: the time with no call in flight between the first
    call and the last one, in all and its longest stretch; ``slot_wait``: the median time
    from a call's end to the start of the call that takes its slot (the ideal has none);
    ``retries`` and ``retry_waits``: how often Prefect's client waited to retry a refused
    request, and the time with at least one such wait under way."""
    kept = timeline["modes"][mode]
    starts = sorted(start for start, _ in kept["calls"])
    ends = sorted(end for _, end in kept["calls"])
    concurrency = int(timeline["concurrency"])
    # With at most C calls in flight, the k-th call to start after the first C can start
    # only once k calls have ended: it takes the slot the k-th end freed.
    waits = [start - end for start, end in zip(starts[concurrency:], ends, strict=False)]
    stalls = [until - since for since, until in idle(kept["calls"], ends[-1]) if since > 0]
    return {
        "flow_run_start": float(kept["flow_run_start"]),
        "first_call": starts[0],
        "stalled": sum(stalls),
        "longest_stall": max(stalls, default=0.0),
        "slot_wait": median(waits) if waits else 0.0,
        "retries": len(kept["retries"]),
        "retry_waits": covered([[at, at + wait] for at, wait in kept["retries"]]),
        "last_call_end": ends[-1],
        "flow_run_end": float(kept["flow_run_end"]),
        "flow_end": float(kept["flow_end"]),
    }


def report_table(timeline: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's section on the timeline: its moments in both modes."""
    n, ideal = timeline["n"], timeline["ideal"]
    return [
        "## A campaign's timeline",
        "",
        f"One {n}-image campaign per mode, on a fresh Prefect server (the test harness's SQLite) "
        f"per mode; of {timeline['runs']} runs, the one of median wall time. Measured "
        f"{timeline['measured_at']} at {timeline['commit']} (`python -m benchmarks.timeline` "
        "measures it alone); seconds since `batch_campaign` was called, against an ideal of "
        f"{ideal:g} s. The Benchmarks page draws every call.",
        "",
        "| mode | Prefect starts the flow run | first paid call | no call in flight between "
        "the first and the last (longest) | a freed slot waits (median) | Prefect's client "
        "waits to retry a refused request (time waiting) | last paid call ends | "
        "Prefect ends the flow run | the flow returns | wall time of each run |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {mode_label(timeline, mode)} | {m['flow_run_start']:.2f} s | "
            f"{m['first_call']:.2f} s | {m['stalled']:.2f} s ({m['longest_stall']:.2f} s) | "
            f"{m['slot_wait']:.3f} s | {m['retries']:.0f} times, {m['retry_waits']:.2f} s | "
            f"{m['last_call_end']:.2f} s | {m['flow_run_end']:.2f} s | "
            f"{m['flow_end']:.2f} s ({m['flow_end'] / ideal:.3f} x) | "
            f"{', '.join(f'{t:.2f}' for t in timeline['modes'][mode]['flow_ends'])} s |"
            for mode in MODES
            for m in (moments(timeline, mode),)
        ),
        "",
    ]


def mode_label(timeline: dict[str, Any], mode: str) -> str:
    """How the report and the chart name ``mode``."""
    from benchmarks.orchestration import grouping_label

    return grouping_label(int(timeline["modes"][mode]["images_per_task_run"]))


def main(argv: list[str]) -> None:
    """Measure the timeline alone, merge it into the saved results, render them again."""
    from benchmarks import run

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    run.save_and_render("timeline", measure(int(argv[0]) if argv else None))


if __name__ == "__main__":
    main(sys.argv[1:])
