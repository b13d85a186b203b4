"""How a run shows in Prefect: log lines, image artifacts, events, assets, progress.

Every text that comes from a user (a prompt, a campaign name) goes through
:func:`~prefect_journey.models.display_text` before it reaches a log line, a run name or an
artifact, so what the UI shows is printable. Nothing here is ever given a key or a secret.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import ImageArtifact, create_markdown_artifact
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.events import emit_event
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run as prefect_flow_run

from prefect_journey._compat import call_sync
from prefect_journey.errors import StorageError
from prefect_journey.models import ImagineResult, display_text
from prefect_journey.storage import Destination, StoredImage, presign, slugify
from prefect_journey.storage.thumbnails import read_thumbnail

# The widths of a prompt where it is shown: a run name, a table cell, an artifact's text, an
# event payload (data for automations, so longer).
RUN_NAME_PROMPT_CHARS = 50
DESCRIPTION_PROMPT_CHARS = 200
EVENT_PROMPT_CHARS = 500
STORED_EVENT = "journey.image.stored"
# A progress update is one API call: at most one a second, whatever the campaign's size.
PROGRESS_INTERVAL = 1.0
# A campaign's gallery: its first images, in a grid; the rest are one link away.
GALLERY_SIZE = 24
GALLERY_COLUMNS = 3
GALLERY_PROMPT_CHARS = 60

Logger = logging.LoggerAdapter[Any] | logging.Logger


def flow_run_name(label: str, parameter: str, size: str | None = None) -> Callable[[], str]:
    """A ``flow_run_name`` for Prefect: ``label``, the run's ``parameter`` and its size,
    printable and short, so a run reads as what it does in the UI (not a random
    "cyber-shark").

    Args:
        label: What the run is ("campaign", "image", ...).
        parameter: The flow parameter that names it.
        size: The list parameter whose length is the run's size ("12 items"); a campaign
            read from a file shows the file's name instead. None for no size.

    Returns:
        A function Prefect calls when the run starts.
    """

    def name() -> str:
        parameters = prefect_flow_run.parameters
        value = display_text(str(parameters.get(parameter) or "?"), RUN_NAME_PROMPT_CHARS)
        if size is None:
            return f"{label}: {value}"
        items = parameters.get(size)
        if isinstance(items, list):
            return f"{label}: {value} · {len(items)} {size}"
        source = str(parameters.get("source") or "").rstrip("/").rsplit("/", 1)[-1]
        return f"{label}: {value} · {display_text(source, RUN_NAME_PROMPT_CHARS)}"

    return name


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
    stored: StoredImage, link: str, prompt: str, thumbnail: str | None = None
) -> ImageArtifact:
    """One stored image's artifact, to ``create()`` (or, in async code, ``acreate()``).

    Args:
        stored: The object written.
        link: Where a browser opens the image (:func:`browser_url`).
        prompt: The prompt that made it.
        thumbnail: Its thumbnail (:func:`~prefect_journey.storage.thumbnails.read_thumbnail`),
            shown in place of a link that expires; None shows the link.

    Returns:
        The artifact, not yet created: the picture, then the prompt, the object and, with
        a thumbnail, the link to the full-size image while it lasts.
    """
    description = (
        f"{display_text(prompt, DESCRIPTION_PROMPT_CHARS)}\n\n"
        f"{stored.uri} ({stored.width}x{stored.height} {stored.format})"
    )
    if thumbnail is not None:
        description += f"\n\n[full size]({link}) (a link that expires; the picture stays)"
    return ImageArtifact(image_url=thumbnail or link, description=description)


def report_image(
    stored: StoredImage, result: ImagineResult, destination: Destination, prompt: str
) -> None:
    """Create the image artifact of one stored image, with its thumbnail
    (:func:`image_artifact`).

    Args:
        stored: The object written.
        result: The generation that made it (its CDN URL is the link's fallback).
        destination: Where it was written (signs the link, reads the thumbnail).
        prompt: The prompt that made it.
    """
    link = browser_url(stored, destination, result)
    image_artifact(stored, link, prompt, read_thumbnail(stored, destination)).create()


@dataclass(frozen=True)
class GalleryEntry:
    """One picture of a campaign's gallery: its row, prompt, thumbnail and link."""

    row: int
    prompt: str
    thumbnail: str
    link: str


def publish_gallery(
    name: str, entries: Sequence[GalleryEntry], stored: int, rest: str | None
) -> None:
    """The campaign's gallery: a markdown artifact (key ``<name>-gallery``, so its history
    stays across runs) with a thumbnail and a link for each of the first
    :data:`GALLERY_SIZE` images the run stored, and where to find the rest; none for a run
    that stored fewer than two.

    Args:
        name: The campaign's name.
        entries: The first images the run stored, at most :data:`GALLERY_SIZE`.
        stored: Images the run stored in all.
        rest: A link to the run's artifacts in the UI; None when not known.
    """
    if stored < 2 or not entries:  # one image is its own artifact
        return
    title = f"campaign {display_text(name)}"
    # A picture inside a link is not drawn by the UI's markdown: the link is the caption.
    cells = [
        f"![row {e.row}]({e.thumbnail})<br>[row {e.row}]({e.link}): "
        f"{_cell(display_text(e.prompt, GALLERY_PROMPT_CHARS))}"
        for e in entries
    ]
    rows = [cells[i : i + GALLERY_COLUMNS] for i in range(0, len(cells), GALLERY_COLUMNS)]
    table = "\n".join(
        ["| " + " | ".join([""] * GALLERY_COLUMNS) + " |"]
        + ["|" + "---|" * GALLERY_COLUMNS]
        + ["| " + " | ".join(r + [""] * (GALLERY_COLUMNS - len(r))) + " |" for r in rows]
    )
    shown = f"{len(entries)} of the {stored} images this run stored"
    more = ""
    if stored > len(entries):
        where = f"[the run's artifacts]({rest})" if rest else "the run's artifacts"
        more = f" The rest are in {where} and in the summary table `{slugify(name)}-summary`."
    markdown = f"### {title}\n\n{shown}; a row links to its full-size image.{more}\n\n{table}\n"
    call_sync(
        create_markdown_artifact,
        markdown,
        key=f"{slugify(name)}-gallery",
        description=f"{title}: {shown}",
    )


def run_artifacts_url() -> str | None:
    """The current flow run's artifacts in the Prefect UI; None outside a run or without a
    UI URL (``PREFECT_UI_URL``)."""
    url = prefect_flow_run.ui_url
    return f"{url}?tab=Artifacts" if url else None


def _cell(text: str) -> str:
    """``text`` inside a markdown table cell: its pipes and brackets do not end the cell or
    open a link."""
    return "".join("\\" + c if c in "|[]()*_`<>" else c for c in text)


def declare_assets(images: Sequence[tuple[StoredImage, str]]) -> None:
    """Declare stored objects (with their prompts) as Prefect assets materialized by the
    current flow run, all in one task run.

    An object's key is only known after its bytes arrive (the extension comes from them),
    so the materializing task is built here rather than decorated in advance. A URI that
    is not a valid asset key (a local path with spaces) is logged and skipped.

    Args:
        images: Each stored object with the prompt that made it.
    """
    assets: list[tuple[Asset, StoredImage]] = []
    for stored, prompt in images:
        try:
            asset = Asset(
                key=stored.uri,
                properties=AssetProperties(
                    name=stored.uri.rsplit("/", 1)[-1],
                    description=(
                        display_text(prompt, DESCRIPTION_PROMPT_CHARS) if prompt else None
                    ),
                ),
            )
        except ValueError as exc:
            get_run_logger().warning("not declaring %s as an asset: %s", stored.uri, exc)
            continue
        assets.append((asset, stored))
    if not assets:
        return

    def record() -> None:
        for asset, stored in assets:
            add_asset_metadata(asset, stored.model_dump(exclude={"uri"}))

    first = assets[0][0].properties
    more = f" and {len(assets) - 1} more" if len(assets) > 1 else ""
    materialize(
        *(asset for asset, _ in assets),
        by="prefect-journey",
        name="journey-declare-assets",
        task_run_name=f"assets: {first.name if first else '?'}{more}",
    )(record)()
