"""How a run shows in Prefect: log lines, image artifacts, events, summary tables, progress.

Every text that comes from a user (a prompt, a campaign name) goes through
:func:`~prefect_journey.models.display_text` before it reaches a log line, a run name or an
artifact, so what the UI shows is printable. Nothing here is ever given a key or a secret.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import ImageArtifact, create_markdown_artifact
from prefect.events import emit_event
from prefect.exceptions import MissingContextError

from prefect_journey.errors import StorageError
from prefect_journey.models import ImagineResult, display_text
from prefect_journey.storage import Destination, StoredImage, presign

# The widths of a prompt where it is shown: a run name, a table cell, an artifact's text, an
# event payload (data for automations, so longer).
RUN_NAME_PROMPT_CHARS = 50
TABLE_PROMPT_CHARS = 80
DESCRIPTION_PROMPT_CHARS = 200
EVENT_PROMPT_CHARS = 500
STORED_EVENT = "journey.image.stored"
# A progress update is one API call: at most one a second, whatever the campaign's size.
PROGRESS_INTERVAL = 1.0

Logger = logging.LoggerAdapter[Any] | logging.Logger


def progress_key(campaign_slug: str) -> str:
    """The key of a campaign's progress artifact (one history per campaign).

    Args:
        campaign_slug: The campaign's slug.

    Returns:
        ``"<campaign_slug>-progress"``.
    """
    return f"{campaign_slug}-progress"


def run_logger(fallback: str) -> Logger:
    """The current run's logger; outside a run (a plain function call), the standard logger.

    Args:
        fallback: The name of the standard logger to use outside a run.

    Returns:
        The logger.
    """
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)


def log_generation(logger: Logger, result: ImagineResult) -> ImagineResult:
    """The log line of one finished generation (never the key); returns ``result``.

    Args:
        logger: The run's logger.
        result: The generation to report.

    Returns:
        ``result``, unchanged.
    """
    # Host and pid say which worker made the call when a campaign is spread over processes.
    logger.info(
        "task_id=%s latency=%.1fs credits=%d attempts=%d possibly_billed_retries=%d "
        "recovered=%s worker=%s/%d",
        result.task_id,
        result.elapsed_seconds,
        result.credits_charged,
        result.attempts,
        result.possibly_billed_attempts,
        "yes" if result.recovered else "no",
        socket.gethostname(),
        os.getpid(),
    )
    return result


def log_stored(stored: StoredImage) -> None:
    """The run's log line of one stored image.

    Args:
        stored: The object written.
    """
    get_run_logger().info(
        "stored task_id=%s at %s (%s %dx%d, %d bytes, sha256 %s%s)",
        stored.task_id,
        stored.uri,
        stored.format,
        stored.width,
        stored.height,
        stored.bytes,
        stored.sha256[:12],
        "" if stored.created else ", already there",
    )


def emit_stored_event(stored: StoredImage, prompt: str, campaign: str | None = None) -> None:
    """Emit ``journey.image.stored`` (resource ``journey.image.<task_id>``) for automations.

    Args:
        stored: The object written.
        prompt: The prompt that made it.
        campaign: The campaign it belongs to, if any.
    """
    emit_event(
        STORED_EVENT,
        resource={
            "prefect.resource.id": f"journey.image.{stored.task_id}",
            "prefect.resource.name": stored.uri,
        },
        payload={
            **stored.model_dump(),
            "prompt": display_text(prompt, EVENT_PROMPT_CHARS),
            "campaign": campaign,
        },
    )


def browser_url(stored: StoredImage, destination: Destination, result: ImagineResult) -> str:
    """A URL the Prefect UI can display for a stored image.

    Args:
        stored: The object written.
        destination: Where it was written; its storage options sign the link.
        result: The generation that made it; its CDN URL is the fallback.

    Returns:
        A presigned link to the stored object when the store can sign (an http(s) URI
        passes through), else the provider's CDN URL (valid for 14 days). A local file
        (``file://``) always gets the CDN URL.
    """
    if not stored.uri.startswith("file://"):
        try:
            return presign(stored.uri, destination.storage_options)
        except (StorageError, NotImplementedError, ValueError):
            pass
    return result.image_url


def image_artifact(
    stored: StoredImage, result: ImagineResult, destination: Destination, prompt: str
) -> ImageArtifact:
    """One stored image's artifact, to ``create()`` (or, in async code, ``acreate()``).

    Args:
        stored: The object written.
        result: The generation that made it.
        destination: Where it was written (signs the link the UI shows).
        prompt: The prompt that made it.

    Returns:
        The artifact, not yet created.
    """
    return ImageArtifact(
        image_url=browser_url(stored, destination, result),
        description=(
            f"{display_text(prompt, DESCRIPTION_PROMPT_CHARS)}\n\n"
            f"{stored.uri} ({stored.width}x{stored.height} {stored.format})"
        ),
    )


def report_image(
    stored: StoredImage, result: ImagineResult, destination: Destination, prompt: str
) -> None:
    """Create the image artifact of one stored image: :func:`image_artifact`, same arguments."""
    image_artifact(stored, result, destination, prompt).create()


def summary_table(rows: Iterable[dict[str, Any]]) -> str:
    """Render rows (dicts with the same keys) as a markdown table.

    Args:
        rows: One dict per row; the first row's keys are the columns.

    Returns:
        The table, or ``_nothing to report_`` without rows.
    """
    rows = list(rows)
    if not rows:
        return "_nothing to report_"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (
            display_text(str(row.get(column, "")), 10_000).replace("|", "\\|") for column in columns
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def image_row(prompt: str, result: ImagineResult, stored: StoredImage) -> dict[str, Any]:
    """One stored image as a row of a summary table.

    Args:
        prompt: The prompt that made it; shortened to a printable line of
            :data:`TABLE_PROMPT_CHARS` characters.
        result: The generation that made it.
        stored: The object written.

    Returns:
        The row: ``prompt``, ``task_id``, ``latency_s``, ``credits``, ``uri``, ``size``
        (``WxH``), ``format`` and the first 16 hex digits of ``sha256``.
    """
    return {
        "prompt": display_text(prompt, TABLE_PROMPT_CHARS),
        "task_id": result.task_id,
        "latency_s": f"{result.elapsed_seconds:.1f}",
        "credits": result.credits_charged,
        "uri": stored.uri,
        "size": f"{stored.width}x{stored.height}",
        "format": stored.format,
        "sha256": stored.sha256[:16],
    }


def publish_summary(
    title: str,
    rows: Sequence[dict[str, Any]],
    failures: Sequence[str] = (),
    key: str | None = None,
    not_repaid: Sequence[str] = (),
) -> None:
    """A markdown artifact with a table of images, a list of failures and, apart, the images
    left possibly billed and not paid again; and a log line.

    Args:
        title: The artifact's heading and description.
        rows: Rows of :func:`summary_table`, usually from :func:`image_row`.
        failures: One line per failure with a known outcome.
        key: The artifact key, to keep its history across runs.
        not_repaid: One line per image whose last attempt may have been billed and was not
            paid again (``repay_possibly_billed`` used up).
    """
    title = display_text(title, DESCRIPTION_PROMPT_CHARS)
    body = [f"# {title}", "", summary_table(rows)]
    for heading, lines in (("Failed", failures), ("Possibly billed, not repaid", not_repaid)):
        if lines:
            body += ["", f"## {heading}", "", *(f"- {display_text(f, 10_000)}" for f in lines)]
    create_markdown_artifact("\n".join(body), key=key, description=title)
    get_run_logger().info(
        "%s: %d stored, %d failed, %d possibly billed and not repaid",
        title,
        len(rows),
        len(failures),
        len(not_repaid),
    )
