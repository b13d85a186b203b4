"""Portability: no module of the package needs ``fcntl``, and the budget file's lock is the
one the previous releases took, so their workers and these exclude each other.

CI runs on Linux only. Windows has no ``fcntl``; there filelock locks with ``LockFileEx``.
The stand-in here is a Linux process in which ``import fcntl`` fails for everything but
filelock (imported first, as its native lock exists on every platform): every module of
the package imports and a campaign runs in it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from prefect_journey.budget import BudgetExceededError, CreditBudget
from prefect_journey.emulator import EmulatorServer

from .conftest import process_env

ROOT = Path(__file__).resolve().parent.parent

# Every module of the package, then a campaign (flows/batch_campaign.py), with fcntl
# unimportable once filelock holds its native lock.
WITHOUT_FCNTL = """
import importlib, pkgutil, runpy, sys
import filelock
sys.modules["fcntl"] = None
import prefect_journey
for module in pkgutil.walk_packages(prefect_journey.__path__, "prefect_journey."):
    importlib.import_module(module.name)
print("imported", len([m for m in sys.modules if m.startswith("prefect_journey")]))
sys.argv = ["batch_campaign.py", *sys.argv[1:]]
runpy.run_path("flows/batch_campaign.py", run_name="__main__")
assert sys.modules["fcntl"] is None
"""


def test_every_module_imports_and_a_campaign_runs_without_fcntl(
    journey_env: EmulatorServer, prefect_harness: Path, tmp_path: Path
) -> None:
    """Stands in for Windows, which CI cannot run (see the module's docstring). One process
    imports Prefect and runs three images: about 15 s."""
    tag = uuid.uuid4().hex[:8]
    source = tmp_path / "campaign.jsonl"
    source.write_text("\n".join(json.dumps({"prompt": f"portable {i} #{tag}"}) for i in range(3)))
    out = tmp_path / "out"
    budgets = tmp_path / "budgets"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_FCNTL,
            str(source),
            "--campaign",
            tag,
            "--destination",
            str(out),
            "--max-credits",
            "40",
        ],
        env=process_env(prefect_harness, JOURNEY_BUDGET_DIR=str(budgets)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "stored=3" in done.stdout and "budget_left=28" in done.stdout
    assert len([p for p in out.rglob("*") if p.is_file()]) == 3
    budget = json.loads((budgets / f"{tag}.json").read_text())
    assert budget["spent"] == 12 and budget["calls"] == 3 and budget["reservations"] == {}


def test_a_budget_file_that_cannot_be_locked_is_a_clear_error(tmp_path: Path) -> None:
    """Where no native file lock exists (here: fcntl unimportable before filelock), the
    package still imports, and the budget refuses to start a call with a typed error that
    says what to do, leaving its file as it was."""
    path = tmp_path / "budget.json"
    CreditBudget.create(path, limit=8)
    before = path.read_text()
    program = (
        "import sys, warnings\n"
        'sys.modules["fcntl"] = None\n'
        'warnings.simplefilter("ignore")  # filelock: "only soft file lock is available"\n'
        "from prefect_journey.budget import CreditBudget\n"
        "from prefect_journey.errors import ConfigurationError\n"
        "try:\n"
        "    CreditBudget(sys.argv[1], limit=8).reserve()\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    message = done.stdout
    assert f"the budget file {path} cannot be locked" in message
    assert "JOURNEY_BUDGET_DIR" in message and "JOURNEY_REDIS_URL" in message
    assert path.read_text() == before


# A worker of an earlier release, which locked the budget file with fcntl.flock: it holds
# the lock, writes what it reads on stdin under it, and lets go.
EARLIER_RELEASE = """
import fcntl, sys
with open(sys.argv[1], "r+") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    print("held", flush=True)
    state = sys.stdin.read()
    handle.seek(0)
    handle.write(state)
    handle.truncate()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the earlier releases ran on POSIX only")
def test_the_budget_waits_for_a_worker_of_an_earlier_release(tmp_path: Path) -> None:
    """The reservation starts while the other process holds the file, and waits; that
    process then spends the whole budget and lets go. Had the reservation not waited, it
    would have reserved on the empty budget (and been overwritten): it is refused instead."""
    path = tmp_path / "budget.json"
    budget = CreditBudget.create(path, limit=8)
    full = {"spent": 8, "calls": 2, "possibly_billed": 0, "refused": 0, "reservations": {}}
    holder = subprocess.Popen(
        [sys.executable, "-c", EARLIER_RELEASE, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    outcome: list[str] = []

    def reserve() -> None:
        try:
            budget.reserve()
            outcome.append("reserved")
        except BudgetExceededError:
            outcome.append("refused")

    waiting = threading.Thread(target=reserve)
    waiting.start()
    waiting.join(timeout=0.5)  # time to reach the lock; it cannot pass it while held
    assert waiting.is_alive()
    holder.stdin.write(json.dumps(full))
    holder.stdin.close()
    waiting.join()
    assert holder.wait(timeout=60) == 0
    assert outcome == ["refused"]
    assert budget.snapshot() == {
        "spent": 8,
        "calls": 2,
        "possibly_billed": 0,
        "refused": 1,
        "in_flight": 0,
        "limit": 8,
        "left": 0,
    }
