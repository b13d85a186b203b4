"""Emulator settings: accepted keys, credits, the latency model, the fault plan and the
quota."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

# Faults of the API endpoints. Billing mirrors what a caller must assume: a refusal before
# work (400, 429, 503) and a content refusal ("failed") are free; every other fault happens
# after the image was made and is billed. "400" stands for a rule the server enforces and
# the client does not know about. "gateway_502" and "gateway_503" are a gateway in front of
# the provider answering at once while the generation goes on, billed and delivered: the
# cases a caller cannot tell from a 502 or a 503 of the provider itself.
API_FAULTS = (
    "400",
    "429",
    "503",
    "500",
    "drop",
    "slow",
    "failed",
    "malformed",
    "gateway_502",
    "gateway_503",
)
# Faults of the CDN download.
CDN_FAULTS = ("truncate", "corrupt")
# Faults of a webhook delivery: never sent, sent twice, sent after ``late_seconds``, or sent
# with a wrong secret (the receiver refuses it, the provider retries, and gives up).
WEBHOOK_FAULTS = ("lost", "duplicate", "late", "wrong_secret")
FAULT_KINDS = API_FAULTS + CDN_FAULTS + WEBHOOK_FAULTS
FaultFamily = Literal["api", "cdn", "webhook"]
FAMILIES: dict[str, tuple[str, ...]] = {
    "api": API_FAULTS,
    "cdn": CDN_FAULTS,
    "webhook": WEBHOOK_FAULTS,
}

DEFAULT_API_KEY = "journey-emulator-key"
DEFAULT_CREDITS = 10_000


@dataclass
class LatencyModel:
    """Generation time: ``base[resolution] + per_reference x references``, +/- jitter.

    Defaults follow public reports: a bare 1K image in ~8 s, 14 references at 1K in
    30-60 s. ``time_scale`` multiplies the modelled time (0.01 makes tests fast); ``fixed``
    replaces the model, scale included, with one constant (benchmarks).

    Attributes:
        base: Seconds for a request without references, per resolution; 1K 8 s, 2K 12 s,
            4K 20 s by default.
        per_reference: Seconds added per reference image; 2.5 by default.
        jitter: The share of the time drawn at random either way; 0.2 (+/- 20 %) by
            default.
        time_scale: Multiplies the modelled time; 1.0 by default.
        fixed: Seconds every generation takes, whatever the request; None (the default)
            uses the model.
    """

    base: dict[str, float] = field(default_factory=lambda: {"1K": 8.0, "2K": 12.0, "4K": 20.0})
    per_reference: float = 2.5
    jitter: float = 0.2
    time_scale: float = 1.0
    fixed: float | None = None

    def seconds(self, reference_count: int, resolution: str | None, rng: random.Random) -> float:
        """How long one generation takes.

        Args:
            reference_count: The number of reference images in the request.
            resolution: ``"1K"``, ``"2K"`` or ``"4K"``; None means 1K.
            rng: The random source of the jitter.

        Returns:
            ``fixed`` when set, else the modelled, jittered and scaled time, in seconds.
        """
        if self.fixed is not None:
            return self.fixed
        nominal = self.base[resolution or "1K"] + self.per_reference * reference_count
        spread = 1 + self.jitter * (2 * rng.random() - 1)
        return nominal * spread * self.time_scale


@dataclass
class FaultPlan:
    """Which faults to inject: random at ``rates`` (seeded) and/or forced from ``queue``.

    Forced faults are taken first, in order, one per request of their family, which lets a
    test script an exact sequence ("429 then 503 then succeed").

    Attributes:
        rates: The probability of each fault kind (:data:`FAULT_KINDS`) per request of its
            family, each within 0..1; one draw per request, so a family's rates should add
            up to at most 1. Empty by default: no random faults.
        seed: Seeds the random draws (and the emulator's other randomness at each reset);
            0 by default.
        retry_after: The ``Retry-After`` seconds sent with a 429 or 503; 1.0 by default.
        slow_seconds: The extra wait of a ``slow`` answer; by default 300 s, past any
            computed read timeout.
        late_seconds: The extra wait of a ``late`` webhook delivery; by default 600 s, past
            any recovery window.
        queue: Faults forced in order, per family: ``"api"`` (:data:`API_FAULTS`),
            ``"cdn"`` (:data:`CDN_FAULTS`) and ``"webhook"`` (:data:`WEBHOOK_FAULTS`);
            lists are accepted. Empty by default.

    Raises:
        ValueError: An unknown fault kind, a rate outside 0..1, or a queued fault of the
            wrong family.

    Example:
        ```python
        from prefect_journey.emulator import FaultPlan

        plan = FaultPlan(rates={"500": 0.05}, queue={"api": ["429", "503"]}, seed=7)
        assert plan.draw("api") == "429"
        ```
    """

    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    retry_after: float = 1.0
    # "Slower than the client's timeout": the default is past any computed read timeout.
    slow_seconds: float = 300.0
    late_seconds: float = 600.0
    queue: dict[str, deque[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, rate in self.rates.items():
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
            if not 0 <= rate <= 1:
                raise ValueError(f"fault rate for {kind!r} must be within 0..1")
        unknown = set(self.queue) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown fault families {sorted(unknown)}; known: {list(FAMILIES)}")
        self.queue = {family: deque(self.queue.get(family, ())) for family in FAMILIES}
        for family, allowed in FAMILIES.items():
            for kind in self.queue[family]:
                if kind not in allowed:
                    raise ValueError(f"fault {kind!r} cannot be queued for {family}")
        self._rng = random.Random(self.seed)
        # Deliveries draw from their own stream, so that asking for webhooks leaves the
        # seeded API and CDN faults of a run as they were.
        self._webhook_rng = random.Random(f"webhook:{self.seed}")

    def draw(self, family: FaultFamily) -> str | None:
        """The fault to inject into the next request of ``family``, if any.

        Args:
            family: ``"api"`` for the API endpoints, ``"cdn"`` for downloads, ``"webhook"``
                for webhook deliveries.

        Returns:
            The next queued fault of the family, else one drawn at ``rates``, else None.
        """
        if self.queue[family]:
            return self.queue[family].popleft()
        kinds = FAMILIES[family]
        roll = (self._webhook_rng if family == "webhook" else self._rng).random()
        for kind in kinds:
            roll -= self.rates.get(kind, 0.0)
            if roll < 0:
                return kind
        return None


@dataclass
class Quota:
    """A provider's rate plan: at most ``calls`` generations per window of ``window`` seconds.

    The first ``imagine`` call (since the emulator started, was reset or was given this
    quota) opens the first window; the next opens ``window`` seconds later, and so on. A
    call past the quota of its window is answered 429 with ``Retry-After``: the seconds until
    that window ends, rounded up; it is not billed and does not count. Every authorised,
    valid call the quota admits counts, whatever fault the plan then injects into it. The
    window is wall-clock seconds, like ``Retry-After`` and the other waits of the fault plan:
    ``time_scale`` scales generations only.

    Attributes:
        calls: Calls admitted per window; at least 1.
        window: The window's length in seconds; 60 by default.

    Raises:
        ValueError: ``calls`` below 1, or ``window`` not above 0.

    Example:
        ```python
        from prefect_journey.emulator import EmulatorConfig, Quota

        config = EmulatorConfig(quota=Quota(calls=10, window=60))
        ```
    """

    calls: int
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.calls < 1:
            raise ValueError("a quota admits at least 1 call per window")
        if not self.window > 0:
            raise ValueError("a quota's window must be longer than 0 s")


@dataclass
class EmulatorConfig:
    """The emulator's settings: accepted keys, the account, latency, faults and images.

    Attributes:
        api_keys: The keys accepted in the ``Authorization`` header;
            ``("journey-emulator-key",)`` by default.
        credits: The account's credits at start and after each reset; 10,000 by default.
        latency: How long generations take; :class:`LatencyModel`'s defaults by default.
        faults: The faults to inject; none by default.
        jpeg_as_png_rate: The fraction of images served as JPEG bytes under their ``.png``
            URL, as the real CDN does; 0 by default.
        realistic_sizes: Adds photo-like grain so that PNG sizes match real outputs
            (slower to render); False by default.
        plain_images: Images of one flat colour (the prompt's) with no text, of the same
            sizes and formats: a twentieth of the render's CPU, for a test suite that counts and
            stores thousands of them; ignored with ``realistic_sizes``. False by default.
        cdn_chunk_delay: Seconds the CDN waits before each 64 KB piece of an image, to
            serve slow downloads (a test kills a run while they stream); 0 by default.
        webhook_delay: Seconds between a generation's end and its webhook delivery; 0 by
            default.
        webhook_retry_delays: The waits before each retry of a refused or failed delivery;
            the provider's 10, 30 and 90 s by default.
        quota: At most so many generations per window (:class:`Quota`); None (the
            default) for no quota.
        email: The account's e-mail address.
        plan: The account's plan.

    Example:
        ```python
        from prefect_journey.emulator import EmulatorConfig, FaultPlan, LatencyModel

        config = EmulatorConfig(
            credits=100,
            latency=LatencyModel(time_scale=0.01),
            faults=FaultPlan(rates={"429": 0.1}, seed=1),
        )
        ```
    """

    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    credits: int = DEFAULT_CREDITS
    latency: LatencyModel = field(default_factory=LatencyModel)
    faults: FaultPlan = field(default_factory=FaultPlan)
    # Fraction of images served as JPEG bytes under their ``.png`` URL, as the real CDN does.
    jpeg_as_png_rate: float = 0.0
    # Photo-like grain so PNG sizes match real outputs (slower to render).
    realistic_sizes: bool = False
    plain_images: bool = False
    cdn_chunk_delay: float = 0.0
    webhook_delay: float = 0.0
    webhook_retry_delays: tuple[float, ...] = (10.0, 30.0, 90.0)
    quota: Quota | None = None
    email: str = "emulator@example.com"
    plan: str = "emulator"
