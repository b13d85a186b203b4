"""``make profile``: where a campaign's CPU time goes, in the flow, the Prefect server and the
emulator.

Runs one ``batch_campaign`` (by default capacity shape B: N=400 at C=100, every generation
4 s, the default grouping) under py-spy, every process and thread, and prints the CPU
seconds of each process (the flow's, the Prefect server's, the emulator's: on a small
machine they share the cores, so a second spent anywhere is a second the others wait for)
and how the flow's event loop, which runs every image, splits its time between the phases
of an image's life and Prefect's task engine. The raw profile stays in ``profile.txt``
(collapsed stacks, for flamegraph tools).

    make profile                                   # shape B, the default grouping
    PROFILE_N=100 PROFILE_C=25 PROFILE_L=20 make profile
    PROFILE_IMAGES_PER_TASK_RUN=1 make profile     # a task run per image

py-spy samples a thread while it runs or waits for the GIL, not while it waits for the
network or a lock: a process's samples are its CPU time, or near it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks.common import ROOT

# py-spy's sampling rate, samples per second.
RATE = 50
# The phases of the event loop's time: the first marker a stack contains (past the loop's
# own frames) names its phase, so an image's own steps come before the Prefect machinery
# they call; a stack with none is the loop's own work (sockets, timers, callbacks).
PHASES = {
    "AsyncJourneyClient._run": "ours: the paid call (httpx, its connection pool)",
    "astore_image (prefect_journey/storage": "ours: the download and the write",
    "Artifact.acreate": "ours: the image artifact (Prefect's client)",
    "emit_stored_event": "ours: the journey.image.stored event",
    "log_stored": "ours: log lines",
    "log_generation": "ours: log lines",
    "aupdate_progress_artifact": "ours: the progress artifact",
    "to_thread": "ours: handing cache records and locks to threads",
    "run_task_async": "Prefect: the task engine (task runs, states, tag slots)",
    "prefect_journey/": "ours: other",
}
LOOP = "asyncio: sockets, timers, callbacks"
# The processes of a profile, by what their command line contains.
PROCESSES = {"prefect.server": "the Prefect server", "emulator": "the emulator"}


def run_campaign(n: int, concurrency: int, latency: float, per_task_run: int | None) -> None:
    """The profiled process: one campaign, nothing else."""
    import time

    from prefect.testing.utilities import prefect_test_harness

    from benchmarks import orchestration
    from benchmarks.common import emulator_process

    with prefect_test_harness(), emulator_process("--fixed-latency", str(latency)) as url:
        os.environ.update({"JOURNEY_API_KEY": orchestration.KEY, "JOURNEY_BASE_URL": url})
        started = time.perf_counter()
        orchestration.ours(n, per_task_run, concurrency)
        took = time.perf_counter() - started
        print(f"batch_campaign N={n}, C={concurrency}: {took:.1f} s, {n / took:.1f} images/s")


def process_of(frames: list[str]) -> str:
    """Which process a stack comes from: the flow's (the profiled one, whose stacks name no
    child process), the Prefect server's or the emulator's."""
    processes = [frame for frame in frames if re.match(r"process \d+:", frame)]
    if len(processes) == 1:
        return "the flow"
    return next((name for marker, name in PROCESSES.items() if marker in processes[-1]), "other")


def breakdown(raw: Path) -> tuple[Counter[str], Counter[str]]:
    """Samples per process, and per phase of the flow's event loop (its main thread)."""
    processes: Counter[str] = Counter()
    loop: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        process = process_of(frames)
        processes[process] += int(count)
        if process == "the flow" and "MainThread" in stack and "run_items" in stack:
            step = stack.rpartition("BaseEventLoop._run_once")[2]  # what the loop runs
            loop[next((name for marker, name in PHASES.items() if marker in step), LOOP)] += int(
                count
            )
    return processes, loop


def main() -> None:
    n = int(os.environ.get("PROFILE_N", "400"))
    concurrency = int(os.environ.get("PROFILE_C", "100"))
    latency = float(os.environ.get("PROFILE_L", "4"))
    per_task_run = os.environ.get("PROFILE_IMAGES_PER_TASK_RUN", "")
    raw = ROOT / "profile.txt"
    command = [sys.executable, "-m", "benchmarks.profile_campaign", "--run"]
    command += [str(n), str(concurrency), str(latency), per_task_run]
    subprocess.run(
        [
            *("py-spy", "record", "--subprocesses", "--threads", "--nonblocking"),
            *("--rate", str(RATE), "--format", "raw", "--output", str(raw), "--", *command),
        ],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"},
    )
    processes, loop = breakdown(raw)
    if not loop:
        sys.exit(f"no samples of the campaign's event loop in {raw.name}")
    print("CPU seconds by process (start-up included):")
    for process, samples in processes.most_common():
        print(f"  {samples / RATE:6.1f} s  {process}")
    total = sum(loop.values())
    print(f"the flow's event loop: {total / RATE:.1f} s busy, by phase:")
    for phase, samples in loop.most_common():
        print(f"  {100 * samples / total:5.1f} %  {phase}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        n, concurrency, latency, per_task_run = sys.argv[2:6]
        size = int(per_task_run) if per_task_run else None
        run_campaign(int(n), int(concurrency), float(latency), size)
    else:
        main()
