"""A campaign run from its checked plan to its report: what every flow of the package does
after reading its parameters (``batch_campaign``, ``generate_and_store``,
``character_series``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from prefect import get_run_logger

from prefect_journey import policy
from prefect_journey.attempts import check_shared_setup
from prefect_journey.budget import CreditBudget
from prefect_journey.campaigns.executor import log_grouping, run_items
from prefect_journey.campaigns.pipeline import (
    Campaign,
    CampaignReport,
    Lookup,
    check_budget,
    look_up,
    preflight,
    price,
    report,
    sweep_attempt_records,
)
from prefect_journey.campaigns.plan import CampaignItem, plan_items
from prefect_journey.campaigns.progress import campaign_progress
from prefect_journey.credentials import load_credentials
from prefect_journey.errors import JourneyValidationError
from prefect_journey.gate import concurrency_limit_exists
from prefect_journey.models import CREDITS_PER_IMAGE, display_text
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
    plan, campaign_run, found, todo = _prepare(
        rows,
        campaign=campaign,
        destination=destination,
        key_template=key_template,
        variant=variant,
        credentials_block=credentials_block,
        webhook_block=webhook_block,
        overwrite=overwrite,
        repay_possibly_billed=repay_possibly_billed,
        max_pause=max_pause,
    )
    logger = get_run_logger()
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


class _Prepared(NamedTuple):
    plan: list[CampaignItem]
    campaign: Campaign
    found: Lookup
    todo: list[CampaignItem]


def _prepare(
    rows: list[dict[str, Any]],
    *,
    campaign: str,
    destination: Destination,
    key_template: str,
    variant: str,
    credentials_block: str | None,
    webhook_block: str | None,
    overwrite: bool,
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
    max_pause: float = policy.RETRY_AFTER_CAP,
) -> _Prepared:
    """A run's plan, its shared parts and what earlier runs did, all before any call: what
    a run and its quote have in common."""
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
    found = look_up(plan, campaign_run)
    todo = [item for item in plan if item.row not in found.settled]
    return _Prepared(plan, campaign_run, found, todo)


@dataclass(frozen=True)
class CampaignQuote:
    """What a campaign run would do and cost, found without a call to the API.

    Attributes:
        campaign: The campaign's name.
        items: Rows in the sheet, every one valid.
        stored_before: Items an earlier run stored (free, nothing to do).
        refused: Items whose keys hold other objects (they would fail before their call).
        cache_hits: Items to store again from an image an earlier run paid for (free).
        to_generate: Items that would be paid for.
        credits: The most the run can cost.
        budget_limit: ``max_credits``; None for no budget.
        budget_left: What is left of the budget before the run; None for no budget.
    """

    campaign: str
    items: int
    stored_before: int
    refused: int
    cache_hits: int
    to_generate: int
    credits: int
    budget_limit: int | None
    budget_left: int | None

    def summary(self) -> str:
        """What a person reads before deciding to run it.

        Returns:
            A few lines of plain text.
        """
        lines = [
            f"campaign {display_text(self.campaign)}: {self.items} items, every row valid",
            f"  stored by an earlier run: {self.stored_before}",
            f"  to store from an image already paid for: {self.cache_hits}",
            f"  to generate: {self.to_generate}, up to {self.credits} credits "
            f"({CREDITS_PER_IMAGE} an image)",
        ]
        if self.refused:
            lines.append(
                f"  refused, their keys hold other objects: {self.refused} "
                "(overwrite to replace them)"
            )
        if self.budget_limit is not None:
            lines.append(f"  budget: {self.budget_left} of max_credits={self.budget_limit} left")
        return "\n".join(lines)


def quote_campaign(
    rows: list[dict[str, Any]],
    *,
    campaign: str,
    destination: Destination,
    key_template: str,
    variant: str,
    credentials_block: str | None = None,
    webhook_block: str | None = None,
    overwrite: bool = False,
    max_credits: int | None = None,
    partial_budget: bool = False,
    budget_name: str | None = None,
) -> CampaignQuote:
    """Check and price a campaign as :func:`run_campaign` would, making no call and storing
    nothing: every row is checked, the settings, blocks and destination are loaded, earlier
    runs' images and objects are looked up, and the cost is held against the budget.

    The account's balance is not read (that is a call); the run checks it before paying.

    Args:
        rows: The items, as mappings.
        campaign: The campaign's name.
        destination: Where the images would go (checked reachable by the caller).
        key_template: Each object's key.
        variant: The resolved variant.
        credentials_block: A saved ``JourneyCredentials``, loaded to check it exists.
        webhook_block: A saved ``JourneyWebhookReceiver``, loaded to check it.
        overwrite: The run would replace the objects at its keys.
        max_credits: The campaign's credit budget; None for none.
        partial_budget: The run would spend what is left instead of refusing.
        budget_name: The budget's name; None for the campaign's.

    Returns:
        The quote.

    Raises:
        CampaignError: Bad rows (every one listed).
        BudgetExceededError: The run would be refused by its budget.
    """
    prepared = _prepare(
        rows,
        campaign=campaign,
        destination=destination,
        key_template=key_template,
        variant=variant,
        credentials_block=credentials_block,
        webhook_block=webhook_block,
        overwrite=overwrite,
    )
    budget = CreditBudget.for_campaign(budget_name or campaign, max_credits)
    cost = price(prepared.todo, prepared.found.generated)
    check_budget(cost, budget, partial_budget=partial_budget)
    return CampaignQuote(
        campaign=campaign,
        items=len(prepared.plan),
        stored_before=len(prepared.found.finished),
        refused=len(prepared.found.refused),
        cache_hits=len(prepared.todo) - cost // CREDITS_PER_IMAGE,
        to_generate=cost // CREDITS_PER_IMAGE,
        credits=cost,
        budget_limit=budget.limit,
        budget_left=budget.snapshot()["left"] if budget.limit is not None else None,
    )
