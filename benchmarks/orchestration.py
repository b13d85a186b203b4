"""Orchestration efficiency and re-run cost of ``batch_campaign``.

Against an emulator process whose every generation takes exactly L = 2 s, N images at
concurrency C = 25 are measured three ways in the same run:

- ``batch_campaign`` (Prefect thread pool, local folder destination);
- the hand-written baseline a user would write: asyncio + httpx, a semaphore of C, the same
  calls and the same local writes;
- Prefect's own floor: a flow of N tasks that only sleep L, at C workers; once plain and
  once with the tags our tasks carry (Prefect 3.9 asks the API for tag concurrency slots
  on every run of a tagged task, through one queue per tag set);
- the floor of our shape: per image, what ``batch_campaign`` asks of Prefect with none of
  our work: a tagged task that sleeps L and a tagged task that publishes an image artifact
  and an event, both with persisted results, submitted through the same window of C on a
  pool of 2C. ``batch_campaign`` minus this is what our own code costs.
- ``batch_campaign`` with ``images_per_task_run`` (prefect_journey.campaigns.chunked) and its floor: the
  same per-image artifact, event and log lines, in chunks of images per task run;
- an empty flow run: what Prefect costs once per run of a sync flow, whatever it does
  (3.9 joins the run's heartbeat thread at its end, and that thread sleeps in 1 s steps);
- at N=200, the campaign (also as ``abatch_campaign``, the async flow) and the floors again
  (the chunked one also in an async flow) on a Prefect server backed by PostgreSQL
  (benchmarks/postgres.py) instead of the test harness's SQLite; there, the async chunked
  campaign also without its per-image artifacts, events and log lines (attribution only);
- the re-run of a finished campaign, with both flows, on SQLite and on PostgreSQL.

The ideal makespan is ceil(N/C) * L.
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
from prefect_journey.tasks import TAGS

# The grouped figure's size: 50 images per task run (a 1,000-image campaign is 20 task runs).
RECOMMENDED_IMAGES_PER_TASK_RUN = 50
LATENCY = 2.0
CONCURRENCY = 25
KEY = "bench-key"
# The batch size the issue sets its targets at; measured on PostgreSQL as well.
TARGET_N = 200


def _prompts(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]  # never a cache hit across runs
    return [f"bench image {i} #{tag}" for i in range(n)]


async def _handwritten(url: str, prompts: list[str], folder: Path) -> None:
    limit = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
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


def handwritten(url: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        asyncio.run(_handwritten(url, _prompts(n), Path(folder)))
        return time.perf_counter() - started


def campaign_parameters(
    n: int, destination: str, prompts: list[str] | None = None, images_per_task_run: int = 1
) -> dict[str, Any]:
    """The parameters of every benchmarked campaign: ``n`` new prompts (or ``prompts``) at
    concurrency C, with no Prefect concurrency limit, stored under ``destination``."""
    return {
        "items": [{"prompt": p} for p in prompts or _prompts(n)],
        "destination": destination,
        "max_concurrency": CONCURRENCY,
        "concurrency_limit": None,
        "images_per_task_run": images_per_task_run,
    }


def ours(
    n: int,
    folder: str | None = None,
    prompts: list[str] | None = None,
    images_per_task_run: int = 1,
    asynchronous: bool = False,
) -> float:
    """One campaign's makespan; ``asynchronous``: run it as ``abatch_campaign``."""
    from prefect_journey.flows.campaign import abatch_campaign, batch_campaign

    with tempfile.TemporaryDirectory() as scratch:
        parameters = campaign_parameters(n, folder or scratch, prompts, images_per_task_run)
        started = time.perf_counter()
        if asynchronous:
            asyncio.run(abatch_campaign(**parameters))
        else:
            batch_campaign(**parameters)
        return time.perf_counter() - started


def ours_chunked(n: int, asynchronous: bool = False) -> float:
    return ours(n, images_per_task_run=RECOMMENDED_IMAGES_PER_TASK_RUN, asynchronous=asynchronous)


def ours_async(n: int) -> float:
    return ours(n, asynchronous=True)


def ours_chunked_async(n: int) -> float:
    return ours_chunked(n, asynchronous=True)


