"""Typed clients for JourneyAPI: :class:`JourneyClient` (sync) and :class:`AsyncJourneyClient`.

Both run the same transport core. Each API call is written once as a generator that yields
what it needs done (an ``httpx.Request`` to send, or a number of seconds to sleep) and
receives the outcome; the sync and async clients only differ in how they carry out those two
steps. Status mapping, retry decisions and response parsing therefore exist once.

This module does not import Prefect: it works in any Python program.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Generator
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from pydantic import SecretStr, ValidationError

from prefect_journey import policy, settings
from prefect_journey.address_rules import acheck_references, check_references
from prefect_journey.errors import (
    APIStatusError,
    AuthenticationError,
    ConfigurationError,
    ConnectionDroppedError,
    InsufficientCreditsError,
    JourneyConnectionError,
    JourneyError,
    JourneyTimeoutError,
    JourneyValidationError,
    MalformedResponseError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    ServiceUnavailableError,
    TaskFailedError,
    failure_text,
    redact,
)
from prefect_journey.models import (
    CREDITS_PER_IMAGE,
    Account,
    ImagineRequest,
    ImagineResult,
    TaskStatus,
    check_http_url,
)
from prefect_journey.tls import shared_ssl_context

API_PREFIX = "/api/v1"
# Enough for a batch of 32 concurrent generations; raise it with the caller's concurrency.
DEFAULT_MAX_CONNECTIONS = 32
# /fetch and /account answer from a database, not a GPU.
METADATA_READ_TIMEOUT = 30.0
# If /imagine ever answers with an unfinished task, poll /fetch at this pace until the read
# timeout for the request has passed.
POLL_INTERVAL = 2.0
_UNFINISHED = ("staged", "pending", "starting", "processing")

T = TypeVar("T")
# A call yields an httpx.Request to send or a float of seconds to sleep, and is sent back the
# response (or the httpx error) for a request, None after a sleep.
Step = httpx.Request | float
Outcome = httpx.Response | httpx.HTTPError | None
CallFlow = Generator[Step, Outcome, T]


def _resolve_api_key(api_key: str | SecretStr | None) -> SecretStr:
    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    api_key = api_key if api_key is not None else settings.api_key()
    if not api_key or not api_key.strip():
        raise ConfigurationError(
            "no JourneyAPI key: pass api_key=... to the client, set the "
            f"{settings.API_KEY.name} environment variable, or save a JourneyCredentials block"
        )
    if api_key != api_key.strip() or "\n" in api_key:
        raise ConfigurationError("the JourneyAPI key has surrounding whitespace or a newline")
    return SecretStr(api_key)


def resolve_base_url(base_url: str | None) -> str:
    """The API root from the argument, ``$JOURNEY_BASE_URL`` or the default; checked.

    The key travels with every request, so plain http is refused beyond this machine.

    Args:
        base_url: The API root; None (or empty) uses ``JOURNEY_BASE_URL``, else
            ``https://api.journeyapi.com``.

    Returns:
        The root without a trailing slash or a trailing ``/api/v1``.

    Raises:
        ConfigurationError: The URL is malformed, or uses plain http to a host other than
            loopback.
    """
    url = (base_url or settings.base_url()).rstrip("/")
    try:
        # The key travels with every request: refuse plain http beyond this machine.
        check_http_url(url, what="base_url", https_only_remote=True)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return url.removesuffix(API_PREFIX)


def _error_message(response: httpx.Response) -> str:
    """The server's own words, from ``{"errors": [{"msg": ...}]}`` or ``{"error": ...}``."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list):
            return "; ".join(
                str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in errors
            )
        if body.get("error"):
            return str(body["error"])
        if body.get("message"):
            return str(body["message"])
    return ""


