"""The campaign flows: hundreds of prompts, fanned out under a concurrency limit and a budget.

Everything that can be checked is checked before the first call: every row (with its row
number), every object key, what the campaign can cost (cache hits excluded) against
``max_credits`` and the account's balance. During the run no call starts once spent plus
in-flight credits would pass ``max_credits`` (retries count). One failed item never stops the
others; re-running the campaign redoes only what failed, the rest are cache hits. The steps
live in :mod:`prefect_journey.campaigns.pipeline`; these flow bodies only wire them.

Deploy by module path: ``prefect_journey.flows.campaign:batch_campaign`` (or
``:abatch_campaign``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from prefect import flow

from prefect_journey import policy
from prefect_journey._compat import shared_sync_client
from prefect_journey.campaigns.pipeline import CampaignReport
from prefect_journey.campaigns.plan import CAMPAIGN_KEY_TEMPLATE, read_items
from prefect_journey.campaigns.run import (
    DEFAULT_CONCURRENCY_LIMIT,
    DEFAULT_MAX_CONCURRENCY,
    CampaignQuote,
    check_run_options,
    quote_campaign,
    run_campaign,
)
from prefect_journey.destinations import load_destination, source_storage_options
from prefect_journey.errors import JourneyValidationError
from prefect_journey.publishing import flow_run_name
from prefect_journey.storage import Destination
from prefect_journey.variants import check_variant, resolve_variant

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


@flow(name="batch-campaign", flow_run_name=flow_run_name("campaign", "campaign", "items"))
def batch_campaign(
    items: list[dict[str, Any]] | None = None,
    source: str | None = None,
    source_block: str | None = None,
    campaign: str = "campaign",
    key_template: str = CAMPAIGN_KEY_TEMPLATE,
    destination: str | None = None,
    destination_block: str | None = None,
    credentials_block: str | None = None,
    variant: str = "",
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    concurrency_limit: str | None = DEFAULT_CONCURRENCY_LIMIT,
    max_credits: int | None = None,
    partial_budget: bool = False,
    allow_failures: bool = False,
    images_per_task_run: int | None = None,
    webhook_block: str | None = None,
    overwrite: bool = False,
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
    max_pause: float = policy.RETRY_AFTER_CAP,
    budget_name: str | None = None,
) -> CampaignReport:
    """Generate and store every item of a campaign.

    Args:
        items: The items, as mappings (``prompt``; optional ``references``,
            ``aspect_ratio``, ``resolution``; other fields feed the key template).
        source: Instead of ``items``: a ``.csv`` or ``.jsonl`` file, local or any fsspec URL.
        source_block: A saved block, named as ``destination_block``, whose credentials read
            ``source``. Without it, a ``source`` on the same kind of store as the
            destination (both ``s3://``, ...) is read with the destination's storage options
            (credentials, endpoint); any other with the ambient credentials (environment,
            profile, instance role).
        campaign: The campaign's name (``{campaign}`` in the key template, artifact keys).
        key_template: Each object's key; default ``{campaign}/{index:04d}-{slug}.{ext}``.
        destination: An fsspec URL or folder; default ``JOURNEY_DESTINATION`` or ./outputs.
        destination_block: A saved block (wins over ``destination``): an
            ``ImageDestination``'s name, or ``"<block-type-slug>/<name>"`` for any storage
            block docs/blocks.md lists, such as ``s3-bucket/brand-assets``.
        credentials_block: A saved ``JourneyCredentials``; default ``JOURNEY_API_KEY``.
        variant: Part of every cache key; ``"{scheduled_date}"`` buys new images each day.
        max_concurrency: Calls (and stores) in flight in this run.
        concurrency_limit: A Prefect global concurrency limit shared with other flows, used
            when it exists; ``max_concurrency`` bounds the run either way.
        max_credits: The campaign's credit budget, over all its runs: a re-run, a retry
            of the run and the other runs of the same budget spend from it. Refused before
            any call if it could be passed.
        partial_budget: Run until ``max_credits`` is spent instead of refusing to start.
        allow_failures: Complete the run even if some items failed.
        images_per_task_run: Images per task run: 1 gives every image its own task run;
            more share one (same caching, retries, budget, events and reporting, a fraction
            of the Prefect server's work per image). None (the default) chooses from
            ``max_concurrency`` and logs the choice (docs/campaigns.md).
        webhook_block: A saved ``JourneyWebhookReceiver``: an attempt whose answer is lost
            is recovered from its webhook delivery instead of being bought again; default
            ``JOURNEY_WEBHOOK_URL`` and ``JOURNEY_WEBHOOK_SECRET``, else no recovery.
        overwrite: Replace the objects already at the campaign's keys; by default an item
            whose key holds another request's object fails before its call.
        repay_possibly_billed: How many times an image whose attempt may have been billed
            (read timeout, 500/502/504, dropped or malformed answer: the provider may have
            made and billed it) is paid for again, 0 to 5; default 1. With a webhook
            receiver, only after a recovery window that ended with no delivery. Failures
            that cannot have been billed are retried regardless.
        max_pause: The longest pause, in seconds, the provider's ``Retry-After`` can impose
            on the campaign (every new call waits it out together); a longer one stops the
            campaign's new calls and reports the items left as ``not_started`` (nothing
            billed; a re-run picks them up).
        budget_name: Whose budget ``max_credits`` is; default the campaign's name. Runs
            that name the same budget share it.

    Returns:
        The report: counts, credits, and one outcome per item.

    Raises:
        CampaignError: Bad rows (every one listed), before any call.
        BudgetExceededError: The campaign could cost more than ``max_credits``.
        InsufficientCreditsError: More than the account's balance.
        CampaignFailedError: Some items were not stored (unless ``allow_failures``); an
            item left possibly billed and not repaid is one of them.

    Example:
        ```python
        from prefect_journey.flows import batch_campaign

        report = batch_campaign(
            items=[{"prompt": "a red chair"}, {"prompt": "a blue chair"}],
            campaign="chairs",
            destination="s3://my-bucket/campaigns",
            max_credits=20,
        )
        print(report.ledger_line())
        ```
    """
    check_run_options(
        max_concurrency=max_concurrency,
        images_per_task_run=images_per_task_run,
        repay_possibly_billed=repay_possibly_billed,
        max_pause=max_pause,
    )
    rows, target = _inputs(items, source, source_block, destination, destination_block)
    return run_campaign(
        rows,
        campaign=campaign,
        destination=target,
        key_template=key_template,
        variant=resolve_variant(check_variant(variant)),
        credentials_block=credentials_block,
        webhook_block=webhook_block,
        overwrite=overwrite,
        repay_possibly_billed=repay_possibly_billed,
        max_pause=max_pause,
        max_concurrency=max_concurrency,
        concurrency_limit=concurrency_limit,
        max_credits=max_credits,
        partial_budget=partial_budget,
        allow_failures=allow_failures,
        images_per_task_run=images_per_task_run,
        budget_name=budget_name,
    )


def price_campaign(
    items: list[dict[str, Any]] | None = None,
    source: str | None = None,
    source_block: str | None = None,
    campaign: str = "campaign",
    key_template: str = CAMPAIGN_KEY_TEMPLATE,
    destination: str | None = None,
    destination_block: str | None = None,
    credentials_block: str | None = None,
    variant: str = "",
    max_credits: int | None = None,
    partial_budget: bool = False,
    webhook_block: str | None = None,
    overwrite: bool = False,
    budget_name: str | None = None,
) -> CampaignQuote:
    """What :func:`batch_campaign` would do and cost with the same arguments, found without
    a call to the API and without a flow run: a dry run.

    Everything the flow checks before its first call is checked the same way (every row, the
    key template, the destination, the blocks, the budget); earlier runs' images and objects
    are looked up, so the price leaves out what is already paid for. The account's balance
    is not read. The arguments mean what they mean for :func:`batch_campaign`;
    ``"{scheduled_date}"`` in ``variant`` reads as today (UTC).

    Returns:
        The quote: items, what earlier runs did, what would be paid for, the budget.

    Raises:
        CampaignError: Bad rows (every one listed).
        StorageError: The destination cannot be reached or written.
        BudgetExceededError: The run would be refused by ``max_credits``.

    Example:
        ```python
        from prefect_journey.flows.campaign import price_campaign

        quote = price_campaign(items=[{"prompt": "a red chair"}], destination="./outputs")
        print(quote.summary())
        ```
    """
    rows, target = _inputs(items, source, source_block, destination, destination_block)
    return quote_campaign(
        rows,
        campaign=campaign,
        destination=target,
        key_template=key_template,
        variant=resolve_variant(check_variant(variant)),
        credentials_block=credentials_block,
        webhook_block=webhook_block,
        overwrite=overwrite,
        max_credits=max_credits,
        partial_budget=partial_budget,
        budget_name=budget_name,
    )


def _inputs(
    items: list[dict[str, Any]] | None,
    source: str | None,
    source_block: str | None,
    destination: str | None,
    destination_block: str | None,
) -> tuple[list[dict[str, Any]], Destination]:
    """A campaign's rows and its destination, the destination checked reachable (before
    anything is spent); a sheet is read as ``batch_campaign``'s ``source_block`` says."""
    if (items is None) == (source is None):
        raise JourneyValidationError("pass either items or source")
    if source_block and source is None:
        raise JourneyValidationError("source_block reads source: pass it with source")
    target = load_destination(destination, destination_block)
    if items is None:
        sheet = source or ""
        items = read_items(sheet, source_storage_options(sheet, target, source_block))
    return items, target


