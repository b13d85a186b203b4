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
    """Replace every occurrence of each non-empty secret in ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def failure_text(error: BaseException) -> str:
    """The one-line reason a step failed, as reports and logs show it: the error's class and
    its own message (which never carries a secret, see above)."""
    return f"{type(error).__name__}: {error}"


class JourneyError(Exception):
    """Base class of every error this package raises."""

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
    """The client cannot be built: no API key, a malformed base URL, a bad timeout."""


class JourneyValidationError(JourneyError, ValueError):
    """The request breaks a rule (ours before sending, or the server's 400/422)."""

    def __init__(
        self, message: str, *, status_code: int | None = None, problems: list[str] | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.problems = problems or [message]

    @classmethod
    def from_pydantic(cls, exc: ValidationError, what: str) -> JourneyValidationError:
        """Summarise a pydantic error by field and reason only, never the input value."""
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
    """429: too many requests; nothing was generated or billed."""

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
    """The API answered ``status: failed`` (for example a content policy refusal)."""

    def __init__(self, message: str, *, task_id: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.task_id = task_id
        self.reason = reason


class DownloadError(JourneyError):
    """The image could not be fetched, or its bytes are truncated or corrupt.

    Downloads cost no credits, so these are retryable unless marked otherwise (an unsafe URL
    or an image above the size cap will not improve on a retry).
    """

    retryable = True


class StorageError(JourneyError):
    """The destination failed while writing (retryable) or is not usable (not retryable)."""

    retryable = True


class ObjectConflictError(StorageError):
    """A different object already exists at the key; it is never overwritten silently."""

    retryable = False
