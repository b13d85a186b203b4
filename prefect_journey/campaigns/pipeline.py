"""The campaign pipeline: everything around an item's life, written once for every flow.

    plan -> look up (cache records, objects in place) -> preflight (price, budget, balance)
      -> items, grouped into task runs (:mod:`~prefect_journey.campaigns.executor`), each
         living :func:`~prefect_journey.campaigns.item.run_item`
      -> outcome -> report

``batch_campaign``, ``generate_and_store`` and ``character_series`` all run through it, so
they plan, price, report and fail the same way: one outcome type (:class:`ItemOutcome`),
one report (:class:`CampaignReport`) and one failure text.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from prefect_journey import policy
from prefect_journey._compat import call_sync
from prefect_journey.attempts import sweep_expired
from prefect_journey.budget import BudgetExceededError, CreditBudget
from prefect_journey.cache import cached_result, imagine_cache_key, store_cache_key
from prefect_journey.campaigns.plan import CampaignItem
from prefect_journey.credentials import JourneyCredentials, api_base_url, journey_client
from prefect_journey.errors import (
    InsufficientCreditsError,
    JourneyError,
    NotStartedError,
    ObjectConflictError,
    RedisUnavailableError,
    failure_text,
)
from prefect_journey.models import CREDITS_PER_IMAGE, ImagineResult, display_text
from prefect_journey.publishing import Logger
from prefect_journey.receiver import JourneyWebhookReceiver
from prefect_journey.storage import (
    Destination,
    Occupant,
    StoredImage,
    check_key_template,
    slugify,
)
from prefect_journey.tasks import astore_image, imagine

# Metadata reads in parallel when looking for objects an earlier run stored (one HEAD each
# on S3).
OBJECT_CHECKS = 16
# A prompt in the summary table: long enough to recognise, short enough for a table cell.
OUTCOME_PROMPT_CHARS = 120
# Rows quoted in the error that fails a campaign; the summary artifact lists them all.
FAILURES_QUOTED = 10

Status = Literal["stored", "failed", "possibly_billed", "skipped", "not_started"]


class ItemOutcome(BaseModel):
    """One item of a campaign: what it produced, or why it did not.

    ``status`` is ``stored``, ``failed``, ``possibly_billed`` (its last attempt may have been
    billed and was not paid again: ``repay_possibly_billed`` was used up, or the attempt ran
    out of time), ``skipped`` (the credit budget ran out before its call) or ``not_started``
    (the provider asked for a pause longer than ``max_pause``: nothing billed, a re-run
    picks it up); ``cached`` says
    the image came from an earlier run (no credit spent); ``recovered`` says it came from the
    webhook delivery of an attempt whose answer was lost (not bought again). The fields are
    in the summary table's column order: status and reason next to the prompt, where the UI
    shows them without scrolling.
    """

    row: int
    prompt: str
    status: Status
    reason: str = ""
    task_id: str = ""
    latency_s: float = 0.0
    credits: int = 0
    attempts: int = 0
    cached: bool = False
    recovered: bool = False
    uri: str = ""
    sha256: str = ""


class CampaignReport(BaseModel):
    """What a campaign run did, item by item, and what it cost.

    ``failed`` counts items that failed for a known reason; ``possibly_billed_not_repaid``
    the items whose last attempt may have been billed and was not paid again (status
    ``possibly_billed``), apart. ``possibly_billed_retries`` counts possibly-billed attempts
    that were paid again (the ledger's possibly-billed attempts, less each not-repaid item's
    last one); ``recovered`` the images taken from a webhook delivery instead. ``calls`` and
    ``credits_charged`` are this run's; ``budget_left`` is what is left of the campaign's
    budget after it (None without ``max_credits``).
    """

    campaign: str
    items: int
    stored: int
    failed: int
    skipped: int
    cache_hits: int
    calls: int
    credits_charged: int
    possibly_billed_retries: int
    outcomes: list[ItemOutcome]
    recovered: int = 0
    possibly_billed_not_repaid: int = 0
    not_started: int = 0
    budget_left: int | None = None

    def ledger_line(self) -> str:
        """The run's one-line ledger, as logged and shown on the summary artifact."""
        return (
            f"items={self.items} stored={self.stored} failed={self.failed} "
            f"possibly_billed_not_repaid={self.possibly_billed_not_repaid} "
            f"skipped={self.skipped} not_started={self.not_started} "
            f"cache_hits={self.cache_hits} calls={self.calls} "
            f"credits_charged={self.credits_charged} "
            f"possibly_billed_retries={self.possibly_billed_retries} "
            f"recovered={self.recovered}"
            + ("" if self.budget_left is None else f" budget_left={self.budget_left}")
        )


