"""A credit budget shared by every attempt of a run, across threads and processes.

Each paid attempt :meth:`~CreditBudget.reserve` s the price of one image before it starts and
:meth:`~CreditBudget.settle` s afterwards: a success or a possibly-billed failure is counted
as spent, a failure that cannot have been billed gives the reservation back. No attempt
starts once ``spent + in flight + price`` would pass the limit, so retries count too.

The state is a small JSON file guarded by ``flock``: threads, Dask worker processes and
several flows on one machine share it by sharing the path (the object pickles as its path).
On several machines, put the file on a filesystem they share.
"""

from __future__ import annotations

import fcntl
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect_journey.errors import JourneyError
from prefect_journey.models import CREDITS_PER_IMAGE

_EMPTY = {
    "in_flight": 0,
    "spent": 0,
    "calls": 0,
    "possibly_billed": 0,
    "refused": 0,
}


class BudgetExceededError(JourneyError):
    """Starting this call could take the run past its credit budget."""


@dataclass(frozen=True)
class CreditBudget:
    """``limit`` credits (None: unlimited, counting only) tracked in the file at ``path``.

    Each paid attempt reserves the price of one image before it starts and settles
    afterwards (see the module docstring). The object holds no state of its own, only where
    the state is, so it pickles to other processes. :meth:`create` makes a fresh budget;
    constructing one directly uses the file as it is, which must exist.

    Attributes:
        path: The JSON state file, shared by every thread and process using the budget.
        limit: The most credits the run may commit, spent and in flight together; None
            (the default) counts without refusing.
        price: The credits one attempt reserves; :data:`CREDITS_PER_IMAGE` by default.

    Example:
        ```python
        from prefect_journey.budget import BudgetExceededError, CreditBudget

        budget = CreditBudget.create("budget.json", limit=8)
        for _ in range(2):
            with budget.attempt():
                ...  # one paid call, such as client.imagine(...)
        try:
            budget.reserve()
        except BudgetExceededError:
            print(budget.snapshot())  # 8 spent, 1 refused
        ```
    """

    path: str
    limit: int | None = None
    price: int = CREDITS_PER_IMAGE

    @classmethod
    def create(cls, path: str | Path, limit: int | None = None) -> CreditBudget:
        """A fresh budget (the file is reset).

        Args:
            path: The state file; its parent folders are created, and the file is
                overwritten with an empty state.
            limit: The most credits the run may commit; None (the default) counts without
                refusing.

        Returns:
            The budget, at the default price per attempt.

        Raises:
            ValueError: ``limit`` is negative.
        """
        if limit is not None and limit < 0:
            raise ValueError("a credit budget cannot be negative")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_EMPTY))
        return cls(str(path), limit)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        with _THREAD_LOCK, open(self.path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            state = {**_EMPTY, **json.loads(handle.read() or "{}")}
            yield state
            # Overwritten in place, then cut to length: emptying it first frees its block,
            # which the filesystem must journal, several times the cost of the update. No
            # fsync: flock already orders the writers, and the file only has to outlive a
            # process, not the machine.
            handle.seek(0)
            handle.write(json.dumps(state))
            handle.truncate()

    def reserve(self) -> None:
        """Reserve one call's price or raise :class:`BudgetExceededError`.

        Raises:
            BudgetExceededError: Spent plus in-flight credits plus this price would pass
                the limit; the refusal is counted and nothing is reserved.
        """
        with self._locked() as state:
            committed = state["spent"] + state["in_flight"]
            refused = self.limit is not None and committed + self.price > self.limit
            if refused:
                state["refused"] += 1
                spent, in_flight = state["spent"], state["in_flight"]
            else:
                state["in_flight"] += self.price
                state["calls"] += 1
        if refused:
            raise BudgetExceededError(
                f"credit budget reached: {spent} spent and {in_flight} in flight of "
                f"max_credits={self.limit}; not starting another call"
            )

    def settle(self, error: BaseException | None) -> None:
        """Close a reservation: spent unless ``error`` is one of ours that proves nothing
        was billed.

        An unknown failure, or an interruption, may have been billed, so it is spent and
        counted as possibly billed.

        Args:
            error: How the attempt ended: None for a success, else the exception. A
                :class:`~prefect_journey.errors.JourneyError` that is not
                ``possibly_billed`` gives the reservation back.
        """
        not_billed = isinstance(error, JourneyError) and not error.possibly_billed
        with self._locked() as state:
            state["in_flight"] -= self.price
            if not not_billed:
                state["spent"] += self.price
            if error is not None and not not_billed:
                state["possibly_billed"] += 1

    def recovered(self, *, billed: bool) -> None:
        """A possibly-billed attempt's fate became known from its webhook delivery.

        It no longer counts as possibly billed, and its credits stay spent only if the
        delivery shows an image was made.

        Args:
            billed: The delivery carried a finished image (False: the provider refused it,
                which is not billed).
        """
        with self._locked() as state:
            state["possibly_billed"] -= 1
            if not billed:
                state["spent"] -= self.price

    def snapshot(self) -> dict[str, Any]:
        """Calls started, credits spent (possibly-billed counted), in flight, refusals.

        Returns:
            ``calls``, ``spent``, ``in_flight``, ``possibly_billed`` (attempts that ended
            in a failure that may have been billed and whose fate no webhook delivery told),
            ``refused`` and the budget's ``limit``.
        """
        with self._locked() as state:
            return {**state, "limit": self.limit}

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Reserve around one paid call and settle by how it ended.

        An exception leaving the block settles the reservation with that error and is
        raised again.

        Raises:
            BudgetExceededError: The call could take the run past the budget; the block
                does not run.
        """
        self.reserve()
        try:
            yield
        except BaseException as error:
            self.settle(error)
            raise
        self.settle(None)


_THREAD_LOCK = threading.Lock()
