"""The gate every paid attempt passes: the campaign's pause, a slot of a Prefect global
concurrency limit, then a reservation on the credit budget. Every path that pays (the
``imagine`` tasks, every campaign item, the command line) goes through it, so a limit,
a budget or a provider's "come back later" binds them all alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import concurrency
from prefect.exceptions import ObjectNotFound

from prefect_journey import policy
from prefect_journey.budget import CreditBudget
from prefect_journey.errors import NotStartedError


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


class Backpressure:
    """One pause shared by every paid call of a run: when the provider says "come back in
    N seconds" (``Retry-After`` on a 429, 503 or 408), no new call of the run starts until
    then, instead of each image probing on its own schedule.

    A demand longer than ``max_pause`` stops the run's new calls for good: the images not
    yet paid for end as not started (:class:`~prefect_journey.errors.NotStartedError`,
    nothing billed, a re-run picks them up) instead of burning their retries against a
    closed quota.

    One event loop uses it (it is not thread-safe); the sync tasks each run their own loop
    and so have their own.

    Args:
        max_pause: The longest pause waited for, in seconds.

    Example:
        ```python
        import asyncio

        from prefect_journey.errors import RateLimitedError
        from prefect_journey.gate import Backpressure

        async def main() -> None:
            pause = Backpressure(max_pause=60)
            pause.hold(RateLimitedError("429", status_code=429, retry_after=2))
            await pause.wait()  # about 2 s, for every caller at once

        asyncio.run(main())
        ```
    """

    def __init__(self, max_pause: float = policy.RETRY_AFTER_CAP) -> None:
        if max_pause < 0:
            raise ValueError("max_pause cannot be negative")
        self.max_pause = max_pause
        self.stopped: str | None = None
        self._until = 0.0

    def hold(self, error: BaseException) -> None:
        """Pause every new call as ``error``'s ``Retry-After`` asks, if it asks.

        Args:
            error: The failure of an attempt.

        Raises:
            NotStartedError: The demand is longer than ``max_pause``: the run starts no
                further call.
        """
        seconds = policy.retry_after_seconds(error)
        if seconds is None:
            return
        if seconds > self.max_pause:
            self.stopped = (
                f"the provider asked to wait {seconds:.0f} s, more than max_pause="
                f"{self.max_pause:.0f} s; not started, nothing billed: run again later"
            )
            raise NotStartedError(self.stopped) from error
        self._until = max(self._until, time.monotonic() + seconds)

    async def wait(self) -> None:
        """Return when no pause holds.

        Raises:
            NotStartedError: A pause longer than ``max_pause`` stopped the run's new calls.
        """
        while True:
            if self.stopped is not None:
                raise NotStartedError(self.stopped)
            left = self._until - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)

    @property
    def paused(self) -> bool:
        """Whether a pause holds right now."""
        return self._until > time.monotonic()


@asynccontextmanager
async def paid_attempt(
    budget: CreditBudget | None, concurrency_limit: str | None, *, lease: float | None = None
) -> AsyncIterator[None]:
    """One paid attempt's gate: a concurrency slot, then a reservation on the budget.

    The slot of the Prefect global concurrency limit comes first, so waiting for a slot does
    not hold budget that running calls could use. The reservation is settled by how the
    attempt ends (see :meth:`~prefect_journey.budget.CreditBudget.attempt`), and the slot is
    released after it.

    Args:
        budget: The run's credit budget; None for none.
        concurrency_limit: The name of a Prefect global concurrency limit, of which the
            attempt holds one slot; None or empty for no limit.
        lease: The attempt's deadline in seconds: its reservation on the budget lives that
            long if nothing settles it (a killed process); None for the slowest request's.

    Raises:
        BudgetExceededError: The attempt could take the budget past its limit.
        ConcurrencySlotAcquisitionError: No limit is called ``concurrency_limit`` (Prefect's
            error: the slot is taken with ``strict=True``).

    Example:
        ```python
        import asyncio

        from prefect_journey import AsyncJourneyClient
        from prefect_journey.budget import CreditBudget
        from prefect_journey.gate import paid_attempt

        async def main() -> None:
            budget = CreditBudget.create("budget.json", limit=40)
            async with AsyncJourneyClient() as client:
                async with paid_attempt(budget, concurrency_limit=None):
                    await client.imagine(prompt="a lighthouse at dusk")
            print(budget.snapshot()["spent"])  # 4

        asyncio.run(main())
        ```
    """
    async with AsyncExitStack() as stack:
        if concurrency_limit:
            await stack.enter_async_context(concurrency(concurrency_limit, occupy=1, strict=True))
        if budget is not None:
            stack.enter_context(budget.attempt(lease))
        yield
