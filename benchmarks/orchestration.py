"""Orchestration efficiency and re-run cost of ``batch_campaign``.

Against an emulator process whose every generation takes exactly L = 2 s, N images at
concurrency C = 25 are measured in the same run:

- ``batch_campaign`` with a task run per image (``images_per_task_run=1``, what the
  default chooses at this concurrency) and with :data:`GROUPED` images per task run, a
  local folder destination;
- the hand-written baseline a user would write: asyncio + httpx, a semaphore of C, the same
  calls and the same local writes;
- Prefect's own floor: a flow of N untagged tasks that only sleep L, at C workers;
- the floor of our shape, for each grouping: what ``batch_campaign`` asks of Prefect with
  none of our work: untagged task runs of the same size on the flow's event loop, each with a
  persisted result, and per image a sleep of L under the run's C slots, an image artifact,
  an event and two log lines. ``batch_campaign`` minus this is what our own code costs;
- an empty flow run: what Prefect costs once per run of a sync flow, whatever it does
  (it joins the run's heartbeat thread at its end, and that thread sleeps in 1 s steps);
- the re-run of a finished campaign, with both flows, on the test harness's SQLite and on a
  Prefect server backed by PostgreSQL (benchmarks/postgres.py).

The ideal makespan is ceil(N/C) * L. benchmarks/capacity.py measures the default against
the hand-written script at the two shapes the project sets targets for; benchmarks/quota.py
a campaign under the provider's quota window.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prefect.testing.utilities import prefect_test_harness

from benchmarks.common import RUNS, Figure, call_in_subprocess, emulator_process, median
from benchmarks.postgres import postgres_server, prefect_on_postgres

LATENCY = 2.0
CONCURRENCY = 25
KEY = "bench-key"
# The batch size the project set its first targets at, and of the re-runs.
TARGET_N = 200
# Images per task run of the grouped figures: one fixed size to compare with, whatever the
# default chooses (a 1,000-image campaign in 20 task runs).
GROUPED = 50
# Each grouping measured, by its key in results.json: its images_per_task_run (None: the
# campaign chooses, as a user who does not choose gets).
FIXED_GROUPINGS: dict[str, int] = {"per_image": 1, "grouped": GROUPED}
GROUPINGS: dict[str, int | None] = {**FIXED_GROUPINGS, "default": None}


def grouping_label(images_per_task_run: int) -> str:
    """How the report and the charts name a grouping."""
    if images_per_task_run == 1:
        return "a task run per image"
    return f"{images_per_task_run} images per task run"


def _prompts(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]  # never a cache hit across runs
    return [f"bench image {i} #{tag}" for i in range(n)]


async def _handwritten(url: str, prompts: list[str], folder: Path, concurrency: int) -> None:
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with (
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": KEY}, timeout=120, limits=limits
        ) as api,
        httpx.AsyncClient(timeout=60, limits=limits) as cdn,
    ):

        async def one(index: int, prompt: str) -> None:
            async with limit:
                answer = await api.post(
                    "/api/v1/imagine",
                    json={"model": "nano-banana-2", "prompt": prompt, "aspect_ratio": "1:1"},
                )
                async with cdn.stream("GET", answer.json()["image_url"]) as image:
                    with open(folder / f"{index}.png", "wb") as out:
                        async for chunk in image.aiter_bytes(1024 * 1024):
                            out.write(chunk)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def handwritten(url: str, n: int, concurrency: int = CONCURRENCY) -> float:
    """The hand-written script's makespan for ``n`` new images at ``concurrency``."""
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        asyncio.run(_handwritten(url, _prompts(n), Path(folder), concurrency))
        return time.perf_counter() - started


def campaign_parameters(
    n: int,
    destination: str,
    prompts: list[str] | None = None,
    images_per_task_run: int | None = 1,
    concurrency: int = CONCURRENCY,
) -> dict[str, Any]:
    """The parameters of every benchmarked campaign: ``n`` new prompts (or ``prompts``) at
    ``concurrency``, with no Prefect concurrency limit, stored under ``destination``."""
    return {
        "items": [{"prompt": p} for p in prompts or _prompts(n)],
        "destination": destination,
        "max_concurrency": concurrency,
        "concurrency_limit": None,
        "images_per_task_run": images_per_task_run,
    }


def ours(
    n: int,
    images_per_task_run: int | None = 1,
    concurrency: int = CONCURRENCY,
    *,
    folder: str | None = None,
    prompts: list[str] | None = None,
    asynchronous: bool = False,
) -> float:
    """One campaign's makespan; ``asynchronous``: run it as ``abatch_campaign``."""
    from prefect_journey.flows.campaign import abatch_campaign, batch_campaign

    with tempfile.TemporaryDirectory() as scratch:
        parameters = campaign_parameters(
            n, folder or scratch, prompts, images_per_task_run, concurrency
        )
        started = time.perf_counter()
        if asynchronous:
            asyncio.run(abatch_campaign(**parameters))
        else:
            batch_campaign(**parameters)
        return time.perf_counter() - started


