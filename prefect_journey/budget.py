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

On one machine the state is a small JSON file locked while it changes (``flock``, or
``LockFileEx`` on Windows, through :func:`filelock.lock_descriptor`), under
``JOURNEY_BUDGET_DIR`` (by default the Prefect home): the threads and processes of the machine
share it by sharing the path. With ``JOURNEY_REDIS_URL`` set it lives in that Redis instead,
shared by the workers of every machine: the counts in a hash, the reservations in a sorted
set scored by their lease's end, every change one optimistic transaction (``WATCH``/``MULTI``)
on the Redis server's clock. Both run the same decisions; only where the state is kept
differs. A reservation that cannot reach Redis fails before its call
(:class:`~prefect_journey.errors.RedisUnavailableError`, not billed); a settlement that
cannot reach it is left to its lease, which counts it as spent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from filelock import lock_descriptor, unlock_descriptor
from prefect.settings import PREFECT_HOME

from prefect_journey import policy, settings
from prefect_journey.errors import ConfigurationError, JourneyError, RedisUnavailableError
from prefect_journey.models import CREDITS_PER_IMAGE
from prefect_journey.storage import slugify

# Counts a budget keeps: over its whole life in its file, and for one run in its object.
_COUNTS = ("spent", "calls", "possibly_billed", "refused")
# A budget's path that starts so names its keys in the Redis of JOURNEY_REDIS_URL.
REDIS_LOCATION = "redis:"

# Seconds between a waiting process's tries at a budget file's lock (filelock polls): its
# holder keeps it for one read and one write, tens of microseconds. At 1 ms, four processes
# sharing one budget changed it about half as fast as under flock's own wait.
_LOCK_POLL_SECONDS = 0.0001

logger = logging.getLogger(__name__)
T = TypeVar("T")
# A budget's whole state (its counts and its reservations with their lease's end) and the
# time now, in epoch seconds: every change to a budget is such a function, run by its ledger.
State = dict[str, Any]
Change = Callable[[State, float], T]


def _empty() -> State:
    return {**dict.fromkeys(_COUNTS, 0), "reservations": {}}


