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
    """Whether a Prefect global concurrency limit called ``name`` exists.

    Args:
        name: The limit's name; None or empty gives False without asking the API.

    Returns:
        True if the Prefect API knows a global concurrency limit of that name.
    """
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
    """One paid attempt's gate: a concurrency slot, then a reservation on the budget.

    The slot of the Prefect global concurrency limit comes first, so waiting for a slot does
    not hold budget that running calls could use. The reservation is settled by how the
    attempt ends (see :meth:`~prefect_journey.budget.CreditBudget.attempt`), and the slot is
    released after it.

    Args:
        budget: The run's credit budget; None for none.
        concurrency_limit: The name of a Prefect global concurrency limit, of which the
            attempt holds one slot; None or empty for no limit.

    Raises:
        BudgetExceededError: The attempt could take the run past its budget.
        ConcurrencySlotAcquisitionError: No limit is called ``concurrency_limit`` (Prefect's
            error: the slot is taken with ``strict=True``).

    Example:
        ```python
        from prefect_journey import JourneyClient
        from prefect_journey.budget import CreditBudget
        from prefect_journey.gate import paid_attempt

        budget = CreditBudget.create("budget.json", limit=40)
        with JourneyClient() as client:
            with paid_attempt(budget, concurrency_limit=None):
                result = client.imagine(prompt="a lighthouse at dusk")
        print(budget.snapshot()["spent"])  # 4
        ```
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
    """Async twin of :func:`paid_attempt`: a concurrency slot, then a budget reservation.

    The slot is awaited on the event loop; the budget's reservation and settlement are the
    same file operations as in :func:`paid_attempt`.

    Args:
        budget: The run's credit budget; None for none.
        concurrency_limit: The name of a Prefect global concurrency limit, of which the
            attempt holds one slot; None or empty for no limit.

    Raises:
        BudgetExceededError: The attempt could take the run past its budget.
        ConcurrencySlotAcquisitionError: No limit is called ``concurrency_limit`` (Prefect's
            error: the slot is taken with ``strict=True``).

    Example:
        ```python
        import asyncio

        from prefect_journey import AsyncJourneyClient
        from prefect_journey.gate import apaid_attempt

        async def main() -> None:
            async with AsyncJourneyClient() as client:
                async with apaid_attempt(None, concurrency_limit="journey-api"):
                    result = await client.imagine(prompt="a lighthouse at dusk")
            print(result.image_url)

        asyncio.run(main())
        ```
    """
    async with AsyncExitStack() as stack:
        if concurrency_limit:
            await stack.enter_async_context(aconcurrency(concurrency_limit, occupy=1, strict=True))
        if budget is not None:
            stack.enter_context(budget.attempt())
        yield