def error_for_response(response: httpx.Response, secrets: tuple[str, ...] = ()) -> JourneyError:
    """Map a non-2xx response to its error class.

    400/422: :class:`~prefect_journey.errors.JourneyValidationError`; 401/403:
    :class:`~prefect_journey.errors.AuthenticationError`; 402:
    :class:`~prefect_journey.errors.InsufficientCreditsError`; 404:
    :class:`~prefect_journey.errors.NotFoundError`; 429:
    :class:`~prefect_journey.errors.RateLimitedError` and 408/503:
    :class:`~prefect_journey.errors.ServiceUnavailableError`, both with the parsed
    ``Retry-After``; any other 5xx: :class:`~prefect_journey.errors.ServerError` (possibly
    billed); anything else: :class:`~prefect_journey.errors.APIStatusError`.

    Args:
        response: The answer; its request's method and path name the call in the message.
        secrets: Values removed from the server's error text (the API key, a webhook
            secret, a webhook URL); none by default.

    Returns:
        The error, for the caller to retry or raise (it is not raised here).
    """
    status = response.status_code
    detail = redact(_error_message(response), secrets)
    where = f"{response.request.method} {response.request.url.path}"
    said = f": {detail}" if detail else ""
    message = f"{where} answered {status}{said}"
    if status in (400, 422):
        return JourneyValidationError(message, status_code=status)
    if status in (401, 403):
        return AuthenticationError(
            f"{message} (the API key is missing, wrong or revoked)", status_code=status
        )
    if status == 402:
        return InsufficientCreditsError(
            f"{message} (not enough credits: top up the account)", status_code=status
        )
    if status == 404:
        return NotFoundError(message, status_code=status)
    if status in (408, 429, 503):
        retry_after = policy.parse_retry_after(response.headers.get("Retry-After"))
        cls = RateLimitedError if status == 429 else ServiceUnavailableError
        return cls(message, status_code=status, retry_after=retry_after)
    if status >= 500:
        return ServerError(message, status_code=status)
    return APIStatusError(message, status_code=status)


def error_for_transport(exc: httpx.HTTPError, request: httpx.Request) -> JourneyError:
    """Map an httpx transport failure: was the request sent (possibly billed) or not?

    A connect error, connect timeout or pool timeout means the request never left:
    :class:`~prefect_journey.errors.JourneyConnectionError` (retryable). A read timeout is a
    :class:`~prefect_journey.errors.JourneyTimeoutError`, and any other failure a
    :class:`~prefect_journey.errors.ConnectionDroppedError`: both possibly billed.

    Args:
        exc: The httpx error raised while sending ``request``.
        request: The request that failed; its method, scheme, host and path (not its query)
            name it in the message.

    Returns:
        The error, for the caller to retry or raise (it is not raised here).
    """
    where = f"{request.method} {request.url.scheme}://{request.url.netloc.decode()}"
    where += request.url.path
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return JourneyConnectionError(f"{where}: could not connect ({failure_text(exc)})")
    if isinstance(exc, httpx.ReadTimeout):
        return JourneyTimeoutError(f"{where}: no answer within the read timeout")
    return ConnectionDroppedError(
        f"{where}: connection failed after the request was sent ({failure_text(exc)})"
    )


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise MalformedResponseError(
            f"{response.request.url.path} answered {response.status_code} with a body that is "
            f"not JSON: {response.text[:80]!r}",
            status_code=response.status_code,
        ) from None
    if not isinstance(body, dict):
        raise MalformedResponseError(
            f"{response.request.url.path} answered a JSON {type(body).__name__}, not an object",
            status_code=response.status_code,
        )
    return body


def parse_task(body: dict[str, Any], path: str) -> TaskStatus:
    """A task body (``/imagine``, ``/fetch`` or a webhook delivery), checked.

    Args:
        body: The JSON object received.
        path: Where it came from, to name it in errors.

    Returns:
        The task; a finished one has a valid ``image_url``.

    Raises:
        MalformedResponseError: The body is not the documented task shape.
        TaskFailedError: The task failed; ``reason`` holds the API's error text.
    """
    try:
        task = TaskStatus.model_validate(body)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors(include_input=False))
        raise MalformedResponseError(
            f"{path} answered an unexpected task shape ({fields})"
        ) from None
    if task.status == "failed":
        reason = task.error or "no reason given"
        raise TaskFailedError(
            f"task {task.task_id} failed: {reason}", task_id=task.task_id, reason=task.error
        )
    if task.status == "finished":
        if not task.image_url:
            raise MalformedResponseError(f"task {task.task_id} finished without an image_url")
        try:
            check_http_url(task.image_url, what="image_url")
        except ValueError as exc:
            raise MalformedResponseError(f"task {task.task_id}: {exc}") from None
    return task


