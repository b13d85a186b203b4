"""A campaign's credit budget: named, durable, shared by every run, retry and process of it.

Each paid attempt reserves the price of one image before it starts
(:meth:`~CreditBudget.reserve`) and settles the reservation afterwards
(:meth:`~CreditBudget.settle`): a success or a possibly-billed failure is counted as spent, a
failure that cannot have been billed gives the reservation back. No attempt starts once
``spent + in flight + price`` would pass the limit, so retries count, and so do the earlier
runs of the campaign: the state outlives a run, a retry of it from the UI, and the process.

A reservation carries a lease: the attempt's own deadline. A process killed with its call in
flight never settles it; once the lease has passed, the next reader counts it as spent and
possibly billed (its call may have bought an image), until a webhook delivery proves
otherwise (:meth:`~CreditBudget.recovered`).

The state is a small JSON file guarded by ``flock``, under ``JOURNEY_BUDGET_DIR`` (by default
the Prefect home): the threads and processes of one machine share it by sharing the path.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.settings import PREFECT_HOME

from prefect_journey import policy, settings
from prefect_journey.errors import JourneyError
from prefect_journey.models import CREDITS_PER_IMAGE
from prefect_journey.storage import slugify

# Counts a budget keeps: over its whole life in its file, and for one run in its object.
_COUNTS = ("spent", "calls", "possibly_billed", "refused")


def _empty() -> dict[str, Any]:
    return {**dict.fromkeys(_COUNTS, 0), "reservations": {}}


class BudgetExceededError(JourneyError):
    """Starting this call could take the campaign past its credit budget."""


class CreditBudget:
    """``limit`` credits (None: unlimited, counting only) tracked in the file at ``path``.

    :meth:`for_campaign` opens a campaign's budget where earlier runs left it;
    :meth:`create` makes a fresh one. The file holds the budget's whole life; the object
    also counts what this run did (:attr:`this_run`), for its report.

    Args:
        path: The JSON state file, which must exist.
        limit: The most credits the budget may commit, spent and in flight together; None
            counts without refusing.
        price: The credits one attempt reserves; :data:`CREDITS_PER_IMAGE` by default.

    Attributes:
        path: The state file.
        limit: The budget's limit.
        price: The credits of one attempt.
        this_run: ``spent``, ``calls``, ``possibly_billed`` and ``refused`` of the attempts
            made through this object.

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
            print(budget.snapshot())  # 8 spent, 1 refused, 0 left
        ```
    """

    def __init__(self, path: str | Path, limit: int | None = None, price: int = CREDITS_PER_IMAGE):
        if limit is not None and limit < 0:
            raise ValueError("a credit budget cannot be negative")
        self.path = str(path)
        self.limit = limit
        self.price = price
        self.this_run = dict.fromkeys(_COUNTS, 0)
        self._run_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CreditBudget({self.path!r}, limit={self.limit})"

    @classmethod
    def create(cls, path: str | Path, limit: int | None = None) -> CreditBudget:
        """A fresh budget (the file is reset).

        Args:
            path: The state file; its parent folders are created, and the file is
                overwritten with an empty state.
            limit: The most credits the budget may commit; None counts without refusing.

        Returns:
            The budget, at the default price per attempt.

        Raises:
            ValueError: ``limit`` is negative.
        """
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_empty()))
        return cls(path, limit)

    @classmethod
    def for_campaign(cls, name: str, limit: int | None = None) -> CreditBudget:
        """The budget called ``name``, as its earlier runs left it (empty the first time).

        Args:
            name: The budget's name (a campaign's, by default); its file is
                ``<JOURNEY_BUDGET_DIR>/<slug of name>.json``.
            limit: The most credits the budget may commit over its whole life; None counts
                without refusing.

        Returns:
            The budget.

        Raises:
            ValueError: ``limit`` is negative.
        """
        path = settings.budget_dir(Path(PREFECT_HOME.value())) / f"{slugify(name)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x") as handle:  # first run of the campaign: only one creates it
                handle.write(json.dumps(_empty()))
        except FileExistsError:
            pass
        return cls(path, limit)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with _THREAD_LOCK, open(self.path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            state = {**_empty(), **json.loads(handle.read() or "{}")}
            self._expire(state)
            yield state
            # Overwritten in place, then cut to length: emptying it first frees its block,
            # which the filesystem must journal, several times the cost of the update. No
            # fsync: flock already orders the writers, and the file only has to outlive a
            # process, not the machine.
            handle.seek(0)
            handle.write(json.dumps(state))
            handle.truncate()

    def _expire(self, state: dict[str, Any]) -> None:
        """Reservations whose lease has passed: a killed process's calls, counted as spent
        and possibly billed."""
        now = time.time()
        expired = [key for key, until in state["reservations"].items() if until <= now]
        for key in expired:
            del state["reservations"][key]
            state["spent"] += self.price
            state["possibly_billed"] += 1

    def _count(self, **changes: int) -> None:
        with self._run_lock:
            for name, change in changes.items():
                self.this_run[name] += change

    def reserve(self, lease: float | None = None) -> str:
        """Reserve one call's price or raise :class:`BudgetExceededError`.

        Args:
            lease: Seconds the reservation lives unless settled (the call's deadline);
                None for the slowest request's attempt deadline.

        Returns:
            The reservation, for :meth:`settle`.

        Raises:
            BudgetExceededError: Spent plus in-flight credits plus this price would pass
                the limit; the refusal is counted and nothing is reserved.
        """
        lease = policy.worst_case_attempt_timeout() if lease is None else lease
        reservation = uuid.uuid4().hex
        with self._locked() as state:
            in_flight = self.price * len(state["reservations"])
            refused = self.limit is not None and state["spent"] + in_flight + self.price > (
                self.limit
            )
            if refused:
                state["refused"] += 1
                spent = state["spent"]
            else:
                state["reservations"][reservation] = time.time() + lease
                state["calls"] += 1
        if refused:
            self._count(refused=1)
            raise BudgetExceededError(
                f"credit budget reached: {spent} spent and {in_flight} in flight of "
                f"max_credits={self.limit}; not starting another call"
            )
        self._count(calls=1)
        return reservation

    def settle(self, reservation: str, error: BaseException | None) -> None:
        """Close a reservation: spent unless ``error`` is one of ours that proves nothing
        was billed.

        An unknown failure, or an interruption, may have been billed, so it is spent and
        counted as possibly billed. A reservation whose lease passed was counted so already.

        Args:
            reservation: What :meth:`reserve` returned.
            error: How the attempt ended: None for a success, else the exception. A
                :class:`~prefect_journey.errors.JourneyError` that is not
                ``possibly_billed`` gives the reservation back.
        """
        not_billed = isinstance(error, JourneyError) and not error.possibly_billed
        spent = 0 if not_billed else self.price
        doubt = int(error is not None and not not_billed)
        with self._locked() as state:
            if state["reservations"].pop(reservation, None) is not None:
                state["spent"] += spent
                state["possibly_billed"] += doubt
        self._count(spent=spent, possibly_billed=doubt)

    def recovered(self, *, billed: bool) -> None:
        """A possibly-billed attempt's fate became known from its webhook delivery.

        It no longer counts as possibly billed, and its credits stay spent only if the
        delivery shows an image was made.

        Args:
            billed: The delivery carried a finished image (False: the provider refused it,
                which is not billed).
        """
        given_back = 0 if billed else self.price
        with self._locked() as state:
            state["possibly_billed"] -= 1
            state["spent"] -= given_back
        self._count(possibly_billed=-1, spent=-given_back)

    def snapshot(self) -> dict[str, Any]:
        """The budget over its whole life: calls, credits spent (possibly-billed counted),
        in flight, refusals, the limit and what is left of it.

        Returns:
            ``calls``, ``spent``, ``in_flight``, ``possibly_billed`` (attempts that ended
            in a failure that may have been billed and whose fate no webhook delivery told),
            ``refused``, ``limit`` and ``left`` (None without a limit).
        """
        with self._locked() as state:
            counts = {name: state[name] for name in _COUNTS}
            in_flight = self.price * len(state["reservations"])
        left = None if self.limit is None else max(0, self.limit - counts["spent"] - in_flight)
        return {**counts, "in_flight": in_flight, "limit": self.limit, "left": left}

    @contextmanager
    def attempt(self, lease: float | None = None) -> Iterator[None]:
        """Reserve around one paid call and settle by how it ended.

        An exception leaving the block settles the reservation with that error and is
        raised again.

        Args:
            lease: The call's deadline in seconds (see :meth:`reserve`).

        Raises:
            BudgetExceededError: The call could take the budget past its limit; the block
                does not run.
        """
        reservation = self.reserve(lease)
        try:
            yield
        except BaseException as error:
            self.settle(reservation, error)
            raise
        self.settle(reservation, None)


_THREAD_LOCK = threading.Lock()
