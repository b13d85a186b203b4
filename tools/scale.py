"""``make scale``: the production shape on one machine, and the money guarantees checked on it.

    make scale                                          # about 35 images a campaign
    python -m tools.scale --shared 4 --own 3 --limit 2  # the reduced run make test does

Every part is a real process on loopback, started as a platform team starts it:

- PostgreSQL (Debian's package) and a Prefect server on it (``prefect server start`` with
  ``PREFECT_SERVER_DATABASE_CONNECTION_URL``);
- ``redis-server`` (Debian's package), keeping nothing on disk;
- a moto S3 server: the bucket the images are stored in, and the result storage (a saved
  ``RemoteFileSystem`` block on ``s3://<bucket>/prefect-results``, named by
  ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` on every worker);
- the JourneyAPI emulator (``prefect-journey emulator``, time-scaled) and the webhook
  receiver (``prefect-journey webhooks``, its secret from ``prefect-journey new-secret``);
- a process work pool and ``--workers`` ``prefect worker start`` processes, each with its
  own Prefect home and work queue, as machines; ``batch_campaign`` deployed by module path
  (``prefect_journey.flows.campaign:batch_campaign``, no pull step).

The workers and the receiver get ``JOURNEY_REDIS_URL`` (``--no-redis``: no Redis, to see
what each machine on its own disk costs). Secrets travel in environments,
never on a command line. Then, one after the other (:data:`SCENARIOS`):

a. two overlapping campaigns at once on two machines: every image generated once (the
   emulator's ledger) and stored once (the bucket), and both reports say every image stored;
b. the same two runs under one global concurrency limit of ``--limit``: the emulator never
   has more generations in flight;
c. two campaigns on two machines sharing one budget smaller than their total: the credits
   charged reach it and never pass it, and the reports say why the rest was skipped;
d. a machine killed (SIGKILL, worker and flow run) with calls in flight, and the campaign
   run again on another: nothing lost, nothing stored or paid twice (the receiver's
   deliveries recover what was in flight);
e. Redis stopped and started again while a campaign runs, and the campaign run again:
   items fail with a reason naming Redis, or go on; nothing paid or stored twice.

Prints one line of counts and exits 1 if any check failed (each failed check is named on
stderr, and the folder of the parts' logs is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tools.services import (
    PREFECT,
    Service,
    free_port,
    moto_server,
    new_database,
    postgres_server,
    prefect_server,
    redis_server,
    running,
    this_process,
    wait_until,
)

BUCKET = "journey-scale"
POOL = "scale"
DEPLOYMENT = "batch-campaign/scale-campaign"
RESULTS_BLOCK = "scale-results"
CONCURRENCY_LIMIT = "scale-imagine"
# The S3 credentials moto accepts (it checks none).
AWS = {
    "AWS_ACCESS_KEY_ID": "scale",
    "AWS_SECRET_ACCESS_KEY": "scale",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# The variables a machine sets for itself (see production_shape).
MACHINE_SETTINGS = ("PREFECT_", "JOURNEY_", "AWS_")
# A killed machine's image locks are free for the others after this lease: short, so that
# the campaign resumed on another machine does not wait a production lease (60 s) for them.
LOCK_LEASE_SECONDS = 10
# How long a possibly-billed attempt waits for its delivery: deliveries come within a
# second here.
RECOVERY_WINDOW = 30
# Workers look for new runs this often (Prefect's default is 10 s).
WORKER_POLL_SECONDS = 2
# One campaign run, from its start to its end, including a worker's start of the flow run
# process and a resumed run's wait for the deliveries of the run it resumes.
RUN_TIMEOUT = 600.0


@dataclass(frozen=True)
class Sizes:
    """What the scenarios run: ``shared`` images both overlapping campaigns ask for, and
    ``own`` more each; the other scenarios run ``shared + own`` images a campaign."""

    shared: int
    own: int
    workers: int
    limit: int
    max_concurrency: int
    time_scale: float
    redis_down: float
    redis: bool = True

    @property
    def campaign(self) -> int:
        return self.shared + self.own


@dataclass
class Tally:
    """The counts printed on the line, and the checks (name, passed, what was seen)."""

    counts: dict[str, int | str] = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, passed: bool, seen: str) -> None:
        self.checks.append((name, passed, seen))

    @property
    def failed(self) -> list[tuple[str, bool, str]]:
        return [check for check in self.checks if not check[1]]

    def line(self) -> str:
        counts = " ".join(f"{name}={value}" for name, value in self.counts.items())
        failed = ",".join(name for name, _, _ in self.failed) or "none"
        passed = len(self.checks) - len(self.failed)
        return (
            f"scale {counts} checks_passed={passed}/{len(self.checks)} failed={failed} "
            f"ok={'yes' if not self.failed else 'NO'}"
        )


@dataclass(frozen=True)
class Report:
    """A campaign run's summary table, as the UI shows it: one row per item, and its
    ledger line (``budget_left=`` among its counts)."""

    rows: list[dict[str, Any]]
    ledger: str

    @property
    def stored(self) -> int:
        return sum(row["status"] == "stored" for row in self.rows)

    def count(self, name: str) -> int | None:
        for part in self.ledger.split():
            key, _, value = part.partition("=")
            if key == name:
                return int(value)
        return None


@dataclass
class Shape:
    """The running parts, and what the scenarios do with them."""

    api: str
    s3: str
    emulator: str
    redis: Service | None
    workers: list[Service]
    database: str = ""  # the Prefect server's PostgreSQL database
    server_log: Path | None = None  # the Prefect server's log
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def machine(self, index: int) -> str:
        """The work queue only worker ``index`` polls: a run sent there runs on it."""
        return self.workers[index].name

    def items(self, label: str, count: int) -> list[dict[str, Any]]:
        """``count`` images of their own (``name`` feeds the key template)."""
        return [
            {"prompt": f"scale {self.tag} {label} image {i}", "name": f"{label}-{i:03d}"}
            for i in range(count)
        ]

    def start(self, machine: int, **parameters: Any) -> str:
        """A run of the deployment on worker ``machine``; returns its flow run id."""
        from prefect.client.schemas.objects import FlowRun
        from prefect.deployments import run_deployment

        defaults = {
            "destination": f"s3://{BUCKET}",
            "allow_failures": True,
            "concurrency_limit": None,
        }
        flow_run = run_deployment(
            DEPLOYMENT,
            parameters={**defaults, **parameters},
            timeout=0,
            work_queue_name=self.machine(machine),
        )
        # Called from sync code, run_deployment returns the flow run, not a coroutine.
        assert isinstance(flow_run, FlowRun)
        return str(flow_run.id)

    def state(self, flow_run: str) -> Any:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(uuid.UUID(flow_run)).state

    def wait(self, flow_run: str) -> Report:
        """Wait for the run's end; its report.

        Raises:
            SystemExit: The run did not complete (its state's message says why).
        """
        state = wait_until(
            lambda: (s := self.state(flow_run)) is not None and s.is_final() and s,
            f"flow run {flow_run}",
            timeout=RUN_TIMEOUT,
        )
        if not state.is_completed():
            raise SystemExit(f"flow run {flow_run} ended {state.name}: {state.message}")
        return self.report(flow_run)

    def report(self, flow_run: str) -> Report:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterType,
            FlowRunFilter,
            FlowRunFilterId,
        )

        with get_client(sync_client=True) as client:
            [table] = client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run)])),
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])),
            )
        rows = table.data if isinstance(table.data, list) else json.loads(str(table.data))
        return Report(rows, table.description or "")

    def ledger(self) -> dict[str, Any]:
        response = httpx.get(f"{self.emulator}/_emulator/ledger", timeout=30)
        ledger: dict[str, Any] = response.raise_for_status().json()
        return ledger

    def reset(self) -> None:
        """A fresh ledger for the next scenario (nothing is in flight between scenarios)."""
        httpx.post(f"{self.emulator}/_emulator/reset", timeout=30).raise_for_status()

    def objects(self, prefix: str) -> dict[str, list[str]]:
        """The bucket under ``prefix``: each image's name, with the task id of each object
        stored for it (keys are ``<prefix>/<name>/<task_id>.<ext>``)."""
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.s3, skip_instance_cache=True)
        found: dict[str, list[str]] = {}
        for path in fs.find(f"{BUCKET}/{prefix}"):
            *_, name, leaf = path.split("/")
            found.setdefault(name, []).append(leaf.rsplit(".", 1)[0])
        return found


def in_flight(ledger: dict[str, Any]) -> int:
    """Generations billed and not ended yet."""
    return sum(
        1
        for call in ledger["log"]
        if call["endpoint"] == "imagine" and call.get("credits") and "ended_at" not in call
    )


def check_paid_and_stored_once(
    shape: Shape, tally: Tally, scenario: str, prefix: str, names: set[str]
) -> None:
    """Checks ``<scenario>.paid_once`` (the emulator billed one generation per image, and
    each stored object is one of them) and ``<scenario>.stored_once`` (one object per image,
    none for anything else)."""
    billed = shape.ledger()["billed_tasks"]
    objects = shape.objects(prefix)
    stored_tasks = {task for tasks in objects.values() for task in tasks}
    twice = sum(len(tasks) - 1 for tasks in objects.values() if len(tasks) > 1)
    missing = names - set(objects)
    tally.counts[f"{scenario}_generated"] = len(billed)
    tally.counts[f"{scenario}_objects"] = sum(len(tasks) for tasks in objects.values())
    tally.check(
        f"{scenario}.paid_once",
        len(billed) == len(names) and stored_tasks <= set(billed),
        f"{len(billed)} generations billed for {len(names)} images",
    )
    tally.check(
        f"{scenario}.stored_once",
        not twice and not missing and set(objects) == names,
        f"{twice} images stored more than once, {len(missing)} not stored, "
        f"{len(set(objects) - names)} objects of no image",
    )


def overlap(shape: Shape, sizes: Sizes, tally: Tally) -> None:
    """a and b: two campaigns with images in common, at once on two machines, under one
    global concurrency limit."""
    shared = shape.items("overlap-shared", sizes.shared)
    runs = {
        label: shape.start(
            machine,
            items=shared + shape.items(f"overlap-{label}", sizes.own),
            campaign=f"overlap-{label}",
            key_template="overlap/{name}/{task_id}.{ext}",
            max_concurrency=sizes.max_concurrency,
            concurrency_limit=CONCURRENCY_LIMIT,
        )
        for machine, label in enumerate(("a", "b"))
    }
    reports = {label: shape.wait(run) for label, run in runs.items()}
    names = {item["name"] for item in shared} | {
        f"overlap-{label}-{i:03d}" for label in runs for i in range(sizes.own)
    }
    tally.counts["overlap_images"] = len(names)
    check_paid_and_stored_once(shape, tally, "overlap", "overlap", names)
    tally.counts["overlap_reported_stored"] = sum(r.stored for r in reports.values())
    tally.check(
        "overlap.reports_all_stored",
        all(r.stored == len(r.rows) == sizes.campaign for r in reports.values()),
        ", ".join(f"{label}: {r.stored} of {len(r.rows)} stored" for label, r in reports.items()),
    )
    peak = shape.ledger()["peak_concurrency"]
    tally.counts["peak_in_flight"] = peak
    tally.counts["limit"] = sizes.limit
    tally.check("limit.peak_within", peak <= sizes.limit, f"peak {peak}, limit {sizes.limit}")


def budget(shape: Shape, sizes: Sizes, tally: Tally) -> None:
    """c: two campaigns on two machines, one budget for half their images."""
    max_credits = 4 * sizes.campaign
    runs = [
        shape.start(
            machine,
            items=shape.items(f"budget-{machine}", sizes.campaign),
            campaign=f"budget-{machine}",
            key_template="budget/{name}/{task_id}.{ext}",
            max_concurrency=sizes.max_concurrency,
            max_credits=max_credits,
            budget_name="scale-shared-budget",
            partial_budget=True,
        )
        for machine in range(2)
    ]
    reports = [shape.wait(run) for run in runs]
    charged = shape.ledger()["credits_charged"]
    rows = [row for report in reports for row in report.rows]
    skipped = [row for row in rows if row["status"] == "skipped"]
    others = [row for row in rows if row["status"] not in ("stored", "skipped")]
    lefts = [report.count("budget_left") for report in reports]
    tally.counts |= {
        "budget_max_credits": max_credits,
        "budget_charged": charged,
        "budget_stored": sum(r.stored for r in reports),
        "budget_skipped": len(skipped),
        "budget_left": ",".join(str(left) for left in lefts),
    }
    tally.check("budget.never_past", charged <= max_credits, f"{charged} of {max_credits}")
    tally.check("budget.stopped_at", charged == max_credits, f"{charged} of {max_credits}")
    tally.check(
        "budget.reports_say_so",
        bool(skipped)
        and not others
        and all("credit budget" in row["reason"] for row in skipped)
        and None not in lefts
        and all(
            left == 0
            for report, left in zip(reports, lefts, strict=True)
            if report.stored < len(report.rows)
        ),
        f"{len(skipped)} skipped, {len(others)} failed otherwise, budget_left {lefts}",
    )


def interrupted_and_resumed(
    shape: Shape,
    sizes: Sizes,
    tally: Tally,
    label: str,
    interrupt: Callable[[str, dict[str, Any]], None],
) -> None:
    """A campaign of its own images started on machine 0, interrupted once a third of them
    are paid for and some are still being generated (``interrupt`` is given the run and the
    emulator's ledger then), and run again on machine 1. Checks ``<label>.mid_run``,
    ``<label>.nothing_lost`` and those of :func:`check_paid_and_stored_once`."""
    items = shape.items(label, sizes.campaign)
    parameters = {
        "items": items,
        "campaign": label,
        "key_template": f"{label}/{{name}}/{{task_id}}.{{ext}}",
        "max_concurrency": sizes.max_concurrency,
    }
    run = shape.start(0, **parameters)
    ledger = wait_until(
        lambda: (
            (ledger := shape.ledger())
            and len(ledger["billed_tasks"]) >= sizes.campaign // 3
            and in_flight(ledger)
            and ledger
        ),
        f"the {label} campaign to be mid-way",
        timeout=RUN_TIMEOUT,
    )
    paid = len(ledger["billed_tasks"])
    tally.check(f"{label}.mid_run", paid < sizes.campaign, f"{paid} of {sizes.campaign} paid")
    interrupt(run, ledger)
    resumed = shape.wait(shape.start(1, **parameters))
    tally.counts[f"{label}_recovered"] = resumed.count("recovered") or 0
    tally.check(
        f"{label}.nothing_lost",
        resumed.stored == len(items),
        f"{resumed.stored} of {len(items)} stored",
    )
    check_paid_and_stored_once(shape, tally, label, label, {i["name"] for i in items})


def kill_and_resume(shape: Shape, sizes: Sizes, tally: Tally) -> None:
    """d: machine 0 (its worker and flow run) killed with calls in flight; the campaign run
    again on machine 1, which recovers them from the receiver's deliveries."""

    def kill(run: str, ledger: dict[str, Any]) -> None:
        shape.workers[0].kill()
        tally.counts["kill_in_flight"] = in_flight(ledger)

    interrupted_and_resumed(shape, sizes, tally, "kill", kill)
    shape.workers[0].start()  # the machine comes back


def redis_restart(shape: Shape, sizes: Sizes, tally: Tally) -> None:
    """e: Redis stopped and started again while a campaign runs; then run again."""
    redis = shape.redis
    if redis is None:  # --no-redis
        return
    not_stored: list[dict[str, Any]] = []

    def restart(run: str, ledger: dict[str, Any]) -> None:
        redis.stop()
        # Down until the run ends or --redis-down seconds pass, whichever comes first.
        deadline = time.monotonic() + sizes.redis_down
        while time.monotonic() < deadline and not shape.state(run).is_final():
            time.sleep(0.5)
        redis.start()
        not_stored.extend(row for row in shape.wait(run).rows if row["status"] != "stored")

    interrupted_and_resumed(shape, sizes, tally, "redis", restart)
    tally.counts["redis_failed"] = len(not_stored)
    tally.check(
        "redis.reasons",
        all("redis" in row["reason"].lower() for row in not_stored),
        "; ".join(sorted({row["reason"] for row in not_stored})[:3]) or "none failed",
    )


SCENARIOS: tuple[Callable[[Shape, Sizes, Tally], None], ...] = (
    overlap,
    budget,
    kill_and_resume,
    redis_restart,
)


def prefect_cli(*args: str, cwd: Path | None = None) -> None:
    """One ``prefect`` command against the server this process's environment names."""
    done = subprocess.run([*PREFECT, *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"prefect {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def new_secret() -> str:
    """A webhook secret, as a user makes one."""
    command = [sys.executable, "-m", "prefect_journey.cli", "new-secret"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def deploy(folder: Path, workers: int) -> None:
    """The work pool, one queue per worker, the global concurrency limit, the results block
    and the campaign's deployment, from a ``prefect.yaml`` naming the flow by module path."""
    import prefect
    from prefect.filesystems import RemoteFileSystem

    prefect_cli("work-pool", "create", POOL, "--type", "process")
    for index in range(workers):
        prefect_cli("work-queue", "create", f"machine-{index}", "--pool", POOL)
    # Saved here, read by the workers: only the endpoint, the credentials are the
    # machines' own (their environment), as with instance roles.
    RemoteFileSystem(
        basepath=f"s3://{BUCKET}/prefect-results",
        settings={"endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"]},
    ).save(RESULTS_BLOCK)
    spec = {
        "name": "scale",
        "prefect-version": prefect.__version__,
        "pull": [],  # the flow comes with the installed package
        "deployments": [
            {
                "name": "scale-campaign",
                "entrypoint": "prefect_journey.flows.campaign:batch_campaign",
                "work_pool": {"name": POOL},
            }
        ],
    }
    (folder / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    prefect_cli("--no-prompt", "deploy", "--all", "--prefect-file", "prefect.yaml", cwd=folder)


def worker(index: int, folder: Path, env: dict[str, str]) -> Service:
    """``prefect worker start`` for machine ``index``: its own home, its own queue."""
    name = f"machine-{index}"
    home = folder / name
    home.mkdir()
    command = [*PREFECT, "worker", "start", "--pool", POOL, "--work-queue", name, "--name", name]
    return Service(name, command, {**env, "PREFECT_HOME": str(home)}, folder / "logs")


@contextmanager
def production_shape(
    sizes: Sizes,
    folder: Path,
    *,
    server_env: dict[str, str] | None = None,
    postgres_preload: tuple[str, ...] = (),
) -> Iterator[Shape]:
    """Every part started, deployed and configured; stopped on the way out.

    Args:
        sizes: What the scenarios run (Redis or not, the emulator's time scale).
        folder: Where the parts keep their homes and logs.
        server_env: Variables added to the Prefect server's environment.
        postgres_preload: Libraries PostgreSQL loads at start (``postgres_server``).
    """
    logs = folder / "logs"
    logs.mkdir()
    # Each machine has only the settings given here: none of this process's Prefect, JourneyAPI
    # or AWS settings (a test's shared budget folder would join the machines' budgets).
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(MACHINE_SETTINGS)},
        **AWS,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with ExitStack() as stack:
        postgres = stack.enter_context(postgres_server(preload=postgres_preload))
        redis = stack.enter_context(running(redis_server(logs))) if sizes.redis else None
        # Where the machines and the receiver share their locks, budgets and deliveries.
        shared = {"JOURNEY_REDIS_URL": redis.url} if redis else {}
        s3 = stack.enter_context(running(moto_server(logs)))
        server_home = folder / "server"
        server_home.mkdir()
        database = new_database(postgres)
        base = stack.enter_context(
            prefect_server(server_home, free_port(), database_url=database, env=server_env)
        )
        api = f"{base}/api"
        # This process: the team's laptop, which deploys, starts runs and reads reports.
        home = folder / "harness"
        home.mkdir()
        stack.enter_context(
            this_process(
                {
                    **AWS,
                    "PREFECT_HOME": str(home),
                    "PREFECT_API_URL": api,
                    "AWS_ENDPOINT_URL_S3": s3.url,
                }
            )
        )
        import boto3

        boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket=BUCKET)
        api_key = f"scale-{uuid.uuid4().hex}"
        emulator_port = free_port()
        emulator = stack.enter_context(
            running(
                Service(
                    "emulator",
                    [
                        *(sys.executable, "-m", "prefect_journey.cli", "emulator"),
                        *("--port", str(emulator_port), "--time-scale", str(sizes.time_scale)),
                        *("--credits", str(10**8)),
                    ],
                    {**base_env, "JOURNEY_API_KEY": api_key},
                    logs,
                    ready=lambda: _answers(f"http://127.0.0.1:{emulator_port}/_emulator/ledger"),
                    url=f"http://127.0.0.1:{emulator_port}",
                )
            )
        )
        secret = new_secret()
        receiver_port = free_port()
        receiver_home = folder / "receiver"
        receiver_home.mkdir()
        receiver = stack.enter_context(
            running(
                Service(
                    "receiver",
                    [
                        *(sys.executable, "-m", "prefect_journey.cli", "webhooks"),
                        *("--port", str(receiver_port)),
                    ],
                    {
                        **base_env,
                        "PREFECT_HOME": str(receiver_home),
                        "PREFECT_API_URL": api,
                        "JOURNEY_WEBHOOK_SECRET": secret,
                        **shared,
                    },
                    logs,
                    ready=lambda: _answers(f"http://127.0.0.1:{receiver_port}/health"),
                    url=f"http://127.0.0.1:{receiver_port}",
                )
            )
        )
        prefect_cli("gcl", "create", CONCURRENCY_LIMIT, "--limit", str(sizes.limit))
        deploy(folder, sizes.workers)
        from prefect_journey.webhooks import WEBHOOK_PATH

        worker_env = {
            **base_env,
            "PREFECT_API_URL": api,
            "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"remote-file-system/{RESULTS_BLOCK}",
            "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_POLL_SECONDS),
            "AWS_ENDPOINT_URL_S3": s3.url,
            "JOURNEY_API_KEY": api_key,
            "JOURNEY_BASE_URL": emulator.url,
            "JOURNEY_WEBHOOK_URL": f"{receiver.url}{WEBHOOK_PATH}",
            "JOURNEY_WEBHOOK_SECRET": secret,
            "JOURNEY_RECOVERY_WINDOW": str(RECOVERY_WINDOW),
            "JOURNEY_LOCK_LEASE_SECONDS": str(LOCK_LEASE_SECONDS),
            **shared,
        }
        workers = [worker(index, folder, worker_env) for index in range(sizes.workers)]
        for machine in workers:
            stack.enter_context(running(machine))
        yield Shape(
            api=api,
            s3=s3.url,
            emulator=emulator.url,
            redis=redis,
            workers=workers,
            database=database,
            server_log=server_home / "server.log",
        )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run(sizes: Sizes, folder: Path) -> Tally:
    """Start the shape in ``folder`` and run every scenario on it."""
    tally = Tally({"workers": sizes.workers})
    with production_shape(sizes, folder) as shape:
        for scenario in SCENARIOS:
            shape.reset()
            scenario(shape, sizes, tally)
    return tally


def main(argv: list[str] | None = None) -> int:
    """Run ``make scale``; 0 if every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=int, default=20, help="images both campaigns share")
    parser.add_argument("--own", type=int, default=15, help="images of each campaign's own")
    parser.add_argument("--workers", type=int, default=2, help="worker machines (at least 2)")
    parser.add_argument("--limit", type=int, default=4, help="the global concurrency limit K")
    parser.add_argument("--max-concurrency", type=int, default=8, help="calls in flight a run")
    parser.add_argument(
        "--time-scale", type=float, default=0.25, help="the emulator's (1: 8 s an image)"
    )
    parser.add_argument(
        "--redis-down", type=float, default=5.0, help="seconds Redis stays down (at most)"
    )
    parser.add_argument(
        "--no-redis",
        action="store_true",
        help="no Redis: each machine locks images and keeps budgets on its own disk "
        "(the checks that need Redis fail; the Redis restart is not run)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs even if all passed")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2")
    sizes = Sizes(
        args.shared,
        args.own,
        args.workers,
        args.limit,
        args.max_concurrency,
        args.time_scale,
        args.redis_down,
        redis=not args.no_redis,
    )
    folder = Path(tempfile.mkdtemp(prefix="journey-scale-"))
    try:
        tally = run(sizes, folder)
    except BaseException:
        print(f"make scale stopped; the parts' logs are in {folder}/logs", file=sys.stderr)
        raise
    print(tally.line(), flush=True)
    for name, _, seen in tally.failed:
        print(f"check {name} failed: {seen}", file=sys.stderr)
    if tally.failed or args.keep:
        print(f"the parts' logs are in {folder}/logs", file=sys.stderr)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
