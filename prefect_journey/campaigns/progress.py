"""How far a campaign is: the counts and credits its progress artifact shows and, when the
flow runs on a terminal, a live progress bar beside Prefect's log lines (with the rate and
the time left).

Each item is reported as it ends, whatever the grouping (:meth:`CampaignProgress.finished`). The bar
draws on the console Prefect prints its log lines on, so they scroll above it instead of
tearing it; without a terminal (a worker, a pipe, CI) nothing is drawn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.theme import Theme

from prefect_journey._compat import prefect_console
from prefect_journey.budget import CreditBudget
from prefect_journey.campaigns.pipeline import ItemOutcome
from prefect_journey.errors import JourneyError
from prefect_journey.models import display_text

# The bar's redraws a second, and how often it reads the budget file for the credits spent.
BAR_REFRESHES_PER_SECOND = 4
CREDITS_READ_INTERVAL = 0.5
LABEL_CHARS = 40
_one_bar = threading.Lock()


class CampaignProgress:
    """Counts of a campaign's finished items; thread-safe (each executor reports from its
    own thread or event loop).

    Attributes:
        total: Items in the campaign.
        done: Items finished, cache hits found before the run included.
        stored: Items stored (cache hits included).
        cache_hits: Items whose image an earlier run paid for.
        failed: Items that failed (those left possibly billed included).
        skipped: Items the budget refused.
    """

    def __init__(
        self,
        total: int,
        budget: CreditBudget | None = None,
        bar: Progress | None = None,
        label: str = "",
        settled: Iterable[ItemOutcome] = (),
    ) -> None:
        self.total = total
        self.done = self.stored = self.cache_hits = self.failed = self.skipped = 0
        self._budget = budget
        self._bar = bar
        self._bar_task = None
        self._credits = 0
        self._credits_read = 0.0
        self._lock = threading.Lock()
        for outcome in settled:
            self._count(outcome)
        # The rate counts only what this run finishes: items known before it took no time.
        self._known_at_start = self.done
        self._started = time.monotonic()
        if bar is not None:
            label = display_text(label, LABEL_CHARS)
            self._bar_task = bar.add_task(label, total=total, summary="", pace="")
        self._draw()

    @property
    def share(self) -> float:
        """The share of items finished, 0 to 1 (1 for an empty campaign)."""
        return self.done / self.total if self.total else 1.0

    def finished(self, outcome: ItemOutcome) -> None:
        """Count one finished item and redraw the bar, if there is one.

        Args:
            outcome: The item's outcome.
        """
        with self._lock:
            self._count(outcome)
            self._draw()

    def summary(self) -> str:
        """The counts as a person reads them, on the bar and on the progress artifact.

        Returns:
            For example ``"stored 40 · cache hits 2 · failed 1 · left 59 · 164 of
            max_credits 400 spent"``: with ``max_credits`` the campaign's spending over all
            its runs, else this run's.
        """
        with self._lock:
            self._read_credits(force=True)
            return self._summary()

    def _count(self, outcome: ItemOutcome) -> None:
        self.done += 1
        self.stored += outcome.status == "stored"
        self.cache_hits += outcome.cached
        self.failed += outcome.status in ("failed", "possibly_billed")
        self.skipped += outcome.status == "skipped"

    def _read_credits(self, force: bool = False) -> None:
        """What the budget says is spent: this run's, or with ``max_credits`` the campaign's
        over all its runs (read from the budget's file or Redis at most every
        :data:`CREDITS_READ_INTERVAL`; a failed read keeps the last figure, the run itself
        finds out)."""
        now = time.monotonic()
        if not self._budget or (not force and now - self._credits_read <= CREDITS_READ_INTERVAL):
            return
        self._credits_read = now
        if self._budget.limit is None:
            self._credits = self._budget.this_run["spent"]
            return
        with suppress(JourneyError):
            self._credits = self._budget.snapshot()["spent"]

    def _summary(self) -> str:
        limit = self._budget.limit if self._budget else None
        credits = f"{self._credits} credits"
        if limit is not None:
            credits = f"{self._credits} of max_credits {limit} spent"
        return (
            f"stored {self.stored} · cache hits {self.cache_hits} · failed {self.failed}"
            + (f" · skipped {self.skipped}" if self.skipped else "")
            + f" · left {self.total - self.done} · {credits}"
        )

    def _pace(self) -> str:
        """Images a minute in this run and the time left at that rate, once there is one."""
        finished = self.done - self._known_at_start
        elapsed = time.monotonic() - self._started
        left = self.total - self.done
        if finished == 0 or elapsed <= 0:
            return "" if left == 0 else "-- images/min"
        rate = finished / elapsed
        eta = "" if left == 0 else f" · about {_duration(left / rate)} left"
        return f"{rate * 60:.1f} images/min{eta}"

    def _draw(self) -> None:
        if self._bar is None or self._bar_task is None:
            return
        self._read_credits(force=self.share == 1)
        self._bar.update(
            self._bar_task, completed=self.done, summary=self._summary(), pace=self._pace()
        )


def _duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``4m05s`` or ``12s``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@contextmanager
def campaign_progress(
    name: str,
    total: int,
    settled: Iterable[ItemOutcome] = (),
    budget: CreditBudget | None = None,
) -> Iterator[CampaignProgress]:
    """A campaign's progress, drawn live while the block runs when stderr is a terminal.

    Args:
        name: The campaign's name, shown before the bar.
        total: Items in the campaign.
        settled: Outcomes known before the run (cache hits, refused keys).
        budget: The run's budget, for the credits spent.

    Yields:
        The progress the executors report to.
    """
    console = prefect_console() or Console(stderr=True)
    # One bar at a time: a second campaign in the same process (threads, gathered async
    # flows) counts without drawing, instead of stacking live displays on one console.
    drawing = _on_a_terminal(console) and _one_bar.acquire(blocking=False)
    bar = None
    if drawing:
        bar = Progress(
            # Names are data: neither format fields nor rich markup.
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[summary]}", markup=False),
            TextColumn("{task.fields[pace]}", markup=False),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=BAR_REFRESHES_PER_SECOND,
        )
    try:
        with _styled(console) if bar is not None else nullcontext(), bar or nullcontext():
            yield CampaignProgress(total, budget, bar, f"campaign {name}", settled)
    finally:
        if drawing:
            _one_bar.release()


def _on_a_terminal(console: Console) -> bool:
    """Whether ``console`` writes to a real terminal: rich's own test also says yes when
    colours are forced (``FORCE_COLOR``, ``TTY_COMPATIBLE``), as CI logs often are, and a
    redrawn bar there is hundreds of lines of escape codes."""
    isatty = getattr(console.file, "isatty", None)
    return console.is_terminal and callable(isatty) and bool(isatty())


@contextmanager
def _styled(console: Console) -> Iterator[None]:
    """Rich's default styles on ``console`` for the bar's life: Prefect's console knows only
    the styles of its log lines (its theme does not inherit rich's), and the bar's columns
    name rich's."""
    console.push_theme(Theme())
    try:
        yield
    finally:
        console.pop_theme()
