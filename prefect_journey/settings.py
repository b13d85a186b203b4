"""Every ``JOURNEY_*`` environment variable: its name, its default and its check, in one place.

Values are read when asked for, not at import, so a process (or a test) that sets a variable
after importing the package is still heard. A malformed value raises
:class:`~prefect_journey.errors.ConfigurationError` naming the variable, before anything is
sent or spent. :data:`VARIABLES` lists them all; the Configuration page of the docs is its
rendering (a test keeps the two equal).

This module does not import Prefect.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from prefect_journey import policy
from prefect_journey.errors import ConfigurationError


@dataclass(frozen=True)
class Variable:
    """One environment variable the package reads."""

    name: str
    default: str
    description: str


API_KEY = Variable(
    "JOURNEY_API_KEY",
    "(none)",
    "The API key, when no key is passed and no JourneyCredentials block is named.",
)
BASE_URL = Variable(
    "JOURNEY_BASE_URL",
    "https://api.journeyapi.com",
    "The API root (plain http only on loopback, for the emulator).",
)
READ_TIMEOUT = Variable(
    "JOURNEY_READ_TIMEOUT",
    "(formula)",
    "Seconds to wait for a generation, for every client not given read_timeout; "
    "by default a formula of resolution and reference count. The attempt and task deadlines "
    "are sized from it, so none cuts a call off before it.",
)
DESTINATION = Variable(
    "JOURNEY_DESTINATION",
    "./outputs",
    "Where flows store images when given neither destination nor destination_block.",
)
BUDGET_DIR = Variable(
    "JOURNEY_BUDGET_DIR",
    "$PREFECT_HOME/journey/budgets",
    "Folder of the campaigns' credit budgets, which outlive runs (one file per budget name).",
)
LOCK_LEASE_SECONDS = Variable(
    "JOURNEY_LOCK_LEASE_SECONDS",
    "60",
    "Lease of the image locks; a killed run's images are free again within one lease.",
)
WEBHOOK_SECRET = Variable(
    "JOURNEY_WEBHOOK_SECRET",
    "(none)",
    "The webhook secret of the receiver and the runs, 32 random bytes or more (make one with "
    "prefect-journey new-secret); never sent: the keys that check deliveries are derived "
    "from it.",
)
WEBHOOK_URL = Variable(
    "JOURNEY_WEBHOOK_URL",
    "(none)",
    "The public URL of the webhook receiver (https, or http on loopback), when no "
    "JourneyWebhookReceiver block is named; with JOURNEY_WEBHOOK_SECRET it turns on the "
    "recovery of possibly-billed generations.",
)
RECOVERY_WINDOW = Variable(
    "JOURNEY_RECOVERY_WINDOW",
    f"{policy.RECOVERY_WINDOW:g}",
    "Seconds a possibly-billed attempt waits for its webhook delivery before it is retried.",
)
IMAGE_HOSTS = Variable(
    "JOURNEY_IMAGE_HOSTS",
    "(any public host)",
    "Comma-separated host names images may be downloaded from (and redirected to); "
    "*.example.com stands for any name under example.com. Empty: any host whose addresses "
    "are public.",
)
PRIVATE_ENDPOINTS = Variable(
    "JOURNEY_PRIVATE_ENDPOINTS",
    "(none)",
    "Comma-separated host:port endpoints that downloads and reference URLs may reach on a "
    "non-public address (a local MinIO, a test server); the configured API "
    "(JOURNEY_BASE_URL) always may.",
)
REDIS_URL = Variable(
    "JOURNEY_REDIS_URL",
    "(none)",
    "A Redis the workers share (redis://, rediss://, unix:// or redis+sentinel://): with it "
    "the image locks, the campaigns' credit budgets and the receiver's memory of deliveries "
    "live there, so that runs on several machines pay once; never shown with its password.",
)
REDIS_BLOCK = Variable(
    "JOURNEY_REDIS_BLOCK",
    "(none)",
    "The name of a saved JourneyRedis block to read the Redis URL, key prefix and lock lease "
    "from, instead of JOURNEY_REDIS_URL (which wins when both are set): the password stays in "
    "the block, not in the workers' environment.",
)
REDIS_PREFIX = Variable(
    "JOURNEY_REDIS_PREFIX",
    "journey:",
    "The start of every key the package writes in JOURNEY_REDIS_URL's Redis, so that several "
    "deployments can share one Redis.",
)
PARTIAL_LEASE_SECONDS = Variable(
    "JOURNEY_PARTIAL_LEASE_SECONDS",
    "300",
    "Age after which a store removes an unfinished write no live writer holds: a local "
    ".part file anywhere in its folder, a pending S3 multipart upload of its key.",
)
BLOCK_LOGO_URL = Variable(
    "JOURNEY_BLOCK_LOGO_URL",
    "(the project's repository)",
    "The http(s) address the Blocks' logo is registered with (prefect block register): one "
    "the browsers of a Prefect server without internet reach, such as the webhook receiver's "
    "/logo.png, which serves the logo shipped in the package.",
)

VARIABLES: tuple[Variable, ...] = (
    API_KEY,
    BASE_URL,
    READ_TIMEOUT,
    DESTINATION,
    BUDGET_DIR,
    LOCK_LEASE_SECONDS,
    WEBHOOK_SECRET,
    WEBHOOK_URL,
    RECOVERY_WINDOW,
    IMAGE_HOSTS,
    PRIVATE_ENDPOINTS,
    PARTIAL_LEASE_SECONDS,
    REDIS_URL,
    REDIS_BLOCK,
    REDIS_PREFIX,
    BLOCK_LOGO_URL,
)

DEFAULT_BASE_URL = BASE_URL.default
# The logo file ships in the package (prefect_journey/assets/logo.png); Prefect's API takes a
# block logo only as an http(s) address, and this one needs internet in the browser.
DEFAULT_BLOCK_LOGO_URL = "https://raw.githubusercontent.com/journeyapi/prefect-journey/main/prefect_journey/assets/logo.png"
DEFAULT_DESTINATION = DESTINATION.default
# A killed run's images wait this long before another run may generate them; renewing every
# 20 s costs nothing next to calls that take minutes.
DEFAULT_LEASE_SECONDS = 60.0
# Renewal runs every third of a lease: below a second it would be a busy loop of file writes.
MIN_LEASE_SECONDS = 1.0
# A live writer's unfinished write lasts at most its download deadline (130 s with the
# default 100 MB cap, policy.download_deadline) plus its commit (an upload's last part and
# completion): five minutes is well above both, and short enough that the runs after a kill
# find its leftovers stale. S3 shows no owner of an upload, only its age, so this lease is
# all that keeps a store from aborting the upload of another run storing the same image.
DEFAULT_PARTIAL_LEASE_SECONDS = 300.0
# The URL schemes redis-py (and prefect-redis, for Sentinel) connect with.
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


def _raw(variable: Variable) -> str | None:
    value = os.environ.get(variable.name)
    return value if value and value.strip() else None


def api_key() -> str | None:
    """``JOURNEY_API_KEY``, or None when unset or blank."""
    return _raw(API_KEY)


def base_url() -> str:
    """``JOURNEY_BASE_URL``, else the provider's API root."""
    return _raw(BASE_URL) or DEFAULT_BASE_URL


