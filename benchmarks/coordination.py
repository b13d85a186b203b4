"""What paying once across machines costs per image: the Redis round trip of an image's lock
and credits, against the one-machine lock files and budget file.

Per image a campaign takes the image's lock, reserves the call's credits, settles them and
releases the lock (campaigns/item.py, gate.py). Here those four steps run for N images, one
image after the other (what one image waits) and C at once on threads (as a campaign hands
them to threads: what the run can sustain), through the parts a campaign chooses
(``cache.image_lock_manager``, ``CreditBudget.for_campaign``): lock files and the budget's
JSON file under a folder of their own, or, with ``JOURNEY_REDIS_URL``, prefect-redis's lock
manager and the budget in Redis, on Debian's ``redis-server`` on loopback. RUNS rounds, the
two kinds interleaved; each figure is a median of its kind's rounds.

``python -m benchmarks.coordination`` measures only this and renders the report again.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import RUNS, Figure, commit, measured_since, median

N = 400
CONCURRENCY = 25
KINDS = ("files", "redis")
LABELS = {
    "files": "lock files and a budget file",
    "redis": "Redis (JOURNEY_REDIS_URL)",
}


def _one_image(key: str, budget: Any) -> None:
    """The coordination of one image's paid attempt, as a campaign does it."""
    from prefect_journey.cache import image_lock_manager, new_holder, release_if_held

    locks = image_lock_manager()
    holder = new_holder()
    if not locks.acquire_lock(key, holder, acquire_timeout=5):
        raise RuntimeError(f"the lock of {key} is held elsewhere")
    budget.settle(budget.reserve(lease=60), None)
    release_if_held(locks, key, holder)


def per_image_seconds(concurrency: int) -> float:
    """Seconds per image of N new images' coordination, ``concurrency`` at a time, through
    the parts the current settings choose."""
    from prefect_journey.budget import CreditBudget

    tag = uuid.uuid4().hex[:8]
    budget = CreditBudget.for_campaign(f"coordination-{tag}", limit=None)
    keys = [f"coordination-{tag}-{i}" for i in range(N)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for done in [pool.submit(_one_image, key, budget) for key in keys]:
            done.result()
    return (time.perf_counter() - started) / N


@contextmanager
def parts(kind: str, folder: Path, redis_url: str) -> Iterator[None]:
    """The settings of one kind: a Prefect home and budget folder of its own (files), or
    ``JOURNEY_REDIS_URL`` with a prefix of its own (redis)."""
    from tools.services import this_process

    home = folder / f"{kind}-{uuid.uuid4().hex[:8]}"
    env: dict[str, str | None] = {
        "PREFECT_HOME": str(home),
        "JOURNEY_BUDGET_DIR": str(home / "budgets"),
        "JOURNEY_REDIS_URL": None,
    }
    if kind == "redis":
        env |= {"JOURNEY_REDIS_URL": redis_url, "JOURNEY_REDIS_PREFIX": f"{home.name}:"}
    with this_process(env):
        yield


def measure() -> dict[str, Any]:
    """RUNS interleaved rounds of both kinds, one at a time and C at once."""
    from tools.services import redis_server, running

    started = datetime.now(UTC)
    rounds: dict[str, dict[str, list[float]]] = {
        kind: {"one_at_a_time": [], "at_once": []} for kind in KINDS
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "logs").mkdir()
        with running(redis_server(folder / "logs")) as redis:
            for _ in range(RUNS):
                for kind in KINDS:
                    with parts(kind, folder, redis.url):
                        rounds[kind]["one_at_a_time"].append(per_image_seconds(1))
                        rounds[kind]["at_once"].append(per_image_seconds(CONCURRENCY))
    return {
        "measured_at": measured_since(started),
        "commit": commit(),
        "n": N,
        "concurrency": CONCURRENCY,
        "runs": RUNS,
        "rounds": rounds,
    }


def figures(coordination: dict[str, Any]) -> list[Figure]:
    """Redis against the files, per image, one at a time and C at once."""
    rounds = coordination["rounds"]
    note = f"median of {coordination['runs']}"
    ways = {
        "one_at_a_time": "one image at a time",
        "at_once": f"{coordination['concurrency']} images at once",
    }
    return [
        Figure(
            f"an image's lock and credits (lock, reserve, settle, release), {label}, "
            f"{LABELS['redis']}: time per image ({note})",
            1000 * median(rounds["redis"][way]),
            1000 * median(rounds["files"][way]),
            "ms",
            LABELS["files"],
        )
        for way, label in ways.items()
    ]


def report_table(coordination: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's section on the coordination round trip: every round."""
    rounds = coordination["rounds"]
    return [
        "## An image's lock and credits: Redis and files",
        "",
        f"Measured {coordination['measured_at']} at {coordination['commit']} "
        "(`python -m benchmarks.coordination` measures it alone). "
        f"N={coordination['n']} images' lock, credit reservation, settlement and release "
        f"(campaigns/item.py, gate.py), one image at a time and {coordination['concurrency']} "
        "at once on threads, through lock files and a budget file, or Redis "
        "(`JOURNEY_REDIS_URL`, Debian's redis-server on loopback). Milliseconds per image, "
        "each round:",
        "",
        "| parts | one at a time | at once |",
        "|---|---|---|",
        *(
            f"| {LABELS[kind]} | "
            + ", ".join(f"{1000 * s:.2f}" for s in rounds[kind]["one_at_a_time"])
            + " | "
            + ", ".join(f"{1000 * s:.2f}" for s in rounds[kind]["at_once"])
            + " |"
            for kind in KINDS
        ),
        "",
    ]


def main(argv: list[str]) -> None:
    """Measure the coordination alone, merge it into the saved results, render them again."""
    from benchmarks import run

    run.save_and_render("coordination", measure())


if __name__ == "__main__":
    main(sys.argv[1:])