def ours_chunked_async_unpublished(n: int) -> float:
    """``ours_chunked_async`` with every image's artifact, event and log lines switched off:
    how much of the gap to the hand-written script they make. Attribution only (the
    product always publishes them), and only for this call."""
    from unittest import mock

    from prefect_journey.campaigns import chunked

    class Unpublished:
        async def acreate(self, client: object = None) -> None:
            return None

    with mock.patch.multiple(
        chunked,
        image_artifact=lambda *args, **kwargs: Unpublished(),
        emit_stored_event=lambda *args, **kwargs: None,
        log_stored=lambda stored: None,
        log_generation=lambda logger, result: result,
    ):
        return ours_chunked_async(n)


def prefect_floor(n: int, tags: list[str] | None = None) -> float:
    from prefect import flow, task
    from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

    @task(tags=tags or [])
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


def prefect_floor_of_our_shape(n: int) -> float:
    import queue

    from prefect import flow, task
    from prefect.artifacts import create_image_artifact
    from prefect.events import emit_event
    from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

    @task(tags=TAGS, persist_result=True)
    def generate(index: int) -> int:
        time.sleep(LATENCY)
        return index

    @task(tags=TAGS, persist_result=True)
    def publish(index: int) -> int:
        create_image_artifact(image_url=f"https://cdn.example.com/{index}.png")
        emit_event("bench.image.stored", resource={"prefect.resource.id": f"bench.{index}"})
        return index

    runner: TaskRunner[Any] = ThreadPoolTaskRunner(max_workers=2 * CONCURRENCY)

    @flow(task_runner=runner)
    def shape() -> None:
        finished: queue.Queue[tuple[str, int]] = queue.Queue()
        waiting = iter(range(n))

        def report(stage: str, index: int) -> Callable[[Any], None]:
            return lambda _: finished.put((stage, index))

        def submit_next_generation() -> None:
            index = next(waiting, None)
            if index is not None:
                future = generate.submit(index)
                future.add_done_callback(report("generated", index))

        for _ in range(CONCURRENCY):
            submit_next_generation()
        remaining = n
        while remaining:
            stage, index = finished.get()
            if stage == "generated":
                submit_next_generation()
                future = publish.submit(index)
                future.add_done_callback(report("published", index))
            else:
                remaining -= 1

    started = time.perf_counter()
    shape()
    return time.perf_counter() - started


def prefect_floor_of_chunked_shape(n: int, asynchronous: bool = False) -> float:
    """Per image, what ``images_per_task_run`` still asks of Prefect, with none of our work:
    a sleep of L under the run's slots, then an image artifact, an event and two log lines;
    images in tagged task runs of RECOMMENDED_IMAGES_PER_TASK_RUN, on the flow's event loop.
    ``asynchronous``: in an async flow, as ``abatch_campaign`` runs them."""
    from prefect import flow, get_run_logger, task
    from prefect.artifacts import ImageArtifact
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import PrefectClient, get_client
    from prefect.events import emit_event

    @task(tags=TAGS, cache_policy=NO_CACHE)  # as the real chunks: nothing to hash
    async def chunk(indices: list[int], slots: asyncio.Semaphore, prefect: PrefectClient) -> None:
        logger = get_run_logger()

        async def one(index: int) -> None:
            async with slots:
                await asyncio.sleep(LATENCY)
            logger.info("generated %d", index)
            await ImageArtifact(image_url=f"https://cdn.example.com/{index}.png").acreate(prefect)
            emit_event("bench.image.stored", resource={"prefect.resource.id": f"bench.{index}"})
            logger.info("stored %d", index)

        await asyncio.gather(*(one(i) for i in indices))

    async def chunks() -> None:
        slots = asyncio.Semaphore(CONCURRENCY)
        size = RECOMMENDED_IMAGES_PER_TASK_RUN
        async with get_client() as prefect:
            await asyncio.gather(
                *(
                    chunk(list(range(k, min(n, k + size))), slots, prefect)
                    for k in range(0, n, size)
                )
            )

    @flow
    def shape() -> None:
        asyncio.run(chunks())

    @flow
    async def async_shape() -> None:
        await chunks()

    started = time.perf_counter()
    if asynchronous:
        asyncio.run(async_shape())
    else:
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


