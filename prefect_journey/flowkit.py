"""Building blocks the example flows share: loading blocks by name, image artifacts, summaries.

Flow parameters are stored by the Prefect API in clear, so flows take *names* of saved
blocks (``credentials_block``, ``destination_block``) rather than keys or storage options.
Without them, the client reads ``$JOURNEY_API_KEY`` and the destination defaults to
``$JOURNEY_DESTINATION`` or ``./outputs``; s3fs reads the usual ``AWS_*`` variables.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import UTC
from typing import Any, TypeVar, cast

from prefect import get_run_logger
from prefect.artifacts import ImageArtifact, create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from prefect_journey.credentials import JourneyCredentials
from prefect_journey.destinations import ImageDestination, resolve_destination
from prefect_journey.errors import JourneyValidationError, StorageError
from prefect_journey.models import ImagineResult
from prefect_journey.storage import Destination, StoredImage, presign

DESTINATION_ENV = "JOURNEY_DESTINATION"
DEFAULT_DESTINATION = "./outputs"
# A deployment's parameters are fixed, yet a daily schedule wants a new image per day: this
# placeholder becomes the run's scheduled date, so a re-run of the same day hits the cache.
SCHEDULED_DATE = "{scheduled_date}"


R = TypeVar("R")


def call_sync(function: Callable[..., R | Coroutine[Any, Any, R]], *args: Any, **kwargs: Any) -> R:
    """``function(*args, **kwargs)`` on the sync path of one of Prefect's async-dispatching
    functions (``Block.load``, ``create_*_artifact``, ...). Those pick their async variant,
    and return a coroutine, whenever the current run is async, also on a worker thread of
    an async flow run; sync code that may run there (``abatch_campaign``) calls them through
    this. ``_sync=True`` is how Prefect's own engines ask for the sync variant."""
    return cast(R, function(*args, _sync=True, **kwargs))


def resolve_variant(variant: str) -> str:
    """``variant`` with :data:`SCHEDULED_DATE` replaced by the run's scheduled date (UTC)."""
    if SCHEDULED_DATE not in variant:
        return variant
    scheduled = flow_run.scheduled_start_time.astimezone(UTC).date().isoformat()
    return variant.replace(SCHEDULED_DATE, scheduled)


def load_credentials(block_name: str | None) -> JourneyCredentials | None:
    """The named ``JourneyCredentials`` block, or None to use ``$JOURNEY_API_KEY``."""
    if not block_name:
        return None
    return cast(JourneyCredentials, call_sync(JourneyCredentials.load, block_name))


def load_destination(url: str | None, block_name: str | None) -> Destination:
    """A saved ``ImageDestination`` by name, else ``url``, else ``$JOURNEY_DESTINATION``,
    else ``./outputs``; checked reachable, so a bad one fails before any credit is spent."""
    if block_name:
        block = cast(ImageDestination, call_sync(ImageDestination.load, block_name))
        destination = block.as_destination()
    else:
        destination = resolve_destination(
            url or os.environ.get(DESTINATION_ENV) or DEFAULT_DESTINATION
        )
    destination.check()
    return destination


TASK_RUNNER_ENV = "JOURNEY_TASK_RUNNER"
DASK_ADDRESS_ENV = "JOURNEY_DASK_ADDRESS"
DASK_WORKERS_ENV = "JOURNEY_DASK_WORKERS"
# Two worker processes: one per core of a small machine; more on bigger ones via the env var.
DEFAULT_DASK_WORKERS = 2


def task_runner_kind(kind: str | None) -> str:
    """``kind``, else ``$JOURNEY_TASK_RUNNER``, else ``"thread"`` (lower case)."""
    return (kind or os.environ.get(TASK_RUNNER_ENV) or "thread").lower()


