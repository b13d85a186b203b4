"""Variants: a short label in an image's cache key, so the same request can buy a new image
(a date, "v2") while a re-run of the same variant costs nothing."""

from __future__ import annotations

from datetime import UTC

from prefect.runtime import flow_run

from prefect_journey.errors import JourneyValidationError

# A variant is a label (a date, "v2"), not a payload.
MAX_VARIANT_CHARS = 200


def check_variant(variant: str) -> str:
    """``variant`` if it is a short string.

    Args:
        variant: A label that is part of the cache key.

    Returns:
        ``variant``, unchanged.

    Raises:
        JourneyValidationError: Not a string, or longer than :data:`MAX_VARIANT_CHARS`.
    """
    if not isinstance(variant, str) or len(variant) > MAX_VARIANT_CHARS:
        raise JourneyValidationError(
            f"variant must be a string of at most {MAX_VARIANT_CHARS} characters"
        )
    return variant


# A deployment's parameters are fixed, yet a daily schedule wants a new image per day: this
# placeholder in a variant becomes the run's scheduled date, so a re-run of the same day hits
# the cache.
SCHEDULED_DATE = "{scheduled_date}"


def resolve_variant(variant: str) -> str:
    """``variant`` with :data:`SCHEDULED_DATE` replaced by the flow run's scheduled date (UTC).

    Args:
        variant: A label that may contain ``{scheduled_date}``.

    Returns:
        The label for this run.

    Example:
        ``resolve_variant("daily-{scheduled_date}")`` is ``"daily-2026-12-02"`` in a run
        scheduled for that day.
    """
    if SCHEDULED_DATE not in variant:
        return variant
    scheduled = flow_run.scheduled_start_time.astimezone(UTC).date().isoformat()
    return variant.replace(SCHEDULED_DATE, scheduled)
