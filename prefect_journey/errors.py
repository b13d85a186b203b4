"""The error hierarchy: one class per thing a caller can do something about.

Every error answers two questions a scheduler needs:

- ``retryable``: the request certainly did not reach a point where it could be billed
  (connection refused, 429, 503): retrying costs nothing.
- ``possibly_billed``: the outcome is unknown (read timeout after the request was sent,
  500/502/504, a connection dropped mid-response): the image may exist and the credits may
  be spent. A retry may bill twice, so the client never retries these on a paid call; the
  Prefect layer decides, and counts such retries.

Messages are built by this package from status codes and the server's error text with any
known secret removed: no error carries the API key or a webhook secret.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

REDACTED = "[REDACTED]"


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` with ``[REDACTED]``.

    Error messages quote the server's own words, which may echo what was sent; this keeps
    the API key and the webhook secret out of them.

    Args:
        text: The text to clean, such as a server's error message.
        secrets: The values to remove; None and empty strings are skipped.

    Returns:
        ``text`` with each secret replaced by :data:`REDACTED`.

    Example:
        ```python
        from prefect_journey.errors import redact

        assert redact("key sk-123 refused", ["sk-123", None]) == "key [REDACTED] refused"
        ```
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def failure_text(error: BaseException) -> str:
    """The one-line reason a step failed, as reports and logs show it.

    Args:
        error: The exception that ended the step.

    Returns:
        ``"<class name>: <message>"``: the error's class and its own message (which never
        carries a secret, see the module docstring).
    """
    return f"{type(error).__name__}: {error}"


class JourneyError(Exception):
    """Base class of every error this package raises.

    ``str(error)`` is the message followed by ``[retryable]`` and/or ``[possibly billed]``
    when those flags are set, so a log line tells a scheduler's decision at a glance.

    Args:
        message: What went wrong, built by this package and free of secrets.
        status_code: The HTTP status that caused the error; None when there was no answer.
        retryable: Overrides the class's ``retryable`` for this one error; None keeps the
            class's value.

    Attributes:
        message: The message given to the constructor.
        status_code: The HTTP status that caused the error, or None.
        retryable: True when the request certainly did not reach a point where it could be
            billed, so retrying costs nothing.
        possibly_billed: True when the outcome is unknown and the call may have been billed,
            so a retry may bill twice.
    """

    retryable: bool = False
    possibly_billed: bool = False

    def __init__(
        self, message: str, *, status_code: int | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        hints = []
        if self.retryable:
            hints.append("retryable")
        if self.possibly_billed:
            hints.append("possibly billed")
        suffix = f" [{', '.join(hints)}]" if hints else ""
        return f"{self.message}{suffix}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status_code={self.status_code!r})"


class ConfigurationError(JourneyError, ValueError):
    """The client or a part it relies on cannot be set up: no API key, a malformed base URL,
    a bad timeout, a budget file that cannot be locked."""


class JourneyValidationError(JourneyError, ValueError):
    """The request breaks a rule (ours before sending, or the server's 400/422).

    Args:
        message: What went wrong.
        status_code: 400 or 422 when the server refused the request; None when the rule was
            checked before sending.
        problems: One line per broken rule; None means ``[message]``.

    Attributes:
        problems: One line per broken rule (``"field: reason"`` when built from pydantic).
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, problems: list[str] | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.problems = problems or [message]

    @classmethod
    def from_pydantic(cls, exc: ValidationError, what: str) -> JourneyValidationError:
        """Summarise a pydantic error by field and reason only, never the input value.

        The input is left out because it may be a secret (a webhook secret, a presigned URL).

        Args:
            exc: The pydantic error to summarise.
            what: The name of what was validated (``"ImagineRequest"``); it also stands for
                the location of an error that names no field.

        Returns:
            An error whose message is ``"invalid <what>: "`` followed by every problem, and
            whose ``problems`` lists them one by one.
        """
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or what
            reason = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {reason}")
        return cls(f"invalid {what}: " + "; ".join(problems), problems=problems)


class AuthenticationError(JourneyError):
    """401/403: the API key is missing, wrong or revoked."""


class InsufficientCreditsError(JourneyError):
    """402: the account has too few credits for this call."""


class NotFoundError(JourneyError):
    """404: no such task (or endpoint)."""


class APIStatusError(JourneyError):
    """Any other non-success status that retrying will not fix."""


class RateLimitedError(JourneyError):
    """429: too many requests; nothing was generated or billed.

    Args:
        message: What went wrong.
        status_code: The HTTP status (429 unless given).
        retry_after: Seconds the server asked to wait (its ``Retry-After``), or None.

    Attributes:
        retry_after: Seconds the server asked to wait, or None when it did not say.
    """

    retryable = True

    def __init__(
        self, message: str, *, status_code: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class ServiceUnavailableError(RateLimitedError):
    """503 (or 408): the service refused the request before working on it."""


class JourneyConnectionError(JourneyError):
    """The request never reached the API (refused, DNS, connect timeout, pool exhausted)."""

    retryable = True


class PossiblyBilledError(JourneyError):
    """The request was sent and the outcome is unknown: it may have been billed."""

    possibly_billed = True


class ServerError(PossiblyBilledError):
    """500/502/504: the server or a gateway failed after accepting the request."""


class JourneyTimeoutError(PossiblyBilledError):
    """No complete answer within the read timeout (the whole generation time)."""


class ConnectionDroppedError(PossiblyBilledError):
    """The connection closed after the request was sent, before a complete answer."""


class MalformedResponseError(PossiblyBilledError):
    """A success status whose body is not the documented shape (the call was billed)."""


class TaskFailedError(JourneyError):
    """The API answered ``status: failed`` (for example a content policy refusal).

    Args:
        message: What went wrong.
        task_id: The failed task's id, if known.
        reason: The API's ``error`` text, if it gave one.

    Attributes:
        task_id: The failed task's id, or None.
        reason: The API's ``error`` text, or None.
    """

    def __init__(self, message: str, *, task_id: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.task_id = task_id
        self.reason = reason


class NotStartedError(JourneyError):
    """The provider asked every call of the campaign to wait longer than its pause limit
    (``max_pause``), so this item was not started, or its retries stopped, without a paid
    attempt in doubt. Nothing was billed for it; a re-run picks it up."""


class RedisUnavailableError(JourneyError):
    """The Redis the workers share (``JOURNEY_REDIS_URL``) could not be reached.

    At a run's start it stops the run before any paid call. Mid-run it fails an item before
    its call: no call starts without its reservation on the shared budget or its image's
    lock, and a call started blind could be paid twice. Nothing was billed for it, and it is
    not retried within the run: a re-run picks the item up once Redis answers again.
    """


class UnverifiedDeliveryError(JourneyError):
    """A webhook event is not proven: the receiver did not sign it, or the provider's
    ``/fetch`` does not confirm the task it names. Nothing is downloaded or stored for it.

    Args:
        message: What did not check.
        task_id: The task the event named.

    Attributes:
        task_id: The task the event named.
    """

    def __init__(self, message: str, *, task_id: str | None = None):
        super().__init__(message)
        self.task_id = task_id


class DownloadError(JourneyError):
    """The image could not be fetched, or its bytes are truncated or corrupt.

    Downloads cost no credits, so these are retryable unless marked otherwise (an unsafe URL
    or an image above the size cap will not improve on a retry).
    """

    retryable = True


class DownloadRefusedError(DownloadError):
    """The image URL or a redirect of it is refused: not http(s), plain http beyond loopback,
    a host not among the image hosts, or a host that resolves to a non-public address (see
    :mod:`prefect_journey.address_rules`). Not retryable: the same URL is refused again."""

    retryable = False


class DownloadTimeoutError(DownloadError):
    """The whole download took longer than its deadline (a trickling or stalled CDN)."""


class ReferenceRefusedError(JourneyValidationError):
    """A reference URL leads to a non-public address the rules do not allow (see
    :mod:`prefect_journey.address_rules`); refused before any credit is spent."""


class StorageError(JourneyError):
    """The destination failed while writing (retryable) or is not usable (not retryable)."""

    retryable = True


class ObjectConflictError(StorageError):
    """A different object already exists at the key; it is never overwritten silently."""

    retryable = False