def make_task_runner(kind: str | None, workers: int) -> TaskRunner[Any]:
    """``"thread"`` (default, or ``$JOURNEY_TASK_RUNNER``): a pool of ``workers`` threads.
    ``"dask"``: prefect-dask on ``$JOURNEY_DASK_ADDRESS`` or a local cluster of
    ``$JOURNEY_DASK_WORKERS`` processes sharing ``workers`` threads."""
    kind = task_runner_kind(kind)
    if workers < 1:
        raise JourneyValidationError("a task runner needs at least one worker")
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind != "dask":
        raise JourneyValidationError(f"task_runner must be 'thread' or 'dask', not {kind!r}")
    try:
        from prefect_dask.task_runners import DaskTaskRunner
    except ImportError:
        raise JourneyValidationError(
            "task_runner='dask' needs prefect-dask: pip install 'prefect-journey[dask]'"
        ) from None
    address = os.environ.get(DASK_ADDRESS_ENV)
    if address:
        return DaskTaskRunner(address=address)
    processes = min(int(os.environ.get(DASK_WORKERS_ENV, DEFAULT_DASK_WORKERS)), workers)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": processes,
            "processes": True,
            "threads_per_worker": max(1, workers // processes),
            "dashboard_address": None,
        }
    )


def concurrency_limit_exists(name: str | None) -> bool:
    """Whether a Prefect global concurrency limit called ``name`` exists."""
    if not name:
        return False
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def emit_stored_event(stored: StoredImage, prompt: str, campaign: str | None = None) -> None:
    """``journey.image.stored`` with the image's task id as resource, for automations."""
    emit_event(
        "journey.image.stored",
        resource={
            "prefect.resource.id": f"journey.image.{stored.task_id}",
            "prefect.resource.name": stored.uri,
        },
        payload={
            **stored.model_dump(),
            "prompt": prompt[:500],
            "campaign": campaign,
        },
    )


def browser_url(stored: StoredImage, destination: Destination, result: ImagineResult) -> str:
    """A URL the Prefect UI can display: a presigned link to the stored object when the
    store can sign, else the provider's CDN URL (valid for 14 days)."""
    if not stored.uri.startswith("file://"):
        try:
            return presign(stored.uri, destination.storage_options)
        except (StorageError, NotImplementedError, ValueError):
            pass
    return result.image_url


def image_artifact(
    stored: StoredImage, result: ImagineResult, destination: Destination, prompt: str
) -> ImageArtifact:
    """One stored image's artifact, to ``create()`` (or, in async code, ``acreate()``)."""
    return ImageArtifact(
        image_url=browser_url(stored, destination, result),
        description=(
            f"{prompt[:200]}\n\n{stored.uri} ({stored.width}x{stored.height} {stored.format})"
        ),
    )


def report_image(
    stored: StoredImage, result: ImagineResult, destination: Destination, prompt: str
) -> None:
    """An image artifact for one stored image."""
    image_artifact(stored, result, destination, prompt).create()


def summary_table(rows: Iterable[dict[str, Any]]) -> str:
    """Render rows (dicts with the same keys) as a markdown table."""
    rows = list(rows)
    if not rows:
        return "_nothing to report_"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (
            str(row.get(column, "")).replace("|", "\\|").replace("\n", " ") for column in columns
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def image_row(prompt: str, result: ImagineResult, stored: StoredImage) -> dict[str, Any]:
    return {
        "prompt": prompt[:80],
        "task_id": result.task_id,
        "latency_s": f"{result.elapsed_seconds:.1f}",
        "credits": result.credits_charged,
        "uri": stored.uri,
        "size": f"{stored.width}x{stored.height}",
        "format": stored.format,
        "sha256": stored.sha256[:16],
    }


def publish_summary(
    title: str, rows: Sequence[dict[str, Any]], failures: Sequence[str] = (), key: str | None = None
) -> None:
    """A markdown artifact with a table of images and a list of failures."""
    body = [f"# {title}", "", summary_table(rows)]
    if failures:
        body += ["", "## Failed", "", *(f"- {failure}" for failure in failures)]
    create_markdown_artifact("\n".join(body), key=key, description=title)
    get_run_logger().info("%s: %d stored, %d failed", title, len(rows), len(failures))


def failure_reason(future: PrefectFuture[Any]) -> str | None:
    """None if the future completed, else a one-line reason (the error's own message)."""
    future.wait()  # pins the final state; reading .state before can see a stale one
    state = future.state
    if state.is_completed():
        return None
    try:
        future.result()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return state.message or state.type.value