class CampaignFailedError(JourneyError):
    """Some items failed (see the summary artifact); the stored ones are kept."""


@dataclass(frozen=True)
class Campaign:
    """What every item of one campaign run shares.

    Attributes:
        name: The campaign's name (``{campaign}`` in keys, artifact keys, events).
        destination: Where the images go.
        key_template: Each object's key.
        variant: Part of every image's cache key.
        credentials: The API credentials; None for ``JOURNEY_API_KEY``.
        budget: The run's credit budget, gating every paid attempt.
        concurrency_limit: The Prefect global concurrency limit each attempt holds a slot of.
        restore: Rows whose store is cached but whose object is gone (stored again).
        base_url: The API root (part of every image's cache key); resolved from
            ``credentials`` when not given.
        receiver: The webhook receiver that turns on the recovery of possibly-billed
            attempts; None for none.
        overwrite: Replace the objects at the run's keys instead of refusing them.
        repay_possibly_billed: How many times an image's possibly-billed failure is paid
            again (:class:`~prefect_journey.policy.RepayAllowance`).
        max_pause: The longest ``Retry-After`` the run waits for; a longer one stops its
            new calls (:class:`~prefect_journey.gate.Backpressure`).
    """

    name: str
    destination: Destination
    key_template: str
    variant: str
    credentials: JourneyCredentials | None
    budget: CreditBudget | None = None
    concurrency_limit: str | None = None
    restore: frozenset[int] = frozenset()
    base_url: str = field(default="")
    receiver: JourneyWebhookReceiver | None = None
    overwrite: bool = False
    repay_possibly_billed: int = policy.DEFAULT_REPAY_POSSIBLY_BILLED
    max_pause: float = policy.RETRY_AFTER_CAP

    def __post_init__(self) -> None:
        if not self.base_url:
            object.__setattr__(self, "base_url", api_base_url(self.credentials))

    def with_run(
        self, *, budget: CreditBudget, concurrency_limit: str | None, restore: frozenset[int]
    ) -> Campaign:
        """This campaign with what its run decided: its budget, the global limit it uses and
        the rows to store again."""
        return dataclasses.replace(
            self, budget=budget, concurrency_limit=concurrency_limit, restore=restore
        )

    @property
    def slug(self) -> str:
        """The name as it appears in keys: lower case, dashes."""
        return slugify(self.name)

    def generation_key(self, item: CampaignItem) -> str:
        """The cache key of ``item``'s image (the ``imagine`` task's)."""
        return imagine_cache_key(item.request, self.variant, self.base_url)

    def store_key(self, item: CampaignItem, generated: ImagineResult) -> str:
        """The cache key of storing ``generated`` for ``item`` (the store task's)."""
        return store_cache_key(
            generated.task_id, self.destination, self.key_template, item.key_fields, self.overwrite
        )


# --- Look up and preflight ---------------------------------------------------------------------


@dataclass
class Lookup:
    """What earlier runs left: each row's cached image (or None), the rows finished (image
    and object in place), the rows whose object must be stored again, and the rows refused
    before their call (their key holds an object this run could not store over)."""

    generated: dict[int, ImagineResult | None]
    finished: dict[int, ItemOutcome]
    restore: set[int]
    refused: dict[int, ItemOutcome] = field(default_factory=dict)

    @property
    def settled(self) -> dict[int, ItemOutcome]:
        """The rows whose outcome is known before any call: finished or refused."""
        return self.finished | self.refused