class _ClientCore:
    """Configuration, request building and the call flows shared by both clients."""

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        base_url: str | None = None,
        max_retries: int = policy.DEFAULT_MAX_RETRIES,
        read_timeout: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        seed: int | None = None,
        repay_possibly_billed: int = 0,
    ) -> None:
        if max_retries < 0:
            raise ConfigurationError("max_retries must be >= 0")
        policy.check_repay_possibly_billed(repay_possibly_billed)
        if read_timeout is None:
            read_timeout = settings.read_timeout()
        if read_timeout is not None and read_timeout <= 0:
            raise ConfigurationError("read_timeout must be a positive number of seconds")
        if max_connections < 1:
            raise ConfigurationError("max_connections must be >= 1")
        self._api_key = _resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        self.max_retries = max_retries
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.repay_possibly_billed = repay_possibly_billed
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _http_options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url + API_PREFIX,
            "headers": {"Authorization": self._api_key.get_secret_value()},
            # The key must never follow a redirect to another host; the API does not redirect.
            "follow_redirects": False,
            "verify": shared_ssl_context(),
            "limits": httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=policy.KEEPALIVE_CONNECTIONS,
            ),
            "timeout": self._timeout(METADATA_READ_TIMEOUT),
        }

    @staticmethod
    def _timeout(read: float) -> httpx.Timeout:
        return httpx.Timeout(
            connect=policy.CONNECT_TIMEOUT,
            read=read,
            write=policy.WRITE_TIMEOUT,
            pool=policy.POOL_TIMEOUT,
        )

    def read_timeout_for(self, request: ImagineRequest) -> float:
        """The read timeout this client uses for ``request`` (override or the formula).

        Args:
            request: The request to be sent.

        Returns:
            The client's ``read_timeout`` when set, else
            :func:`prefect_journey.policy.read_timeout_for` of the request's references and
            resolution, in seconds.
        """
        return policy.request_read_timeout(request, self.read_timeout)

    def _secrets(self, request: ImagineRequest | None = None) -> tuple[str, ...]:
        secrets = [self._api_key.get_secret_value()]
        if request is not None and request.webhook_secret is not None:
            secrets.append(request.webhook_secret.get_secret_value())
        if request is not None and request.webhook_url is not None:
            # A webhook URL may carry an attempt's token (prefect_journey.recovery).
            secrets.append(request.webhook_url)
        return tuple(secrets)

    def _send(
        self,
        http: httpx.Client | httpx.AsyncClient,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None,
        read_timeout: float,
        idempotent: bool,
        secrets: tuple[str, ...],
        repays: policy.RepayAllowance | None = None,
    ) -> CallFlow[tuple[httpx.Response, int]]:
        """Send with retries; return the 2xx response and the number of attempts."""
        attempt = 0
        while True:
            request = http.build_request(
                method, path, json=json, timeout=self._timeout(read_timeout)
            )
            outcome = yield request
            if isinstance(outcome, httpx.Response) and outcome.is_success:
                return outcome, attempt + 1
            if isinstance(outcome, httpx.Response):
                error = error_for_response(outcome, secrets)
            elif isinstance(outcome, httpx.HTTPError):
                error = error_for_transport(outcome, request)
            else:  # pragma: no cover - the drivers always send one of the two
                raise TypeError(f"unexpected outcome {outcome!r}")
            delay = policy.retry_delay(
                error,
                attempt,
                max_retries=self.max_retries,
                idempotent=idempotent,
                repays=repays,
                rng=self._rng,
            )
            if delay is None:
                raise error
            attempt += 1
            yield delay

    def _imagine_flow(
        self, http: httpx.Client | httpx.AsyncClient, request: ImagineRequest
    ) -> CallFlow[ImagineResult]:
        started = time.monotonic()
        read_timeout = self.read_timeout_for(request)
        secrets = self._secrets(request)
        repays = policy.RepayAllowance(self.repay_possibly_billed)
        response, attempts = yield from self._send(
            http,
            "POST",
            "/imagine",
            json=request.to_payload(),
            read_timeout=read_timeout,
            idempotent=False,
            secrets=secrets,
            repays=repays,
        )
        task = parse_task(_json_object(response), "/imagine")
        while task.status in _UNFINISHED:
            # The model is documented as synchronous; tolerate an unfinished answer anyway.
            if time.monotonic() - started > read_timeout:
                raise JourneyTimeoutError(
                    f"task {task.task_id} still {task.status} after {read_timeout:.0f} s"
                )
            yield POLL_INTERVAL
            task = yield from self._fetch_flow(http, task.task_id)
        assert task.image_url is not None  # parse_task guarantees it for finished tasks
        return ImagineResult(
            task_id=task.task_id,
            status=task.status,
            image_url=task.image_url,
            elapsed_seconds=time.monotonic() - started,
            credits_charged=CREDITS_PER_IMAGE,
            attempts=attempts,
            possibly_billed_attempts=repays.used,
        )

    def _fetch_flow(
        self, http: httpx.Client | httpx.AsyncClient, task_id: str
    ) -> CallFlow[TaskStatus]:
        if not isinstance(task_id, str) or not task_id.strip():
            raise JourneyValidationError("task_id must be a non-empty string")
        response, _ = yield from self._send(
            http,
            "POST",
            "/fetch",
            json={"task_id": task_id},
            read_timeout=METADATA_READ_TIMEOUT,
            idempotent=True,
            secrets=self._secrets(),
        )
        return parse_task(_json_object(response), "/fetch")

    def _account_flow(self, http: httpx.Client | httpx.AsyncClient) -> CallFlow[Account]:
        response, _ = yield from self._send(
            http,
            "GET",
            "/account",
            json=None,
            read_timeout=METADATA_READ_TIMEOUT,
            idempotent=True,
            secrets=self._secrets(),
        )
        try:
            return Account.model_validate(_json_object(response))
        except ValidationError:
            raise MalformedResponseError("/account answered an unexpected shape") from None