def read_timeout() -> float | None:
    """``JOURNEY_READ_TIMEOUT`` in seconds, or None to use the formula.

    Raises:
        ConfigurationError: The value is not a positive number.
    """
    return _positive_seconds(READ_TIMEOUT, minimum=0.0, inclusive=False)


def destination() -> str:
    """``JOURNEY_DESTINATION``, else ``./outputs``."""
    return _raw(DESTINATION) or DEFAULT_DESTINATION


def budget_dir(prefect_home: Path) -> Path:
    """``JOURNEY_BUDGET_DIR``, else ``journey/budgets`` under ``prefect_home``: durable,
    beside the image locks, since a campaign's budget outlives its runs.

    Args:
        prefect_home: Prefect's home folder (this module does not import Prefect).
    """
    raw = _raw(BUDGET_DIR)
    return Path(raw) if raw else prefect_home / "journey" / "budgets"


def lock_lease_seconds() -> float:
    """``JOURNEY_LOCK_LEASE_SECONDS``, else 60.

    Raises:
        ConfigurationError: Not a number of seconds of at least 1.
    """
    seconds = _positive_seconds(LOCK_LEASE_SECONDS, minimum=MIN_LEASE_SECONDS, inclusive=True)
    return DEFAULT_LEASE_SECONDS if seconds is None else seconds


def block_logo_url() -> str:
    """``JOURNEY_BLOCK_LOGO_URL``, else :data:`DEFAULT_BLOCK_LOGO_URL`; read whenever Prefect
    registers one of the package's block types.

    Raises:
        ConfigurationError: Not an http(s) URL with a host.
    """
    url = _raw(BLOCK_LOGO_URL)
    if url is None:
        return DEFAULT_BLOCK_LOGO_URL
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{BLOCK_LOGO_URL.name}: {url!r} is not an http(s) address (Prefect shows a block "
            "logo only from one), e.g. http://receiver.internal:8780/logo.png"
        )
    return url.strip()


def webhook_secret() -> str:
    """``JOURNEY_WEBHOOK_SECRET``, or an empty string when unset."""
    return _raw(WEBHOOK_SECRET) or ""


def webhook_url() -> str | None:
    """``JOURNEY_WEBHOOK_URL``, or None when unset."""
    return _raw(WEBHOOK_URL)


def recovery_window() -> float:
    """``JOURNEY_RECOVERY_WINDOW`` in seconds, else :data:`~prefect_journey.policy.RECOVERY_WINDOW`.

    Raises:
        ConfigurationError: Not a positive number of seconds.
    """
    seconds = _positive_seconds(RECOVERY_WINDOW, minimum=0.0, inclusive=False)
    return policy.RECOVERY_WINDOW if seconds is None else seconds


