"""Start-up: the emulator's time to first answer, and what importing the package costs.

Each against what it is built on, measured the same way in the same run: the emulator
against a bare starlette app under uvicorn answering the same path; the plain-Python
core against importing httpx and pydantic; the Prefect layer against importing Prefect.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from benchmarks.common import RUNS, Figure, emulator_process, free_port, median, serving

HEAVY = ("prefect.server.api", "distributed", "dask", "s3fs", "moto", "PIL")
# What users import, and the modules each rests on.
CORE = "from prefect_journey import JourneyClient, ImagineRequest; import prefect_journey.storage"
CORE_BASELINE = "import httpx, pydantic"
PREFECT_LAYER = "import prefect_journey.tasks, prefect_journey.flows.campaign"
PREFECT_LAYER_BASELINE = "import prefect"
# The floor of any emulator on this stack: an app with one route, served the same way.
BARE_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def ledger(request):
    return JSONResponse({})

app = Starlette(routes=[Route("/_emulator/ledger", ledger)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _import_seconds(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _emulator_first_answer() -> float:
    started = time.perf_counter()
    with emulator_process():
        return time.perf_counter() - started


def _bare_server_first_answer() -> float:
    port = free_port()
    started = time.perf_counter()
    with serving(["-c", BARE_SERVER, str(port)], port):
        return time.perf_counter() - started


def _interleaved(*measurements: Callable[[], float]) -> list[float]:
    """The median of each measurement, taken in turns so that a slow moment of the
    machine falls on all of them alike."""
    runs: list[list[float]] = [[] for _ in measurements]
    for _ in range(RUNS):
        for samples, measure_once in zip(runs, measurements, strict=True):
            samples.append(measure_once())
    return [median(samples) for samples in runs]


def measure() -> dict[str, Any]:
    emulator, bare = _interleaved(_emulator_first_answer, _bare_server_first_answer)
    core, core_baseline, layer, layer_baseline = _interleaved(
        *(
            partial(_import_seconds, statement)
            for statement in (CORE, CORE_BASELINE, PREFECT_LAYER, PREFECT_LAYER_BASELINE)
        )
    )
    return {
        "emulator": emulator,
        "bare_server": bare,
        "import_core": core,
        "import_core_baseline": core_baseline,
        "import_layer": layer,
        "import_layer_baseline": layer_baseline,
        # only the modules the report asks about: the whole list is thousands of names
        "loaded": {
            statement: sorted(_modules_loaded_by(statement) & {*HEAVY, "prefect"})
            for statement in (CORE, PREFECT_LAYER)
        },
    }


def modules_note(results: dict[str, Any]) -> str:
    """Which heavy modules (and, for the core, whether Prefect) each import pulls in."""
    lines = []
    for statement, loaded in results["loaded"].items():
        heavy = [module for module in HEAVY if module in loaded]
        prefect = "prefect" in loaded  # any prefect.* module loads its package too
        lines.append(
            f"- `{statement}`: imports {', '.join(heavy) or 'none'} of {', '.join(HEAVY)}"
            + (
                ""
                if statement != CORE
                else f"; Prefect {'imported' if prefect else 'not imported'}"
            )
            + "."
        )
    return "\n".join(lines)


def figures(results: dict[str, Any]) -> list[Figure]:
    note = f"median of {RUNS}"
    return [
        Figure(
            f"plain-Python core: `{CORE}` ({note})",
            results["import_core"],
            results["import_core_baseline"],
            "s",
            f"`{CORE_BASELINE}`",
        ),
        Figure(
            f"Prefect layer: `{PREFECT_LAYER}` ({note})",
            results["import_layer"],
            results["import_layer_baseline"],
            "s",
            f"`{PREFECT_LAYER_BASELINE}`",
        ),
        Figure(
            f"prefect-journey emulator: start to first answer ({note})",
            results["emulator"],
            results["bare_server"],
            "s",
            "bare starlette app on uvicorn",
        ),
    ]