def prefect_floor(n: int) -> float:
    from prefect import flow, task
    from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

    @task
    def sleep() -> None:
        time.sleep(LATENCY)

    runner: TaskRunner[Any] = ThreadPoolTaskRunner(max_workers=CONCURRENCY)

    @flow(task_runner=runner)
    def sleeps() -> None:
        for future in [sleep.submit() for _ in range(n)]:
            future.wait()

    started = time.perf_counter()
    sleeps()
    return time.perf_counter() - started


def prefect_floor_of_our_shape(
    n: int,
    images_per_task_run: int = 1,
    concurrency: int = CONCURRENCY,
    latency: float = LATENCY,
) -> float:
    """What a campaign asks of Prefect, grouped as ``images_per_task_run`` groups it, with
    none of our work: untagged task runs of that many images on the flow's event loop, each
    with a persisted result, as many under way at once as the campaign keeps; in each, per
    image, a sleep of ``latency`` under the run's ``concurrency`` slots, then an image
    artifact, an event and two log lines (the generation's and the store's)."""
    from prefect import flow, get_run_logger, task
    from prefect.artifacts import ImageArtifact
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import PrefectClient, get_client
    from prefect.events import emit_event

    # Nothing to hash (as the campaign's own task runs), but a result written per run.
    @task(cache_policy=NO_CACHE, persist_result=True)
    async def images(
        indices: list[int], slots: asyncio.Semaphore, prefect: PrefectClient
    ) -> list[int]:
        logger = get_run_logger()

        async def one(index: int) -> None:
            async with slots:
                await asyncio.sleep(latency)
            logger.info("generated %d", index)
            await ImageArtifact(image_url=f"https://cdn.example.com/{index}.png").acreate(prefect)
            emit_event("bench.image.stored", resource={"prefect.resource.id": f"bench.{index}"})
            logger.info("stored %d", index)

        await asyncio.gather(*(one(i) for i in indices))
        return indices

    async def groups() -> None:
        size = images_per_task_run
        slots = asyncio.Semaphore(concurrency)
        # As many task runs under way as the campaign keeps (campaigns/executor.py).
        under_way = asyncio.Semaphore(math.ceil(2 * concurrency / size) + 1)

        async def group(indices: list[int], prefect: PrefectClient) -> None:
            async with under_way:
                await images(indices, slots, prefect)

        async with get_client() as prefect:
            await asyncio.gather(
                *(group(list(range(k, min(n, k + size))), prefect) for k in range(0, n, size))
            )

    @flow
    def shape() -> None:
        asyncio.run(groups())

    started = time.perf_counter()
    shape()
    return time.perf_counter() - started


def empty_flow_run() -> float:
    from prefect import flow

    @flow
    def empty() -> None:
        pass

    started = time.perf_counter()
    empty()
    return time.perf_counter() - started


# What each batch size measures on the test harness's SQLite server, by its key in
# results.json: this module's function and its arguments after N.
KINDS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "per_image": ("ours", (FIXED_GROUPINGS["per_image"],)),
    "grouped": ("ours", (FIXED_GROUPINGS["grouped"],)),
    "prefect_floor": ("prefect_floor", ()),
    "per_image_floor": ("prefect_floor_of_our_shape", (1,)),
    "grouped_floor": ("prefect_floor_of_our_shape", (GROUPED,)),
}


def measure(sizes: tuple[int, ...] = (TARGET_N,)) -> dict[str, Any]:
    """Makespans by N (medians of RUNS at every N), with ratios to the ideal and the
    hand-written script."""
    import os

    results: dict[str, Any] = {"by_n": {}}
    with emulator_process("--fixed-latency", str(LATENCY)) as url:
        os.environ.update({"JOURNEY_API_KEY": KEY, "JOURNEY_BASE_URL": url})
        for n in sizes:
            row: dict[str, Any] = {
                "runs": RUNS,
                "ideal": math.ceil(n / CONCURRENCY) * LATENCY,
                "handwritten": median([handwritten(url, n) for _ in range(RUNS)]),
            }
            for kind, (name, args) in KINDS.items():
                row[kind] = median_on_a_fresh_server(RUNS, globals()[name], n, *args)
            for grouping in ("per_image", "grouped"):
                row[f"{grouping}_ms_per_image"] = 1000 * (row[grouping] - row["handwritten"]) / n
                row[f"{grouping}_over_floor_ms_per_image"] = (
                    1000 * (row[grouping] - row[f"{grouping}_floor"]) / n
                )
            results["by_n"][n] = row
        results["empty_flow"] = median_on_a_fresh_server(RUNS, empty_flow_run)
        results["rerun"] = {}
        for kind, asynchronous in RERUN_KINDS.items():
            with prefect_test_harness():
                results["rerun"][kind] = rerun(url, TARGET_N, asynchronous)
        results["postgres_rerun"] = _reruns_on_postgres(url, TARGET_N)
    return results


def median_on_a_fresh_server(runs: int, run: Callable[..., float], *args: Any) -> float:
    """Each kind of run gets its own Prefect server and database: runs recorded by earlier
    figures (N=1000 leaves thousands of task runs, artifacts and events) slowed later ones
    by up to a third and made the comparison depend on the order of measurement."""
    with prefect_test_harness():
        return median([run(*args) for _ in range(runs)])