def image_hosts() -> tuple[str, ...]:
    """``JOURNEY_IMAGE_HOSTS`` as lower-case host names; empty when unset (any public host).

    Raises:
        ConfigurationError: An entry is not a host name (a scheme, a port, a path, or a
            ``*`` other than a leading ``*.``).
    """
    hosts = tuple(_entries(IMAGE_HOSTS))
    for host in hosts:
        name = host.removeprefix("*.")
        if not name or any(c in name for c in "*/:@[] ") or name.startswith("."):
            raise ConfigurationError(
                f"{IMAGE_HOSTS.name}: {host!r} is not a host name (cdn.example.com, *.example.com)"
            )
    return hosts


def private_endpoints() -> tuple[str, ...]:
    """``JOURNEY_PRIVATE_ENDPOINTS`` as its lower-case ``host:port`` entries; empty when unset.

    The entries are parsed where they are compared, by
    :meth:`prefect_journey.address_rules.AddressRules.from_settings`, which names this
    variable when one is not ``host:port``.
    """
    return tuple(_entries(PRIVATE_ENDPOINTS))


def partial_lease_seconds() -> float:
    """``JOURNEY_PARTIAL_LEASE_SECONDS``, else 300.

    Raises:
        ConfigurationError: Not a positive number of seconds.
    """
    seconds = _positive_seconds(PARTIAL_LEASE_SECONDS, minimum=0.0, inclusive=False)
    return DEFAULT_PARTIAL_LEASE_SECONDS if seconds is None else seconds


def redis_url() -> str | None:
    """``JOURNEY_REDIS_URL``, or None when unset: one machine, no Redis.

    Raises:
        ConfigurationError: The value is not a Redis URL (the message shows it without its
            password).
    """
    raw = _raw(REDIS_URL)
    return None if raw is None else check_redis_url(raw, what=REDIS_URL.name)


def check_redis_url(raw: str, *, what: str) -> str:
    """``raw`` stripped, if it is a Redis URL.

    Args:
        raw: The URL.
        what: Where it comes from, for the error (a variable, a block's field).

    Raises:
        ConfigurationError: Not a Redis URL (the message shows it without its password).
    """
    url = raw.strip()
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES or not (parts.netloc or parts.path):
        raise ConfigurationError(
            f"{what} must be a Redis URL ({', '.join(s + '://' for s in REDIS_SCHEMES)}"
            f"), got {redacted_url(url)!r}"
        )
    return url


def use_redis(url: str, prefix: str, lease_seconds: float) -> None:
    """Set this process's Redis variables (``JOURNEY_REDIS_BLOCK``'s block gives them): the
    prefix and the lease unless already set, then the URL.

    Args:
        url: The Redis URL (checked by :func:`check_redis_url`).
        prefix: The key prefix.
        lease_seconds: The image locks' lease.
    """
    if _raw(REDIS_PREFIX) is None:
        os.environ[REDIS_PREFIX.name] = prefix
    if _raw(LOCK_LEASE_SECONDS) is None:
        os.environ[LOCK_LEASE_SECONDS.name] = str(lease_seconds)
    os.environ[REDIS_URL.name] = check_redis_url(url, what="the block's url")


def redis_block() -> str | None:
    """``JOURNEY_REDIS_BLOCK``: the name of a saved ``JourneyRedis`` block, or None."""
    raw = _raw(REDIS_BLOCK)
    return None if raw is None else raw.strip()


def redis_prefix() -> str:
    """``JOURNEY_REDIS_PREFIX``, else ``journey:``."""
    return _raw(REDIS_PREFIX) or REDIS_PREFIX.default


def redacted_url(url: str) -> str:
    """``url`` without its password, to show it in a message or a log.

    Args:
        url: A URL, possibly ``scheme://user:password@host/...``.

    Returns:
        The URL with the password replaced by ``***``, and any ``password=`` query option
        too (redis-py reads one there).

    Example:
        ```python
        from prefect_journey.settings import redacted_url

        assert redacted_url("redis://:hunter2@cache:6379/0") == "redis://:***@cache:6379/0"
        ```
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, _, host = netloc.rpartition("@")
        user, has_password, _ = credentials.partition(":")
        netloc = f"{user}:***@{host}" if has_password else f"{user}@{host}"
    query = "&".join(
        f"{name}=***" if name.lower() in ("password", "sentinel_password") else option
        for option in parts.query.split("&")
        if option
        for name in [option.partition("=")[0]]
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _entries(variable: Variable) -> list[str]:
    raw = _raw(variable) or ""
    return [entry.strip().lower() for entry in raw.split(",") if entry.strip()]


def _positive_seconds(variable: Variable, *, minimum: float, inclusive: bool) -> float | None:
    raw = _raw(variable)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    in_range = seconds >= minimum if inclusive else seconds > minimum
    if not (math.isfinite(seconds) and in_range):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ConfigurationError(
            f"{variable.name} must be a number of seconds {bound}, got {raw!r}"
        )
    return seconds