def look_up(plan: list[CampaignItem], campaign: Campaign) -> Lookup:
    """Find what earlier runs did for ``plan``, without a task run or a credit.

    A finished item (its image and its store both cached, the object still in place) is
    reported as it is: re-running a finished campaign costs seconds, not a task run per
    item. An item that would be paid for (no cached image) and whose key cannot depend on
    the call (no ``{task_id}``) is looked for at its key, since cache records expire and
    stay on the machine that wrote them while objects stay: see :func:`look_at_keys`.

    Args:
        plan: The campaign's checked items.
        campaign: What the run shares (keys, destination); when it overwrites, the keys are
            not looked at.

    Returns:
        The cached images, the finished items, the objects to store again and the items
        refused before their call.

    Raises:
        StorageError: An object's metadata cannot be read.
    """
    generated = {
        item.row: _as_result(cached_result(imagine, campaign.generation_key(item))) for item in plan
    }
    cached: dict[int, tuple[ImagineResult, StoredImage]] = {}
    for item in plan:
        result = generated[item.row]
        if result is None:
            continue
        stored = cached_result(astore_image, campaign.store_key(item, result))
        if isinstance(stored, StoredImage):
            cached[item.row] = (result, stored)
    finished: dict[int, ItemOutcome] = {}
    if cached:
        with ThreadPoolExecutor(min(OBJECT_CHECKS, len(cached))) as pool:
            present = list(
                pool.map(campaign.destination.holds, (stored for _, stored in cached.values()))
            )
        items = {item.row: item for item in plan}
        finished = {
            row: outcome(items[row], result, stored, cached=True)
            for (row, (result, stored)), there in zip(cached.items(), present, strict=True)
            if there
        }
    restore = set(cached) - set(finished)
    if campaign.overwrite or "task_id" in check_key_template(campaign.key_template):
        return Lookup(generated, finished, restore)
    found, refused = look_at_keys([i for i in plan if generated[i.row] is None], campaign)
    return Lookup(generated, finished | found, restore, refused)


def look_at_keys(
    todo: list[CampaignItem], campaign: Campaign
) -> tuple[dict[int, ItemOutcome], dict[int, ItemOutcome]]:
    """What already sits at the keys of ``todo``, read from the objects' records.

    An object made from an item's request (its recorded origin is the item's
    :meth:`Campaign.generation_key`) makes the item done: stored, cached, no credit. Any
    other object (another request's, or one with no record) fails the item before its call,
    which would buy an image that cannot be stored there. Keys are read
    :data:`OBJECT_CHECKS` at a time.

    Args:
        todo: Items that would be paid for; their key template has no ``{task_id}``.
        campaign: What the run shares (keys, destination).

    Returns:
        The items found done, and the items refused, each with its outcome, by row.

    Raises:
        StorageError: An object's metadata cannot be read.
    """
    if not todo:
        return {}, {}

    def occupant(item: CampaignItem) -> Occupant | None:
        return campaign.destination.occupant(
            campaign.key_template, item.key_fields, campaign.generation_key(item)
        )

    with ThreadPoolExecutor(min(OBJECT_CHECKS, len(todo))) as pool:
        occupants = list(pool.map(occupant, todo))
    found: dict[int, ItemOutcome] = {}
    refused: dict[int, ItemOutcome] = {}
    for item, there in zip(todo, occupants, strict=True):
        if there is None:
            continue
        if there.stored is not None:
            done = outcome(item, None, there.stored, cached=True)
            found[item.row] = done.model_copy(
                update={"task_id": there.stored.task_id, "cached": True}
            )
        else:
            conflict = ObjectConflictError(_occupied(there, campaign.generation_key(item)))
            refused[item.row] = outcome(item, None, None, cached=False, error=conflict)
    return found, refused


def _occupied(there: Occupant, origin: str) -> str:
    """Why an item fails before its call, naming its key and the ways out."""
    if there.origin is None:
        what = "holds an object with no record of the request that made it"
    elif there.origin != origin:
        what = "holds an image made by another request"
    else:
        what = "holds an object of this request that is not a whole image"
    return (
        f"{there.uri} {what}; not paying for an image that cannot be stored there: pass "
        "overwrite=True to replace it, or use another key template"
    )


def _as_result(value: Any) -> ImagineResult | None:
    return value if isinstance(value, ImagineResult) else None


