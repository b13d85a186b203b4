"""The gate every paid attempt passes: a slot of a Prefect global concurrency limit, then a
reservation on the run's credit budget. Both executors of the campaign pipeline and the
``imagine`` tasks go through it, so a limit or a budget binds them all alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import concurrency as aconcurrency
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from prefect_journey.budget import CreditBudget


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


@contextmanager
def paid_attempt(budget: CreditBudget | None, concurrency_limit: str | None) -> Iterator[None]:
    """One paid attempt's gate: a slot of the Prefect global concurrency limit
    ``concurrency_limit`` (if named), then the budget's reservation (if any), settled by how
    the attempt ends.

    Raises:
        BudgetExceededError: The attempt could take the run past its budget.
    """
    # The slot is taken before the credits are reserved, so waiting for a slot does not
    # hold budget that running calls could use.
    with ExitStack() as stack:
        if concurrency_limit:
            stack.enter_context(concurrency(concurrency_limit, occupy=1, strict=True))
        if budget is not None:
            stack.enter_context(budget.attempt())
        yield


@asynccontextmanager
async def apaid_attempt(
    budget: CreditBudget | None, concurrency_limit: str | None
) -> AsyncIterator[None]:
    """Async twin of :func:`paid_attempt`."""
    async with AsyncExitStack() as stack:
        if concurrency_limit:
            await stack.enter_async_context(aconcurrency(concurrency_limit, occupy=1, strict=True))
        if budget is not None:
            stack.enter_context(budget.attempt())
        yield
