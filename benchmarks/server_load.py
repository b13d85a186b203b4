"""The Prefect server's load per image, with one worker and with two against the same
PostgreSQL server.

The production shape of ``make scale`` (tools/scale.py): a Prefect server on PostgreSQL
(Debian's package, with ``pg_stat_statements`` loaded), Redis, a moto S3 bucket as the
destination and the result storage, the emulator, the receiver and two process workers,
each with its own Prefect home; ``batch_campaign`` deployed from the installed package.
Each round runs N new images twice: as one campaign on one worker, then as two campaigns of
N/2 at once, one on each worker. Per image: the HTTP requests the server answered (its
access log; the events a run sends over its websocket are not requests) and the time
PostgreSQL spent executing the server's statements (``pg_stat_statements``), read before
and after each configuration, with the workers' polling in between counted as the
configuration's. RUNS rounds; each figure is a median.

``python -m benchmarks.server_load`` measures only this and renders the report again.
"""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import RUNS, Figure, commit, measured_since, median

N = 40
CONCURRENCY = 8
TIME_SCALE = 0.25  # the emulator's: 2 s a generation
CONFIGURATIONS = {1: "one worker", 2: "two workers at once"}
REQUEST = re.compile(rb'"(?:GET|POST|PUT|PATCH|DELETE) /api/')


def _database_ms(database: str, *, reset: bool = False) -> float:
    """Milliseconds PostgreSQL spent executing statements in ``database`` since the last
    reset (and reset the count when asked)."""

    async def read() -> float:
        import asyncpg  # Prefect's own PostgreSQL driver

        connection = await asyncpg.connect(database.replace("+asyncpg", ""))
        try:
            await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            spent = await connection.fetchval(
                "SELECT coalesce(sum(total_exec_time), 0) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            if reset:
                await connection.execute("SELECT pg_stat_statements_reset()")
            return float(spent)
        finally:
            await connection.close()

    return asyncio.run(read())


def _requests(log: Path) -> int:
    """The API requests in the server's access log so far."""
    return len(REQUEST.findall(log.read_bytes()))


def _one_configuration(shape: Any, workers: int, label: str) -> dict[str, float]:
    """N new images on ``workers`` workers at once; the server's requests and database time
    per image."""
    per_worker = N // workers
    _database_ms(shape.database, reset=True)
    assert shape.server_log is not None
    requests_before = _requests(shape.server_log)
    runs = [
        shape.start(
            machine,
            items=shape.items(f"{label}-{machine}", per_worker),
            campaign=f"{label}-{machine}",
            key_template="load/{name}.{ext}",
            max_concurrency=CONCURRENCY,
        )
        for machine in range(workers)
    ]
    for run in runs:
        report = shape.wait(run)
        if report.stored != per_worker:
            raise SystemExit(f"{label}: {report.stored} of {per_worker} images stored")
    return {
        "requests_per_image": (_requests(shape.server_log) - requests_before) / N,
        "database_ms_per_image": _database_ms(shape.database) / N,
    }


def measure() -> dict[str, Any]:
    """RUNS rounds of both configurations on one production shape."""
    from tools.scale import Sizes, production_shape

    started = datetime.now(UTC)
    sizes = Sizes(
        shared=0,
        own=N,
        workers=2,
        limit=CONCURRENCY,
        max_concurrency=CONCURRENCY,
        time_scale=TIME_SCALE,
        redis_down=0,
    )
    rounds: dict[str, list[dict[str, float]]] = {str(w): [] for w in CONFIGURATIONS}
    with tempfile.TemporaryDirectory(prefix="journey-load-") as scratch:
        with production_shape(
            sizes,
            Path(scratch),
            server_env={"PREFECT_SERVER_LOGGING_LEVEL": "INFO"},  # its access log
            postgres_preload=("pg_stat_statements",),
        ) as shape:
            for index in range(RUNS):
                for workers in CONFIGURATIONS:
                    label = f"load-{index}-{workers}"
                    rounds[str(workers)].append(_one_configuration(shape, workers, label))
    return {
        "measured_at": measured_since(started),
        "commit": commit(),
        "n": N,
        "concurrency": CONCURRENCY,
        "runs": RUNS,
        "rounds": rounds,
    }


def _median(load: dict[str, Any], workers: int, what: str) -> float:
    return median([r[what] for r in load["rounds"][str(workers)]])


def figures(load: dict[str, Any]) -> list[Figure]:
    """Two workers against one, per image: requests and database time."""
    note = f"median of {load['runs']}"
    return [
        Figure(
            f"Prefect server on PostgreSQL, N={load['n']}: {what}, two workers at once vs one "
            f"({note})",
            _median(load, 2, key),
            _median(load, 1, key),
            unit,
            "one worker",
        )
        for what, key, unit in (
            ("API requests per image", "requests_per_image", "requests"),
            ("database time per image", "database_ms_per_image", "ms"),
        )
    ]


def report_table(load: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's section on the server's load: every round."""
    return [
        "## The Prefect server's load per image: one worker and two",
        "",
        f"Measured {load['measured_at']} at {load['commit']} (`python -m "
        "benchmarks.server_load` measures it alone). The production shape of `make scale` "
        "(PostgreSQL, Redis, moto S3 as destination and result storage, the receiver, two "
        f"process workers); N={load['n']} new images a configuration, "
        f"max_concurrency={load['concurrency']}: one campaign on one worker, or two campaigns "
        "of N/2 at once on two workers. Requests: the server's access log (a run's events "
        "travel over one websocket); database time: `pg_stat_statements`, the statements' "
        "execution time. Per image, each round:",
        "",
        "| workers | API requests per image | database ms per image |",
        "|---|---|---|",
        *(
            f"| {label} | "
            + ", ".join(f"{r['requests_per_image']:.1f}" for r in load["rounds"][str(w)])
            + " | "
            + ", ".join(f"{r['database_ms_per_image']:.1f}" for r in load["rounds"][str(w)])
            + " |"
            for w, label in CONFIGURATIONS.items()
        ),
        "",
    ]


def main(argv: list[str]) -> None:
    """Measure the server's load alone, merge it into the saved results, render them again."""
    from benchmarks import run

    run.save_and_render("server_load", measure())


if __name__ == "__main__":
    main(sys.argv[1:])