def price(todo: list[CampaignItem], generated: dict[int, ImagineResult | None]) -> int:
    """The most ``todo`` can cost: its items with no cached image, at the image's price.

    Args:
        todo: The items still to run.
        generated: Each row's cached image, or None (from :func:`look_up`).

    Returns:
        The credits.
    """
    return CREDITS_PER_IMAGE * sum(generated[item.row] is None for item in todo)


def check_budget(cost: int, budget: CreditBudget, *, partial_budget: bool) -> int:
    """Refuse a run that could pass what is left of its campaign's budget.

    Args:
        cost: The most the run can cost (:func:`price`).
        budget: The campaign's budget (its earlier runs' spending counts).
        partial_budget: Run until the budget is spent instead of refusing.

    Returns:
        The credits the run may spend: ``cost``, or what is left of the budget when less.

    Raises:
        BudgetExceededError: Over what is left of the budget (unless ``partial_budget``).
    """
    left = budget.snapshot()["left"] if cost else None
    if left is not None and cost > left and not partial_budget:
        spent = "" if left == budget.limit else f" ({budget.limit - left} spent by earlier runs)"
        raise BudgetExceededError(
            f"the campaign can cost {cost} credits ({cost // CREDITS_PER_IMAGE} uncached items "
            f"x {CREDITS_PER_IMAGE}), above the {left} left of max_credits={budget.limit}"
            f"{spent}; raise max_credits or pass partial_budget=True"
        )
    return min(cost, left) if left is not None else cost


def preflight(
    todo: list[CampaignItem],
    generated: dict[int, ImagineResult | None],
    *,
    credentials: JourneyCredentials | None,
    budget: CreditBudget,
    partial_budget: bool,
) -> int:
    """The credits ``todo`` can cost (cache hits excluded), checked against what is left of
    the campaign's budget and the account's balance before anything is spent.

    Args:
        todo: The items still to run.
        generated: Each row's cached image, or None (from :func:`look_up`).
        credentials: Whose balance to read; None for ``JOURNEY_API_KEY``.
        budget: The campaign's budget (its earlier runs' spending counts).
        partial_budget: Run until the budget is spent instead of refusing.

    Returns:
        The most the items can cost.

    Raises:
        BudgetExceededError: Over what is left of the budget (unless ``partial_budget``).
        InsufficientCreditsError: Over the account's balance.
    """
    cost = price(todo, generated)
    get_run_logger().info(
        "%d items to run, %d cache hits expected, up to %d credits",
        len(todo),
        len(todo) - cost // CREDITS_PER_IMAGE,
        cost,
    )
    needed = check_budget(cost, budget, partial_budget=partial_budget)
    if needed == 0:
        return cost
    with journey_client(credentials) as api:
        balance = api.account().credits
    if needed > balance:
        raise InsufficientCreditsError(
            f"the campaign needs up to {needed} credits and the account has {balance}: top up first"
        )
    return cost


def sweep_attempt_records(logger: Logger) -> None:
    """Delete the expired attempt records of images nobody asked for again
    (:func:`~prefect_journey.attempts.sweep_expired`); a failure only warns, the campaign's
    outcome stands.

    Args:
        logger: The run's logger.
    """
    try:
        swept = sweep_expired()
    except Exception as exc:  # housekeeping: never the reason a campaign fails
        logger.warning("could not sweep expired attempt records (%s)", type(exc).__name__)
        return
    if swept:
        logger.info("removed %d expired attempt record(s)", swept)


# --- Outcome and report ------------------------------------------------------------------------