def _each_on_postgres(calls: dict[str, tuple[str, tuple[Any, ...]]]) -> dict[str, Any]:
    """``{kind: (function of this module, args)}``: each call on its own Prefect server and
    new PostgreSQL database, from a process of its own; ``{kind: what it returned}``."""
    results = {}
    with postgres_server() as postgres:
        for kind, (name, args) in calls.items():
            with prefect_on_postgres(postgres) as api_url:
                results[kind] = call_in_subprocess(
                    f"benchmarks.orchestration:{name}", *args, env={"PREFECT_API_URL": api_url}
                )
    return results


# The re-run is measured with both flows: a sync flow run's end waits for Prefect's
# heartbeat thread (up to 1 s), which is most of a re-run whose items are all cached.
RERUN_KINDS = {"batch_campaign": False, "abatch_campaign (async flow)": True}


def rerun(url: str, n: int = TARGET_N, asynchronous: bool = False) -> dict[str, float]:
    """The same campaign twice: the second run's credits and its wall time / the first's."""
    firsts, seconds, credits = [], [], []
    for _ in range(RUNS):
        prompts = _prompts(n)
        with tempfile.TemporaryDirectory() as folder:
            firsts.append(ours(n, folder=folder, prompts=prompts, asynchronous=asynchronous))
            before = httpx.get(f"{url}/_emulator/ledger").json()["credits_charged"]
            seconds.append(ours(n, folder=folder, prompts=prompts, asynchronous=asynchronous))
            credits.append(httpx.get(f"{url}/_emulator/ledger").json()["credits_charged"] - before)
    return {"first": median(firsts), "second": median(seconds), "second_run_credits": max(credits)}


def _reruns_on_postgres(url: str, n: int) -> dict[str, dict[str, float]]:
    """:func:`rerun` of both flows, each on its own Prefect server and PostgreSQL database."""
    return _each_on_postgres(
        {kind: ("rerun", (url, n, asynchronous)) for kind, asynchronous in RERUN_KINDS.items()}
    )


def _against_ideal_and_handwritten(
    label: str, makespan: float, n: int, r: dict[str, Any], floor: float | None
) -> list[Figure]:
    """The two figures the project set targets for at N=200, with Prefect's floor of the
    same shape against the same baseline where it was measured."""
    note = f"median of {r['runs']}"
    return [
        Figure(
            f"{label} vs ideal ({note})",
            makespan,
            r["ideal"],
            "s",
            "ceil(N/C)*L",
            "<= 1.05" if n == TARGET_N else "",
            floor,
        ),
        Figure(
            f"{label} vs hand-written ({note})",
            makespan,
            r["handwritten"],
            "s",
            "asyncio+httpx",
            "<= 1.02" if n == TARGET_N else "",
            floor,
        ),
    ]


def _vs_ideal(label: str, makespan: float, r: dict[str, Any]) -> Figure:
    """A makespan of the batch size ``r`` against its ideal."""
    note = f"median of {r['runs']}"
    return Figure(f"{label} vs ideal ({note})", makespan, r["ideal"], "s", "ceil(N/C)*L")


def figures(results: dict[str, Any]) -> list[Figure]:
    rows = []
    for n, r in results["by_n"].items():
        note = f"median of {r['runs']}"
        rows.append(_vs_ideal(f"Prefect floor N={n}: sleep tasks", r["prefect_floor"], r))
        for grouping in ("per_image", "grouped"):
            label = f"batch_campaign N={n}, {grouping_label(FIXED_GROUPINGS[grouping])}"
            floor = r[f"{grouping}_floor"]
            rows += _against_ideal_and_handwritten(label, r[grouping], n, r, floor)
            rows.append(_vs_ideal(f"Prefect floor of that shape, N={n}", floor, r))
            rows.append(
                Figure(
                    f"{label} vs the Prefect floor of its shape ({note})",
                    r[grouping],
                    floor,
                    "s",
                    "floor of the shape",
                )
            )
    if TARGET_N in results["by_n"]:
        sqlite = results["by_n"][TARGET_N]
        rows.append(
            Figure(
                f"Prefect floor: an empty flow run, against the N={TARGET_N} ideal (median of 3)",
                results["empty_flow"],
                sqlite["ideal"],
                "s",
                "ceil(N/C)*L",
            )
        )
    for database, reruns in (("", results["rerun"]), ("PostgreSQL: ", results["postgres_rerun"])):
        for kind, rerun_result in reruns.items():
            # A sync re-run's floor: an empty sync flow run (measured on SQLite only).
            sync_on_sqlite = not database and not RERUN_KINDS[kind]
            rows.append(
                Figure(
                    f"{database}re-run of a {TARGET_N}-image campaign, {kind}: wall time "
                    f"(median of {RUNS})",
                    rerun_result["second"],
                    rerun_result["first"],
                    "s",
                    "first run",
                    "<= 0.05",
                    results["empty_flow"] if sync_on_sqlite else None,
                )
            )
    return rows