def _docstring_of(source: Callable[..., Any]) -> Callable[[F], F]:
    """Give the decorated function ``source``'s docstring (read by Prefect for the
    parameters' descriptions)."""

    def apply(function: F) -> F:
        function.__doc__ = source.__doc__
        return function

    return apply


# ``batch_campaign`` (same parameters, same docstring, so a deployment of either shows the
# same form; same run) as an async flow, for async callers and deployments. A sync flow run
# ends by joining Prefect's heartbeat thread, which sleeps in 1 s steps: up to a second per
# run, a whole second for a re-run whose items are all cached; an async flow run does not
# wait for it. The campaign's own code is sync at its top (its items run on an event loop
# of their own) and runs on a worker thread, so the flow's event loop stays free. A thread
# cannot be interrupted: cancelling the awaiting coroutine (not the flow run) leaves the
# campaign running to its end, within its budget.
@flow(name="batch-campaign-async", flow_run_name=flow_run_name("campaign", "campaign", "items"))
@_docstring_of(batch_campaign.fn)
async def abatch_campaign(
    items: list[dict[str, Any]] | None = None,
    source: str | None = None,
    source_block: str | None = None,
    campaign: str = "campaign",
    key_template: str = CAMPAIGN_KEY_TEMPLATE,
    destination: str | None = None,
    destination_block: str | None = None,
    credentials_block: str | None = None,
    variant: str = "",
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    concurrency_limit: str | None = DEFAULT_CONCURRENCY_LIMIT,
    max_credits: int | None = None,
    partial_budget: bool = False,
    allow_failures: bool = False,
    images_per_task_run: int | None = None,
    webhook_block: str | None = None,
    overwrite: bool = False,
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED,
    max_pause: float = policy.RETRY_AFTER_CAP,
    budget_name: str | None = None,
) -> CampaignReport:
    """:func:`batch_campaign` as an async flow, with the same arguments (written out, so that
    type checkers and the API reference show them; a test keeps them equal), run and report.
    At run time this docstring is ``batch_campaign``'s, so both deployments' forms describe
    every parameter alike."""
    arguments = locals()  # exactly the parameters: nothing else is defined yet
    run = partial(batch_campaign.fn, **arguments)
    return await asyncio.to_thread(_with_sync_client, run)


def _with_sync_client(function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``function(*args, **kwargs)`` with one sync Prefect client for it and the task runs
    it starts. A sync flow run provides one; without it, under an async flow run, every
    sync task run opens a client of its own (a new connection and an extra request each)."""
    with shared_sync_client():
        return function(*args, **kwargs)