def measure(sizes: tuple[int, ...] = (50, 200, 1000)) -> dict[str, Any]:
    """Makespans by N (medians of RUNS at every N), with ratios to the ideal and the
    hand-written script."""
    import os

    results: dict[str, Any] = {"by_n": {}}
    with emulator_process("--fixed-latency", str(LATENCY)) as url:
        os.environ.update({"JOURNEY_API_KEY": KEY, "JOURNEY_BASE_URL": url})
        for n in sizes:
            ideal = math.ceil(n / CONCURRENCY) * LATENCY
            mine = median_on_a_fresh_server(RUNS, ours, n)
            base = median([handwritten(url, n) for _ in range(RUNS)])
            floor = median_on_a_fresh_server(RUNS, prefect_floor, n)
            tagged_floor = median_on_a_fresh_server(RUNS, prefect_floor, n, TAGS)
            shape_floor = median_on_a_fresh_server(RUNS, prefect_floor_of_our_shape, n)
            chunked = median_on_a_fresh_server(RUNS, ours_chunked, n)
            chunked_floor = median_on_a_fresh_server(RUNS, prefect_floor_of_chunked_shape, n)
            results["by_n"][n] = {
                "runs": RUNS,
                "ideal": ideal,
                "ours": mine,
                "handwritten": base,
                "prefect_floor": floor,
                "tagged_floor": tagged_floor,
                "shape_floor": shape_floor,
                "overhead_ms_per_image": 1000 * (mine - base) / n,
                "ours_ms_per_image": 1000 * (mine - shape_floor) / n,
                "chunked": chunked,
                "chunked_floor": chunked_floor,
                "chunked_overhead_ms_per_image": 1000 * (chunked - base) / n,
            }
        if TARGET_N in sizes:
            results["postgres"] = _on_postgres(TARGET_N)
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


def median_of_runs(name: str, runs: int, *args: Any) -> float:
    """The median of ``runs`` calls of this module's function ``name``."""
    run: Callable[..., float] = globals()[name]
    return median([run(*args) for _ in range(runs)])


def _on_postgres(n: int) -> dict[str, float]:
    """The campaign, chunked and per image, and Prefect's floors, on PostgreSQL: each on
    its own Prefect server and database, measured from a process of its own."""
    kinds: dict[str, tuple[str, tuple[Any, ...]]] = {
        "ours": ("ours", (n,)),
        "chunked": ("ours_chunked", (n,)),
        "ours_async": ("ours_async", (n,)),
        "chunked_async": ("ours_chunked_async", (n,)),
        "chunked_async_unpublished": ("ours_chunked_async_unpublished", (n,)),
        "prefect_floor": ("prefect_floor", (n,)),
        "tagged_floor": ("prefect_floor", (n, TAGS)),
        "shape_floor": ("prefect_floor_of_our_shape", (n,)),
        "chunked_floor": ("prefect_floor_of_chunked_shape", (n,)),
        "chunked_floor_async": ("prefect_floor_of_chunked_shape", (n, True)),
    }
    return _each_on_postgres(
        {kind: ("median_of_runs", (name, RUNS, *args)) for kind, (name, args) in kinds.items()}
    )


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
            firsts.append(ours(n, folder, prompts, asynchronous=asynchronous))
            before = httpx.get(f"{url}/_emulator/ledger").json()["credits_charged"]
            seconds.append(ours(n, folder, prompts, asynchronous=asynchronous))
            credits.append(httpx.get(f"{url}/_emulator/ledger").json()["credits_charged"] - before)
    return {"first": median(firsts), "second": median(seconds), "second_run_credits": max(credits)}


def _reruns_on_postgres(url: str, n: int) -> dict[str, dict[str, float]]:
    """:func:`rerun` of both flows, each on its own Prefect server and PostgreSQL database."""
    return _each_on_postgres(
        {kind: ("rerun", (url, n, asynchronous)) for kind, asynchronous in RERUN_KINDS.items()}
    )


def _against_ideal_and_handwritten(
    label: str, makespan: float, n: int, r: dict[str, Any], floor: float
) -> list[Figure]:
    """The two figures the issue sets targets for (at N=200), each with Prefect's floor of
    the same shape against the same baseline."""
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


