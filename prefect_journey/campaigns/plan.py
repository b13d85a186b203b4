"""Campaign input: read items from a list or a CSV/JSONL file and check every one of them
before anything is spent. Plain Python; the campaign pipeline builds on it.

An item has a ``prompt`` and optionally ``references`` (a list, or in CSV a string split on
``|`` or whitespace), ``aspect_ratio`` and ``resolution``. Any other field is available to
the key template, next to ``campaign``, ``index`` (the 1-based row), ``slug`` (from the
prompt) and ``ext`` (from the image bytes).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from prefect_journey.errors import JourneyValidationError
from prefect_journey.models import ImagineRequest
from prefect_journey.storage import check_key_template, render_key, slugify

# A campaign's objects sit under its name, in row order: a listing reads like the sheet.
CAMPAIGN_KEY_TEMPLATE = "{campaign}/{index:04d}-{slug}.{ext}"
# A campaign file is a list of prompts; past this it is almost certainly the wrong file.
MAX_CAMPAIGN_BYTES = 50 * 1024 * 1024
MAX_ITEMS = 100_000
_REQUEST_FIELDS = ("prompt", "references", "aspect_ratio", "resolution")
_RESERVED_FIELDS = ("campaign", "index", "slug", "ext", "task_id", "variant")


class CampaignError(JourneyValidationError):
    """The campaign input is unusable; ``problems`` lists each bad row."""


@dataclass(frozen=True)
class CampaignItem:
    """One validated item: its row, its request and the fields of its object key."""

    row: int
    request: ImagineRequest
    key_fields: dict[str, Any] = field(default_factory=dict)


def read_items(
    source: str, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` or ``.jsonl`` file at a local path or any fsspec URL.

    Args:
        source: The file (``.csv``, ``.jsonl`` or ``.ndjson``).
        storage_options: fsspec options for a remote file.

    Returns:
        One dict per row, unchecked (see :func:`plan_items`).

    Raises:
        CampaignError: The file cannot be read, is too large, not UTF-8 or not the format
            its name says.
    """
    lowered = source.lower()
    if not lowered.endswith((".csv", ".jsonl", ".ndjson")):
        raise CampaignError(f"campaign file {source!r} must end with .csv or .jsonl")
    try:
        with fsspec.open(source, "rb", **dict(storage_options or {})) as handle:
            data = handle.read(MAX_CAMPAIGN_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise CampaignError(f"cannot read campaign file {source!r}: {exc}") from None
    if len(data) > MAX_CAMPAIGN_BYTES:
        raise CampaignError(f"campaign file {source!r} is larger than {MAX_CAMPAIGN_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CampaignError(f"campaign file {source!r} is not UTF-8 text") from None
    return _parse_csv(text, source) if lowered.endswith(".csv") else _parse_jsonl(text, source)


def _parse_csv(text: str, source: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "prompt" not in columns:
        raise CampaignError(
            f"{source}: no 'prompt' column (columns: {', '.join(columns) or 'none'})"
        )
    rows = []
    for raw in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if None in raw:
            row["__extra__"] = "more cells than columns"
        rows.append(row)
    return rows


def _parse_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg})")
            continue
        if not isinstance(value, dict):
            problems.append(f"line {number}: expected an object, got {type(value).__name__}")
            continue
        rows.append(value)
    if problems:
        raise CampaignError(f"{source}: " + "; ".join(problems[:20]), problems=problems)
    return rows


def _references(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part for part in re.split(r"[|\s]+", value) if part]
    if isinstance(value, list):
        return value
    raise ValueError(f"references must be a list or a string, not {type(value).__name__}")


def plan_items(
    rows: Iterable[Mapping[str, Any]],
    *,
    campaign: str,
    key_template: str = CAMPAIGN_KEY_TEMPLATE,
    variant: str = "",
) -> list[CampaignItem]:
    """Validate every row (request rules, key template, key collisions) and report all
    problems at once, each with its row number. Nothing is sent anywhere.

    Args:
        rows: The campaign's items (mappings with ``prompt`` and optional ``references``,
            ``aspect_ratio``, ``resolution`` and key-template fields).
        campaign: The campaign's name (the ``{campaign}`` of the key template, slugified).
        key_template: The object key of each item.
        variant: The run's variant, the ``{variant}`` of the key template (slugified); a
            template without it keeps its keys whatever the variant.

    Returns:
        One checked item per row, in order.

    Raises:
        CampaignError: Lists every bad row.

    Example:
        ```python
        from prefect_journey.campaigns.plan import plan_items

        items = plan_items([{"prompt": "a red chair"}], campaign="spring")
        assert items[0].key_fields["slug"] == "a-red-chair"
        ```
    """
    rows = list(rows)
    if not rows:
        raise CampaignError("the campaign has no items")
    if len(rows) > MAX_ITEMS:
        raise CampaignError(f"the campaign has {len(rows)} items; the limit is {MAX_ITEMS}")
    named = check_key_template(key_template)
    campaign_slug = slugify(campaign)
    # Only a template that names it has it: the fields are part of each store's cache key.
    run_fields = {"campaign": campaign_slug} | (
        {"variant": slugify(variant)} if "variant" in named else {}
    )
    items: list[CampaignItem] = []
    problems: list[str] = []
    keys: dict[str, int] = {}
    for row_number, row in enumerate(rows, start=1):
        try:
            item = _plan_one(row, row_number, run_fields, key_template)
        except (JourneyValidationError, ValueError) as exc:
            detail = (
                "; ".join(exc.problems) if isinstance(exc, JourneyValidationError) else str(exc)
            )
            problems.append(f"row {row_number}: {detail}")
            continue
        key = render_key(key_template, {**item.key_fields, "ext": "png", "task_id": "task"})
        if key in keys:
            problems.append(f"row {row_number}: object key {key!r} repeats row {keys[key]}")
        keys[key] = row_number
        items.append(item)
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise CampaignError(f"{len(problems)} bad campaign item(s): {shown}", problems=problems)
    return items


def _plan_one(
    row: Mapping[str, Any], row_number: int, run_fields: dict[str, str], key_template: str
) -> CampaignItem:
    if not isinstance(row, Mapping):
        raise ValueError(f"expected a mapping, got {type(row).__name__}")
    if "__extra__" in row:
        raise ValueError(str(row["__extra__"]))
    clashing = [name for name in _RESERVED_FIELDS if name in row]
    if clashing:
        raise ValueError(f"field(s) {', '.join(clashing)} are reserved for the key template")
    request = ImagineRequest(
        prompt=row.get("prompt"),
        image_urls=_references(row.get("references")),
        aspect_ratio=row.get("aspect_ratio") or "1:1",
        resolution=row.get("resolution") or None,
    )
    extra = {k: v for k, v in row.items() if k not in _REQUEST_FIELDS}
    key_fields = {
        **{k: slugify(str(v)) for k, v in extra.items()},
        **run_fields,
        "index": row_number,
        "slug": slugify(request.prompt, 40),
    }
    render_key(key_template, {**key_fields, "ext": "png", "task_id": "task"})
    return CampaignItem(row_number, request, key_fields)
