"""Start-up: the emulator's time to first answer, and the import cost of the package."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import RUNS, Figure, emulator_process, median

HEAVY = ("prefect.server.api", "distributed", "dask", "s3fs", "moto", "PIL")


def _import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _emulator_first_answer() -> float:
    started = time.perf_counter()
    with emulator_process():
        return time.perf_counter() - started


def _python_start() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def measure() -> dict[str, Any]:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, prefect_journey; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        "import_ours": median([_import_seconds("prefect_journey") for _ in range(RUNS)]),
        "import_prefect": median([_import_seconds("prefect") for _ in range(RUNS)]),
        "emulator": median([_emulator_first_answer() for _ in range(RUNS)]),
        "python": median([_python_start() for _ in range(RUNS)]),
        "heavy_loaded": json.loads(loaded.stdout.strip().splitlines()[-1]),
    }


def figures(results: dict[str, Any]) -> list[Figure]:
    return [
        Figure(
            "import prefect_journey (median of 3)",
            results["import_ours"],
            results["import_prefect"],
            "s",
            "import prefect",
        ),
        Figure(
            "prefect-journey emulator: start to first answer (median of 3)",
            results["emulator"],
            results["python"],
            "s",
            "bare python start",
        ),
    ]