def figures(results: dict[str, Any]) -> list[Figure]:
    rows = []
    for n, r in results["by_n"].items():
        note = f"median of {r['runs']}"
        rows += _against_ideal_and_handwritten(
            f"batch_campaign N={n}", r["ours"], n, r, r["shape_floor"]
        )
        rows.append(
            Figure(
                f"Prefect floor N={n}: sleep tasks vs ideal ({note})",
                r["prefect_floor"],
                r["ideal"],
                "s",
                "ceil(N/C)*L",
            )
        )
        rows.append(
            Figure(
                f"Prefect floor N={n}: sleep tasks with our tags vs ideal ({note})",
                r["tagged_floor"],
                r["ideal"],
                "s",
                "ceil(N/C)*L",
            )
        )
        rows.append(
            Figure(
                f"Prefect floor of our shape N={n} vs ideal ({note})",
                r["shape_floor"],
                r["ideal"],
                "s",
                "ceil(N/C)*L",
            )
        )
        rows.append(
            Figure(
                f"batch_campaign N={n} vs the Prefect floor of our shape ({note})",
                r["ours"],
                r["shape_floor"],
                "s",
                "floor of our shape",
            )
        )
        chunked = f"batch_campaign, {RECOMMENDED_IMAGES_PER_TASK_RUN} images per task run, N={n}"
        rows += _against_ideal_and_handwritten(chunked, r["chunked"], n, r, r["chunked_floor"])
        rows.append(
            Figure(
                f"Prefect floor of the chunked shape N={n} vs ideal ({note})",
                r["chunked_floor"],
                r["ideal"],
                "s",
                "ceil(N/C)*L",
            )
        )
    if TARGET_N in results["by_n"]:
        rows.append(
            Figure(
                f"Prefect floor: an empty flow run, against the N={TARGET_N} ideal (median of 3)",
                results["empty_flow"],
                results["by_n"][TARGET_N]["ideal"],
                "s",
                "ceil(N/C)*L",
            )
        )
        rows += _postgres_figures(results["postgres"], results["by_n"][TARGET_N])
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


def _postgres_figures(postgres: dict[str, float], sqlite: dict[str, Any]) -> list[Figure]:
    """The N=200 figures on PostgreSQL, against the same ideal and hand-written script."""
    n, note = TARGET_N, f"median of {RUNS}"
    chunked = f"batch_campaign, {RECOMMENDED_IMAGES_PER_TASK_RUN} images per task run, N={n}"
    rows = _against_ideal_and_handwritten(
        f"PostgreSQL: batch_campaign N={n}", postgres["ours"], n, sqlite, postgres["shape_floor"]
    )
    rows += _against_ideal_and_handwritten(
        f"PostgreSQL: {chunked}", postgres["chunked"], n, sqlite, postgres["chunked_floor"]
    )
    for key, label in (("ours_async", "one task run per image"), ("chunked_async", "chunked")):
        sync_key = key.removesuffix("_async")
        rows.append(
            Figure(
                f"PostgreSQL: abatch_campaign (async flow) N={n}, {label}, vs batch_campaign "
                f"({note})",
                postgres[key],
                postgres[sync_key],
                "s",
                "batch_campaign",
            )
        )
    rows += _against_ideal_and_handwritten(
        f"PostgreSQL: abatch_campaign (async flow), {RECOMMENDED_IMAGES_PER_TASK_RUN} images per "
        f"task run, N={n}",
        postgres["chunked_async"],
        n,
        sqlite,
        postgres["chunked_floor_async"],
    )
    rows.append(
        Figure(
            f"PostgreSQL: abatch_campaign (async flow), chunked, N={n} vs the Prefect floor of "
            f"the chunked shape in an async flow ({note})",
            postgres["chunked_async"],
            postgres["chunked_floor_async"],
            "s",
            "async floor of the chunked shape",
        )
    )
    for key, label in (
        ("prefect_floor", "sleep tasks"),
        ("tagged_floor", "sleep tasks with our tags"),
        ("shape_floor", "our shape"),
        ("chunked_floor", "the chunked shape"),
        ("chunked_floor_async", "the chunked shape in an async flow"),
    ):
        rows.append(
            Figure(
                f"PostgreSQL: Prefect floor N={n}, {label}, vs ideal ({note})",
                postgres[key],
                sqlite["ideal"],
                "s",
                "ceil(N/C)*L",
            )
        )
    return rows