def _as_request(request: ImagineRequest | None, fields: dict[str, Any]) -> ImagineRequest:
    if request is not None and fields:
        raise JourneyValidationError("pass either an ImagineRequest or keyword fields, not both")
    return request if request is not None else ImagineRequest(**fields)


class JourneyClient(_ClientCore):
    """Synchronous JourneyAPI client. Use as a context manager or call :meth:`close`.

    Safe failures (connection refused, 429, 503) are retried up to ``max_retries`` times;
    possibly-billed failures of ``imagine`` are raised as
    :class:`~prefect_journey.errors.PossiblyBilledError` subclasses, and paid again only
    when ``repay_possibly_billed`` allows it (never by default).

    Args:
        api_key: The key; default ``JOURNEY_API_KEY``.
        base_url: The API root; default ``JOURNEY_BASE_URL``, else
            ``https://api.journeyapi.com``. Plain http only on loopback.
        max_retries: Retries of failures that cannot have been billed (and, for the free
            ``fetch`` and ``account``, of possibly-billed ones). 0 leaves retrying to the
            caller, as the Prefect tasks do.
        read_timeout: Seconds to wait for a generation; default ``JOURNEY_READ_TIMEOUT``,
            else a formula of resolution and reference count (:mod:`prefect_journey.policy`).
        max_connections: Size of the connection pool; at least the number of calls you run
            at once.
        seed: Seeds the backoff jitter (reproducible tests).
        transport: An httpx transport (tests, proxies).
        repay_possibly_billed: How many times one ``imagine`` call pays again after a
            possibly-billed failure (its image may already be made and billed), within
            ``max_retries``; 0 to 5, default 0: a library call surfaces an unknown outcome
            and lets its caller choose.

    Raises:
        ConfigurationError: No key, a malformed base URL or a bad option.

    Example:
        ```python
        from prefect_journey import JourneyClient

        with JourneyClient() as client:  # JOURNEY_API_KEY from the environment
            result = client.imagine(prompt="a lighthouse at dusk", aspect_ratio="16:9")
        print(result.image_url)
        ```
    """

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        base_url: str | None = None,
        max_retries: int = policy.DEFAULT_MAX_RETRIES,
        read_timeout: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        seed: int | None = None,
        transport: httpx.BaseTransport | None = None,
        repay_possibly_billed: int = 0,
    ) -> None:
        super().__init__(
            api_key,
            base_url=base_url,
            max_retries=max_retries,
            read_timeout=read_timeout,
            max_connections=max_connections,
            seed=seed,
            repay_possibly_billed=repay_possibly_billed,
        )
        self._http = httpx.Client(transport=transport, **self._http_options())

    def imagine(self, request: ImagineRequest | None = None, /, **fields: Any) -> ImagineResult:
        """Generate one image: ``client.imagine(prompt="...", aspect_ratio="16:9")``.

        The call is paid (4 credits) and returns when the image exists. Failures that cannot
        have been billed are retried up to ``max_retries`` times; possibly-billed ones are
        raised, since a retry may bill twice, unless ``repay_possibly_billed`` allows paying
        again. Should the API answer with
        an unfinished task, it is polled through ``/fetch`` every 2 s until the read timeout.

        Args:
            request: The request to send; leave it out to pass its fields as keywords.
            **fields: The fields of an :class:`~prefect_journey.models.ImagineRequest`
                (``prompt``, ``aspect_ratio``, ``resolution``, ``image_urls``, ...), when no
                ``request`` is given.

        Returns:
            The finished task: its image URL, the time taken, the credits charged and the
            number of attempts.

        Raises:
            JourneyValidationError: Bad input (checked before sending, or refused by the
                server with 400/422), or both ``request`` and ``fields`` given; as its
                subclass ReferenceRefusedError, a reference URL that leads to a non-public
                address (see :mod:`prefect_journey.address_rules`), checked before sending.
            AuthenticationError: The API key is missing, wrong or revoked (401/403).
            InsufficientCreditsError: The account has too few credits (402).
            RateLimitedError: 429, or 408/503 as its subclass ServiceUnavailableError,
                after the retries, or with a ``Retry-After`` longer than 60 s.
            JourneyConnectionError: The API could not be reached, after the retries.
            PossiblyBilledError: The request was sent and the outcome is unknown: a
                ServerError (500/502/504), a JourneyTimeoutError, a ConnectionDroppedError
                or a MalformedResponseError.
            TaskFailedError: The API refused the task (for example its content policy).
            NotFoundError: A 404 answer.
            APIStatusError: Any other status that retrying will not fix.

        Example:
            ```python
            from prefect_journey import ImagineRequest, JourneyClient

            request = ImagineRequest(prompt="a lighthouse at dusk", resolution="2K")
            with JourneyClient() as client:  # JOURNEY_API_KEY from the environment
                result = client.imagine(request)
            print(result.task_id, result.image_url)
            ```
        """
        request = _as_request(request, fields)
        check_references(request.image_urls)  # before the paid call
        return self._run(self._imagine_flow(self._http, request))

    def fetch(self, task_id: str) -> TaskStatus:
        """Status of a task (``POST /api/v1/fetch``); a failed task raises TaskFailedError.

        The call is free, so possibly-billed failures are retried too, up to
        ``max_retries`` times.

        Args:
            task_id: The task's id, from :attr:`ImagineResult.task_id` or a webhook.

        Returns:
            The task; a finished one has a checked ``image_url``.

        Raises:
            JourneyValidationError: ``task_id`` is empty or not a string.
            NotFoundError: No such task.
            TaskFailedError: The task failed; ``reason`` holds the API's error text.
            AuthenticationError: The API key is missing, wrong or revoked.
            MalformedResponseError: The answer is not the documented shape.
            JourneyError: Any other failure, after the retries (as for :meth:`imagine`).

        Example:
            ```python
            from prefect_journey import JourneyClient

            with JourneyClient() as client:
                task = client.fetch("TASK_ID")
            print(task.status, task.image_url)
            ```
        """
        return self._run(self._fetch_flow(self._http, task_id))

    def account(self) -> Account:
        """The account's e-mail, credit balance and plan (``GET /api/v1/account``).

        Returns:
            The account.

        Raises:
            AuthenticationError: The API key is missing, wrong or revoked.
            MalformedResponseError: The answer is not the documented shape.
            JourneyError: Any other failure, after the retries (as for :meth:`imagine`).

        Example:
            ```python
            from prefect_journey import JourneyClient

            with JourneyClient() as client:
                print(client.account().credits)
            ```
        """
        return self._run(self._account_flow(self._http))

    def _run(self, flow: CallFlow[T]) -> T:
        outcome: Outcome = None
        try:
            while True:
                step = flow.send(outcome)
                if isinstance(step, float | int):
                    time.sleep(step)
                    outcome = None
                    continue
                try:
                    outcome = self._http.send(step)
                except httpx.HTTPError as exc:
                    outcome = exc
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the client's connections; the client cannot be used afterwards."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncJourneyClient(_ClientCore):
    """Asynchronous twin of :class:`JourneyClient` (same options, same behaviour).

    Args:
        api_key: The key; default ``JOURNEY_API_KEY``.
        base_url: The API root; default ``JOURNEY_BASE_URL``, else the provider's.
        max_retries: As for :class:`JourneyClient`.
        read_timeout: As for :class:`JourneyClient`.
        max_connections: As for :class:`JourneyClient`.
        seed: As for :class:`JourneyClient`.
        transport: An httpx async transport.
        repay_possibly_billed: As for :class:`JourneyClient`.

    Raises:
        ConfigurationError: No key, a malformed base URL or a bad option.

    Example:
        ```python
        import asyncio
        from prefect_journey import AsyncJourneyClient

        async def main() -> None:
            async with AsyncJourneyClient() as client:
                result = await client.imagine(prompt="a lighthouse at dusk")
            print(result.image_url)

        asyncio.run(main())
        ```
    """

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        base_url: str | None = None,
        max_retries: int = policy.DEFAULT_MAX_RETRIES,
        read_timeout: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        seed: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        repay_possibly_billed: int = 0,
    ) -> None:
        super().__init__(
            api_key,
            base_url=base_url,
            max_retries=max_retries,
            read_timeout=read_timeout,
            max_connections=max_connections,
            seed=seed,
            repay_possibly_billed=repay_possibly_billed,
        )
        self._http = httpx.AsyncClient(transport=transport, **self._http_options())

    async def imagine(
        self, request: ImagineRequest | None = None, /, **fields: Any
    ) -> ImagineResult:
        """Generate one image: ``await client.imagine(prompt="...")``.

        Same behaviour as :meth:`JourneyClient.imagine`: paid, safe failures retried,
        possibly-billed ones raised.

        Args:
            request: The request to send; leave it out to pass its fields as keywords.
            **fields: The fields of an :class:`~prefect_journey.models.ImagineRequest`,
                when no ``request`` is given.

        Returns:
            The finished task: its image URL, the time taken, the credits charged and the
            number of attempts.

        Raises:
            JourneyValidationError: Bad input, or both ``request`` and ``fields`` given.
            JourneyError: As listed for :meth:`JourneyClient.imagine`.

        Example:
            ```python
            import asyncio

            from prefect_journey import AsyncJourneyClient

            async def main() -> None:
                async with AsyncJourneyClient() as client:
                    result = await client.imagine(prompt="a lighthouse at dusk")
                print(result.image_url)

            asyncio.run(main())
            ```
        """
        request = _as_request(request, fields)
        await acheck_references(request.image_urls)  # before the paid call
        return await self._run(self._imagine_flow(self._http, request))

    async def fetch(self, task_id: str) -> TaskStatus:
        """Status of a task (``POST /api/v1/fetch``); a failed task raises TaskFailedError.

        The call is free, so possibly-billed failures are retried too, up to
        ``max_retries`` times.

        Args:
            task_id: The task's id, from :attr:`ImagineResult.task_id` or a webhook.

        Returns:
            The task; a finished one has a checked ``image_url``.

        Raises:
            JourneyValidationError: ``task_id`` is empty or not a string.
            NotFoundError: No such task.
            TaskFailedError: The task failed; ``reason`` holds the API's error text.
            JourneyError: Any other failure, as listed for :meth:`JourneyClient.fetch`.
        """
        return await self._run(self._fetch_flow(self._http, task_id))

    async def account(self) -> Account:
        """The account's e-mail, credit balance and plan (``GET /api/v1/account``).

        Returns:
            The account.

        Raises:
            AuthenticationError: The API key is missing, wrong or revoked.
            MalformedResponseError: The answer is not the documented shape.
            JourneyError: Any other failure, after the retries.
        """
        return await self._run(self._account_flow(self._http))

    async def _run(self, flow: CallFlow[T]) -> T:
        outcome: Outcome = None
        try:
            while True:
                step = flow.send(outcome)
                if isinstance(step, float | int):
                    await asyncio.sleep(step)
                    outcome = None
                    continue
                try:
                    outcome = await self._http.send(step)
                except httpx.HTTPError as exc:
                    outcome = exc
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Close the client's connections; the client cannot be used afterwards."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
