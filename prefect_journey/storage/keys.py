"""Object keys: the template an image's key is rendered from, and the checks every key passes.

A key is relative to its destination's root. It is rendered from a :meth:`str.format`
template whose ``{ext}`` comes from the image's bytes (:func:`render_key`), and refused when
it could escape its prefix or when stores would treat it differently
(:func:`check_object_key`).

This module does not import Prefect.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from prefect_journey.errors import JourneyValidationError

# Object stores cap keys at 1024 bytes (S3, GCS).
MAX_KEY_BYTES = 1024
DEFAULT_KEY_TEMPLATE = "{task_id}.{ext}"
_SAFE_KEY_CHARS = re.compile(r"^[A-Za-z0-9._\-/=+@,:~]+$")


def check_object_key(key: str) -> str:
    """Refuse keys that could escape their prefix or that stores treat differently.

    Args:
        key: A rendered object key, relative to the destination's root.

    Returns:
        ``key``, unchanged.

    Raises:
        JourneyValidationError: The key is empty, starts with ``/``, contains a backslash,
            has an empty, ``.`` or ``..`` segment, has characters outside
            ``A-Za-z0-9._-/=+@,:~``, or is longer than :data:`MAX_KEY_BYTES` bytes.
    """
    if not key or not key.strip():
        raise JourneyValidationError("object key is empty")
    problems = []
    if key.startswith("/"):
        problems.append("starts with '/'")
    if "\\" in key:
        problems.append("contains a backslash")
    if any(part in ("", ".", "..") for part in key.split("/")):
        problems.append("has an empty, '.' or '..' path segment")
    if not _SAFE_KEY_CHARS.match(key):
        problems.append("has characters outside letters, digits and ._-/=+@,:~")
    if len(key.encode()) > MAX_KEY_BYTES:
        problems.append(f"is longer than {MAX_KEY_BYTES} bytes")
    if problems:
        raise JourneyValidationError(f"object key {key!r} " + "; ".join(problems))
    return key


def check_key_template(template: str) -> list[str]:
    """Return the field names of a key template; refuse attribute or index access.

    Args:
        template: A :meth:`str.format` template such as ``"{campaign}/{index:04d}.{ext}"``.

    Returns:
        The names of its fields, in order of appearance.

    Raises:
        JourneyValidationError: The template is malformed, a field is not a plain name
            (``{a.b}``, ``{a[0]}``, ``{}``, ``{0}``), or ``{ext}`` is missing.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise JourneyValidationError(f"key template {template!r} is malformed: {exc}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise JourneyValidationError(
                f"key template {template!r}: field {{{name}}} must be a plain name"
            )
        names.append(name)
    if "ext" not in names:
        raise JourneyValidationError(f"key template {template!r} must contain {{ext}}")
    return names


def render_key(template: str, fields: Mapping[str, Any]) -> str:
    """Fill a key template and check the result.

    Args:
        template: A key template (see :func:`check_key_template`).
        fields: A value for each of the template's fields.

    Returns:
        The object key, checked by :func:`check_object_key`.

    Raises:
        JourneyValidationError: The template is refused, a field has no value, or the
            rendered key is refused.

    Example:
        ```python
        from prefect_journey.storage import render_key

        key = render_key(
            "{campaign}/{index:04d}-{slug}.{ext}",
            {"campaign": "spring", "index": 7, "slug": "a-cat", "ext": "png"},
        )
        assert key == "spring/0007-a-cat.png"
        ```
    """
    missing = [name for name in check_key_template(template) if name not in fields]
    if missing:
        raise JourneyValidationError(f"key template {template!r} needs {', '.join(missing)}")
    return check_object_key(template.format_map(fields))


def slugify(text: str, max_length: int = 60) -> str:
    """A lowercase ASCII slug safe in any object key (``a-cat-in-a-hat``).

    Args:
        text: Free text, such as a prompt.
        max_length: The most characters to keep; 60 by default.

    Returns:
        Runs of anything other than ASCII letters and digits become one ``-``, with none
        at either end; ``"image"`` when nothing is left.

    Example:
        ```python
        from prefect_journey.storage import slugify

        assert slugify("A Cat in a Hat!") == "a-cat-in-a-hat"
        assert slugify("???") == "image"
        ```
    """
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "image"
