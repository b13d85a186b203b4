"""A campaign run from its checked plan to its report: what every flow of the package does
after reading its parameters (``batch_campaign``, ``generate_and_store``,
``character_series``)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from prefect_journey import policy
from prefect_journey.attempts import check_shared_setup
from prefect_journey.budget import CreditBudget
from prefect_journey.campaigns.executor import log_grouping, run_items
from prefect_journey.campaigns.pipeline import (
    Campaign,
    CampaignReport,
    look_up,
    preflight,
    report,
    sweep_attempt_records,
)
from prefect_journey.campaigns.plan import plan_items
from prefect_journey.campaigns.progress import campaign_progress
from prefect_journey.credentials import load_credentials
from prefect_journey.errors import JourneyValidationError
from prefect_journey.gate import concurrency_limit_exists
from prefect_journey.models import display_text
from prefect_journey.receiver import load_receiver
from prefect_journey.redis_block import apply_redis_block
from prefect_journey.storage import Destination

# The Prefect global concurrency limit a campaign uses when it exists (create it once per
# workspace to share one bound between every flow that calls the API).
DEFAULT_CONCURRENCY_LIMIT = "journey-imagine"
# Calls in flight per run when the flow is not told otherwise.
DEFAULT_MAX_CONCURRENCY = 8


def check_run_options(
    *,
    max_concurrency: int,
    images_per_task_run: int | None,
    repay_possibly_billed: int,
    max_pause: float,
) -> None:
    """Refuse run options that cannot work, before anything is read or spent.

    Args:
        max_concurrency: Calls in flight at most; at least 1.
        images_per_task_run: Images per task run; None (chosen by the run) or at least 1.
        repay_possibly_billed: Repays of a possibly-billed failure, 0 to 5.
        max_pause: The longest ``Retry-After`` waited for; not negative.

    Raises:
        JourneyValidationError: The first option that is out of range.
    """
    if max_concurrency < 1:
        raise JourneyValidationError("max_concurrency must be at least 1")
    if images_per_task_run is not None and images_per_task_run < 1:
        raise JourneyValidationError("images_per_task_run must be at least 1")
    if max_pause < 0:
        raise JourneyValidationError("max_pause cannot be negative")
    policy.check_repay_possibly_billed(repay_possibly_billed)


def run_campaign(
    rows: list[dict[str, Any]],
    *,
    campaign: str,
    destination: Destination,
    key_template: str,
    variant: str,
    credentials_block: str | None,
    webhook_block: str | None,
    overwrite: bool,
    repay_possibly_billed: int,
    max_pause: float,
    max_concurrency: int,
    concurrency_limit: str | None = DEFAULT_CONCURRENCY_LIMIT,
    max_credits: int | None = None,
    partial_budget: bool = False,
    allow_failures: bool = False,
    images_per_task_run: int | None = None,
    budget_name: str | None = None,
) -> CampaignReport:
    """What every flow does once it has its rows and its destination: plan them (every row
    checked before any call), load the credentials and the receiver, look up what earlier
    runs did, price the rest against the budget and the balance, run it and report.

    Args:
        rows: The items, as mappings (``prompt``; optional ``references``,
            ``aspect_ratio``, ``resolution``; other fields feed the key template).
        campaign: The campaign's name.
        destination: Where the images go.
        key_template: Each object's key.
        variant: The resolved variant, part of every cache key.
        credentials_block: A saved ``JourneyCredentials``; None for ``JOURNEY_API_KEY``.
        webhook_block: A saved ``JourneyWebhookReceiver``; None reads the environment.
        overwrite: Replace the objects at the run's keys.
        repay_possibly_billed: Repays of a possibly-billed failure.
        max_pause: The longest ``Retry-After`` waited for.
        max_concurrency: Calls (and stores) in flight.
        concurrency_limit: A Prefect global concurrency limit, used when it exists.
        max_credits: The campaign's credit budget, over all its runs (its earlier runs'
            spending counts); None counts without refusing.
        partial_budget: Run until ``max_credits`` is spent instead of refusing to start.
        allow_failures: Return the report even if some items were not stored.
        images_per_task_run: Images per task run; None lets the run choose.
        budget_name: The budget's name; None for the campaign's.

    Returns:
        The report.

    Raises:
        CampaignError: Bad rows (every one listed), before any call.
        ConfigurationError: ``JOURNEY_REDIS_URL`` is set while the result storage is local
            to the worker, before any call.
        RedisUnavailableError: ``JOURNEY_REDIS_URL``'s Redis does not answer, before any
            call.
        BudgetExceededError: The campaign could cost more than ``max_credits``.
        InsufficientCreditsError: More than the account's balance.
        CampaignFailedError: Some items were not stored (unless ``allow_failures``).
    """
    plan = plan_items(rows, campaign=campaign, key_template=key_template, variant=variant)
    apply_redis_block()  # JOURNEY_REDIS_BLOCK: before anything reads the Redis settings
    check_shared_setup()  # fails before spending
    campaign_run = Campaign(
        campaign,
        destination,
        key_template,
        variant,
        load_credentials(credentials_block),
        receiver=load_receiver(webhook_block),  # fails before spending
        overwrite=overwrite,
        repay_possibly_billed=repay_possibly_billed,
        max_pause=max_pause,
    )
    logger = get_run_logger()
    found = look_up(plan, campaign_run)
    todo = [item for item in plan if item.row not in found.settled]
    if found.finished:
        logger.info("%d of %d items were stored by an earlier run", len(found.finished), len(plan))
    if found.refused:
        logger.warning(
            "%d of %d items fail before their call: their keys hold other objects (pass "
            "overwrite=True to replace them, or use another key template)",
            len(found.refused),
            len(plan),
        )
    # The campaign's budget, as its earlier runs left it: max_credits bounds the campaign.
    budget = CreditBudget.for_campaign(budget_name or campaign, max_credits)
    preflight(
        todo,
        found.generated,
        credentials=campaign_run.credentials,
        budget=budget,
        partial_budget=partial_budget,
    )
    limit = concurrency_limit if todo and concurrency_limit_exists(concurrency_limit) else None
    if todo and concurrency_limit and limit is None:
        logger.info(
            "no global concurrency limit %r: bounded by max_concurrency=%d",
            display_text(concurrency_limit),
            max_concurrency,
        )
    campaign_run = campaign_run.with_run(
        budget=budget,
        concurrency_limit=limit,
        restore=frozenset(found.restore),
    )
    outcomes = list(found.settled.values())
    with campaign_progress(campaign, len(plan), outcomes, campaign_run.budget) as progress:
        if todo:
            outcomes += run_items(
                todo,
                campaign_run,
                max_concurrency=max_concurrency,
                images_per_task_run=log_grouping(len(todo), max_concurrency, images_per_task_run),
                progress=progress,
            )
    if campaign_run.receiver is not None:
        sweep_attempt_records(logger)
    return report(campaign_run, len(plan), outcomes, allow_failures=allow_failures)
