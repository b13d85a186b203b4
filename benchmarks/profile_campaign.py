"""``make profile``: where a campaign's task runs spend their wall time.

Runs one ``batch_campaign`` of N images (default 100) against an emulator whose every
generation takes 2 s, under py-spy (all threads, idle ones included, every process), then
prints, for the task-run threads of the flow's process, how their time splits between the
phases of Prefect's task engine and our task functions. The raw profile stays in
``profile.txt`` (collapsed stacks, for flamegraph tools).

    make profile            # N=100
    PROFILE_N=200 make profile
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks.common import ROOT

# Frames that say where a task run's wall time goes; the first that a stack contains wins,
# so our task functions come first (they may call Prefect themselves).
PHASES = {
    "imagine (prefect_journey/tasks.py)": "ours: imagine (incl. the 2 s generation)",
    "store_and_publish (prefect_journey/campaigns/pipeline.py)": "ours: store and publish",
    "acquire_concurrency_slots_with_lease": "Prefect: tag concurrency slots (API)",
    "SyncTaskRunEngine.transaction_context": "Prefect: cache transaction (lock, result record)",
    "SyncTaskRunEngine.initialize_run": "Prefect: create the task run",
    "SyncTaskRunEngine.handle_success": "Prefect: persist the result",
}


def run_campaign(n: int) -> None:
    """The profiled process: one campaign, nothing else."""
    import time

    from prefect.testing.utilities import prefect_test_harness

    from benchmarks import orchestration
    from benchmarks.common import emulator_process

    with prefect_test_harness(), emulator_process("--fixed-latency", "2") as url:
        os.environ.update({"JOURNEY_API_KEY": orchestration.KEY, "JOURNEY_BASE_URL": url})
        started = time.perf_counter()
        orchestration.ours(n)
        print(f"batch_campaign N={n}: {time.perf_counter() - started:.1f} s", flush=True)


def breakdown(raw: Path) -> Counter[str]:
    """Samples per phase, over the flow process's task-run threads. That process is the
    profiled one: its stacks name no child process (the Prefect server and the emulator
    are its children). py-spy does not always read its command line, so that is not used."""
    phases: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)", ")", frame) for frame in stack.split(";")]
        processes = sum(bool(re.match(r"process \d+:", frame)) for frame in frames)
        if "run_task_sync" not in stack or processes != 1:
            continue
        phase = next(
            (name for marker, name in PHASES.items() for f in frames if marker in f), "other"
        )
        phases[phase] += int(count)
    return phases


def main() -> None:
    n = int(os.environ.get("PROFILE_N", "100"))
    raw = ROOT / "profile.txt"
    command = [sys.executable, "-m", "benchmarks.profile_campaign", "--run", str(n)]
    subprocess.run(
        [
            *("py-spy", "record", "--subprocesses", "--idle", "--nonblocking", "--rate", "20"),
            *("--format", "raw", "--output", str(raw), "--", *command),
        ],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"},
    )
    phases = breakdown(raw)
    total = sum(phases.values())
    if not total:
        sys.exit(f"no task-run samples in {raw.name}: py-spy did not sample the campaign")
    print("wall time of task-run threads, by phase:")
    for phase, samples in phases.most_common():
        print(f"  {100 * samples / total:5.1f} %  {phase}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        run_campaign(int(sys.argv[2]))
    else:
        main()