def outcome(
    item: CampaignItem,
    generated: ImagineResult | None,
    stored: StoredImage | None,
    *,
    cached: bool,
    error: BaseException | None = None,
) -> ItemOutcome:
    """One item's row in the summary: what it produced, or why it did not.

    Args:
        item: The item.
        generated: Its image, if one was made or found.
        stored: Its object, if one was written or found.
        cached: The image came from an earlier run (no credit, no attempt).
        error: Why the item stopped short, if it did.

    Returns:
        ``stored`` with an object; ``skipped`` when the budget refused its call;
        ``possibly_billed`` when no image came and the last attempt may have been billed
        (:func:`~prefect_journey.policy.left_possibly_billed`); else ``failed``, with the
        reason.
    """
    fields: dict[str, Any] = {
        "row": item.row,
        "prompt": display_text(item.request.prompt, OUTCOME_PROMPT_CHARS),
    }
    if generated is not None:
        fields |= {
            "task_id": generated.task_id,
            "latency_s": round(generated.elapsed_seconds, 2),
            "credits": 0 if cached else generated.credits_charged,
            "attempts": 0 if cached else generated.attempts,
            "cached": cached,
            "recovered": generated.recovered and not cached,
        }
    if stored is not None:
        return ItemOutcome(**fields, status="stored", uri=stored.uri, sha256=stored.sha256)
    reason = failure_text(error) if error is not None else "its result could not be read"
    status: Status = "failed"
    if generated is None and isinstance(error, BudgetExceededError):
        status = "skipped"
    elif generated is None and isinstance(error, NotStartedError):
        status = "not_started"
    elif generated is None and policy.left_possibly_billed(error):
        status = "possibly_billed"
    return ItemOutcome(**fields, status=status, reason=reason)


def _budget_left(budget: CreditBudget | None) -> int | None:
    """What is left of ``budget`` for the report; None when it has no limit, or when it
    lives in a Redis that stopped answering (the items' outcomes say what that cost)."""
    if budget is None:
        return None
    try:
        left: int | None = budget.snapshot()["left"]
    except RedisUnavailableError as exc:
        get_run_logger().warning("what is left of the budget is unknown: %s", exc)
        return None
    return left


def report(
    campaign: Campaign, items: int, outcomes: list[ItemOutcome], *, allow_failures: bool
) -> CampaignReport:
    """Sum up the run, publish its summary table and log its ledger line.

    Args:
        campaign: The run.
        items: How many items the campaign has.
        outcomes: One per item.
        allow_failures: Return the report even if some items were not stored.

    Returns:
        The report.

    Raises:
        CampaignFailedError: An item was not stored, unless ``allow_failures``.
    """
    outcomes = sorted(outcomes, key=lambda o: o.row)
    ledger = campaign.budget.this_run if campaign.budget else {}
    left = _budget_left(campaign.budget)
    not_repaid = sum(o.status == "possibly_billed" for o in outcomes)
    summary = CampaignReport(
        campaign=campaign.name,
        items=items,
        stored=sum(o.status == "stored" for o in outcomes),
        failed=sum(o.status == "failed" for o in outcomes),
        skipped=sum(o.status == "skipped" for o in outcomes),
        cache_hits=sum(o.cached for o in outcomes),
        calls=ledger.get("calls", 0),
        credits_charged=ledger.get("spent", 0),
        # Each not-repaid item's last attempt is one of the ledger's possibly-billed ones.
        possibly_billed_retries=max(0, ledger.get("possibly_billed", 0) - not_repaid),
        outcomes=outcomes,
        recovered=sum(o.recovered for o in outcomes),
        possibly_billed_not_repaid=not_repaid,
        not_started=sum(o.status == "not_started" for o in outcomes),
        budget_left=left,
    )
    publish_outcomes(campaign.name, outcomes, summary.ledger_line())
    not_stored = [o for o in outcomes if o.status != "stored"]
    if not_stored and not allow_failures:
        reasons = "; ".join(f"row {o.row}: {o.reason}" for o in not_stored[:FAILURES_QUOTED])
        raise CampaignFailedError(f"{len(not_stored)} of {items} items not stored: {reasons}")
    return summary


def publish_outcomes(name: str, outcomes: list[ItemOutcome], summary: str) -> None:
    """The run's summary table (one row per item, under the key ``<name>-summary`` so its
    history stays across runs) and its log line.

    Args:
        name: The campaign's name.
        outcomes: One per item, in row order.
        summary: The one-line ledger.
    """
    call_sync(
        create_table_artifact,
        [o.model_dump() for o in outcomes],
        key=f"{slugify(name)}-summary",
        description=f"campaign {display_text(name)}: {summary}",
    )
    get_run_logger().info("campaign %s: %s", display_text(name), summary)