class _FileLedger:
    """A budget's state in a JSON file, changed under the operating system's exclusive lock
    on the file itself, which the other processes wait for; this process's threads take
    turns on a thread lock before it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def update(self, change: Change[T], purpose: str) -> T:
        with _THREAD_LOCK, open(self.path, "r+") as handle:
            self._lock(handle.fileno())
            state = {**_empty(), **json.loads(handle.read() or "{}")}
            result = change(state, time.time())
            # Overwritten in place, then cut to length: emptying it first frees its block,
            # which the filesystem must journal, several times the cost of the update. No
            # fsync: the lock already orders the writers, and the file only has to outlive a
            # process, not the machine.
            handle.seek(0)
            handle.write(json.dumps(state))
            handle.truncate()  # flushes the write first
            # Released before the close: Windows frees a closed file's locks only eventually.
            unlock_descriptor(handle.fileno())
        return result

    def _lock(self, descriptor: int) -> None:
        try:
            lock_descriptor(descriptor, poll_interval=_LOCK_POLL_SECONDS)
        except OSError as exc:  # not contention, which waits: this file cannot be locked
            raise ConfigurationError(
                f"the budget file {self.path} cannot be locked on this system ({exc}), so "
                f"its processes could spend past it: keep {settings.BUDGET_DIR.name} on a "
                f"local disk, or share the budgets through {settings.REDIS_URL.name}"
            ) from exc


class _RedisLedger:
    """A budget's state in Redis: its counts in the hash ``name``, its reservations in the
    sorted set ``name:reservations`` (scored by their lease's end). Each change is read,
    decided and written in one ``WATCH``/``MULTI`` transaction, tried again when another
    worker changed the budget meanwhile; the time is the Redis server's, the one clock every
    worker shares."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reservations = f"{name}:reservations"
        # One change at a time from this process: concurrent transactions on the same keys
        # abort each other (WATCH) and start again, so a run's threads changing the budget at
        # once would mostly retry (benchmarks/coordination.py measured it); taking turns,
        # only another machine's change makes one retry.
        self._turn = threading.Lock()

    def update(self, change: Change[T], purpose: str) -> T:
        from redis import WatchError

        from prefect_journey import coordination

        url = settings.redis_url()
        if url is None:
            raise ConfigurationError(
                f"the budget {self.name!r} lives in Redis: set {settings.REDIS_URL.name}"
            )
        with (
            self._turn,
            coordination.reaching(url, purpose),
            coordination.sync_client(url).pipeline() as pipe,
        ):
            while True:
                try:
                    return self._once(pipe, change)
                except WatchError:
                    continue  # another worker changed the budget first: decide again

    def _once(self, pipe: Any, change: Change[T]) -> T:
        pipe.watch(self.name, self.reservations)
        seconds, microseconds = pipe.time()
        counts = {k.decode(): int(v) for k, v in pipe.hgetall(self.name).items()}
        held = {
            m.decode(): until for m, until in pipe.zrange(self.reservations, 0, -1, withscores=True)
        }
        state = {**_empty(), **counts, "reservations": dict(held)}
        result = change(state, seconds + microseconds / 1e6)
        pipe.multi()
        after = {name: state[name] for name in _COUNTS}
        if after != {name: counts.get(name, 0) for name in _COUNTS}:
            pipe.hset(self.name, mapping=after)
        gone = held.keys() - state["reservations"].keys()
        if gone:
            pipe.zrem(self.reservations, *gone)
        new = {k: v for k, v in state["reservations"].items() if k not in held}
        if new:
            pipe.zadd(self.reservations, new)
        pipe.execute()
        return result


class BudgetExceededError(JourneyError):
    """Starting this call could take the campaign past its credit budget."""


class CreditBudget:
    """``limit`` credits (None: unlimited, counting only) tracked in the file at ``path``.

    :meth:`for_campaign` opens a campaign's budget where earlier runs left it;
    :meth:`create` makes a fresh one. The file holds the budget's whole life; the object
    also counts what this run did (:attr:`this_run`), for its report.

    Args:
        path: The JSON state file, which must exist; or ``redis:<key>``, a budget kept in
            the Redis of ``JOURNEY_REDIS_URL`` (what :meth:`for_campaign` gives when it is
            set).
        limit: The most credits the budget may commit, spent and in flight together; None
            counts without refusing.
        price: The credits one attempt reserves; :data:`CREDITS_PER_IMAGE` by default.

    Attributes:
        path: The state file, or ``redis:<key>``.
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
        self._ledger = (
            _RedisLedger(self.path.removeprefix(REDIS_LOCATION))
            if self.path.startswith(REDIS_LOCATION)
            else _FileLedger(self.path)
        )

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
                ``<JOURNEY_BUDGET_DIR>/<slug of name>.json``, or with ``JOURNEY_REDIS_URL``
                set its keys are ``<JOURNEY_REDIS_PREFIX>budget:{<slug of name>}`` in that
                Redis, shared by every machine.
            limit: The most credits the budget may commit over its whole life; None counts
                without refusing.

        Returns:
            The budget.

        Raises:
            ValueError: ``limit`` is negative.
            ConfigurationError: ``JOURNEY_REDIS_URL`` is malformed.
        """
        if settings.redis_url() is not None:
            # Braces: a Redis cluster keeps the budget's two keys on one node, which a
            # transaction over both needs.
            return cls(
                f"{REDIS_LOCATION}{settings.redis_prefix()}budget:{{{slugify(name)}}}", limit
            )
        path = settings.budget_dir(Path(PREFECT_HOME.value())) / f"{slugify(name)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x") as handle:  # first run of the campaign: only one creates it
                handle.write(json.dumps(_empty()))
        except FileExistsError:
            pass
        return cls(path, limit)

    def _update(self, change: Change[T], purpose: str) -> T:
        """Run ``change`` on the state, after counting the reservations whose lease has
        passed (a killed process's calls) as spent and possibly billed."""

        def expiring_first(state: State, now: float) -> T:
            expired = [key for key, until in state["reservations"].items() if until <= now]
            for key in expired:
                del state["reservations"][key]
                state["spent"] += self.price
                state["possibly_billed"] += 1
            return change(state, now)

        return self._ledger.update(expiring_first, purpose)

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
            RedisUnavailableError: The budget lives in Redis, which did not answer: nothing
                is reserved, so the call must not start.
            ConfigurationError: The budget file cannot be locked on this system (a
                filesystem without file locks): nothing is reserved.
        """
        lease = policy.worst_case_attempt_timeout() if lease is None else lease
        reservation = uuid.uuid4().hex

        def reserve(state: State, now: float) -> tuple[bool, int, int]:
            in_flight = self.price * len(state["reservations"])
            refused = self.limit is not None and state["spent"] + in_flight + self.price > (
                self.limit
            )
            if refused:
                state["refused"] += 1
            else:
                state["reservations"][reservation] = now + lease
                state["calls"] += 1
            return refused, state["spent"], in_flight

        refused, spent, in_flight = self._update(
            reserve, "to reserve the credits of a call, so the call was not made"
        )
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

        def settle(state: State, now: float) -> None:
            if state["reservations"].pop(reservation, None) is not None:
                state["spent"] += spent
                state["possibly_billed"] += doubt

        self._count(spent=spent, possibly_billed=doubt)
        self._update_or_leave_to_lease(settle, "to settle a call's reservation")

    def recovered(self, *, billed: bool) -> None:
        """A possibly-billed attempt's fate became known from its webhook delivery.

        It no longer counts as possibly billed, and its credits stay spent only if the
        delivery shows an image was made.

        Args:
            billed: The delivery carried a finished image (False: the provider refused it,
                which is not billed).
        """
        given_back = 0 if billed else self.price

        def recovered(state: State, now: float) -> None:
            state["possibly_billed"] -= 1
            state["spent"] -= given_back

        self._count(possibly_billed=-1, spent=-given_back)
        self._update_or_leave_to_lease(recovered, "to count a recovered call")

    def _update_or_leave_to_lease(self, change: Change[None], purpose: str) -> None:
        """Run ``change``, unless Redis cannot be reached: the budget then keeps counting
        the call as spent (its reservation's lease counts it so), which never lets a call
        start that the budget would refuse."""
        try:
            self._update(change, purpose)
        except RedisUnavailableError as exc:
            logger.warning("%s; the budget counts the call as spent", exc)

    def snapshot(self) -> dict[str, Any]:
        """The budget over its whole life: calls, credits spent (possibly-billed counted),
        in flight, refusals, the limit and what is left of it.

        Returns:
            ``calls``, ``spent``, ``in_flight``, ``possibly_billed`` (attempts that ended
            in a failure that may have been billed and whose fate no webhook delivery told),
            ``refused``, ``limit`` and ``left`` (None without a limit).

        Raises:
            RedisUnavailableError: The budget lives in Redis, which did not answer.
            ConfigurationError: The budget file cannot be locked on this system.
        """

        def read(state: State, now: float) -> tuple[dict[str, int], int]:
            counts = {name: state[name] for name in _COUNTS}
            return counts, self.price * len(state["reservations"])

        counts, in_flight = self._update(read, "to read the budget")
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
