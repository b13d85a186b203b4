"""Receive JourneyAPI webhooks and turn them into Prefect events.

The provider POSTs the finished task (the ``/fetch`` shape) to ``webhook_url`` with the
request's ``webhook_secret`` in the ``x-webhook-secret`` header. That is a bare shared
secret: no signature over the body, no timestamp. The receiver is configured with the
webhook secret and uses only keys derived from it (:mod:`prefect_journey.signing`). It:

- compares the header with the provider secret (:func:`hmac.compare_digest`, constant
  time) and answers 401 with no detail to a wrong or missing one;
- on ``<path>/<token>`` (the deliveries of the package's own paid attempts, see
  :mod:`prefect_journey.tokens`), accepts only a token minted with the same secret (404
  otherwise), only one task per token and one token per task (409 to a token already used
  for another task, or a task already delivered under another token);
- accepts only a JSON object of at most :data:`MAX_BODY_BYTES` with a ``task_id`` and a
  ``status`` (the body is read no further than that);
- de-duplicates (the provider may deliver twice): a replay is acknowledged with 200 and
  emits nothing. In memory, the last :data:`DEDUP_CAPACITY` deliveries; with
  ``JOURNEY_REDIS_URL`` set, in that Redis for
  :data:`~prefect_journey.policy.DELIVERY_MEMORY_SECONDS`, shared by every receiver behind
  the URL and kept across their restarts. Either way the event id is derived from the
  delivery, so Prefect itself stores a replayed event once;
- emits ``journey.task.finished`` or ``journey.task.failed`` (resource
  ``journey.task.<task_id>``), which a deployment trigger can turn into a flow run; on the
  token path ``journey.attempt.finished`` or ``journey.attempt.failed`` instead (resource
  ``journey.attempt.<attempt id>``, labelled ``journey.task_id``), which the waiting run
  reads and which starts no deployment meant for the deliveries of users' own webhooks;
- signs each event (``signature`` in its payload, keyed by the event key): whoever may
  write events to the Prefect API still cannot make one a run or the webhook-triggered
  store believes;
- answers 2xx only once the Prefect API has accepted the event, else 503, so that the
  provider retries instead of dropping the delivery;
- serves the Blocks' logo, shipped in the package, at ``/logo.png`` for Prefect servers
  whose browsers have no internet (``JOURNEY_BLOCK_LOGO_URL``).

Run it with ``JOURNEY_WEBHOOK_SECRET=... prefect-journey webhooks --port 8780`` and
``PREFECT_API_URL`` naming the Prefect API; it refuses to start without a reachable one.
The secret is read from the environment, never from the command line (which other users
can see).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from prefect_journey import policy, settings
from prefect_journey.errors import ConfigurationError, RedisUnavailableError
from prefect_journey.models import TaskStatus, check_http_url
from prefect_journey.signing import SIGNATURE_FIELD, WebhookKeys
from prefect_journey.tokens import (
    ATTEMPT_EVENT_PREFIX,
    TASK_ID_LABEL,
    attempt_id,
    attempt_resource,
    is_valid_token,
)

WEBHOOK_PATH = "/webhooks/journey"
# A task result is a few hundred bytes; anything near this is not from the provider.
MAX_BODY_BYTES = 64 * 1024
DEDUP_CAPACITY = 100_000
# The provider waits 10 s for an answer; the event must be accepted, or refused, before then.
EMIT_DEADLINE = 8.0
_EVENT_NAMESPACE = uuid.UUID("1b671a64-40d5-491e-99b0-da01ff1f3341")
# The Blocks' logo as shipped in the package, for a Prefect server whose browsers have no
# internet: JOURNEY_BLOCK_LOGO_URL names this route when the blocks are registered.
LOGO_PATH = "/logo.png"
LOGO_HEADERS = {"cache-control": "public, max-age=86400"}

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

logger = logging.getLogger("prefect_journey.webhooks")

Emitter = Callable[[str, dict[str, str], dict[str, Any], uuid.UUID], bool]


def prefect_api_url(api_url: str | None = None) -> str:
    """The Prefect API the receiver sends its events to, checked to answer this receiver.

    Args:
        api_url: The API's URL; None reads ``PREFECT_API_URL``.

    Returns:
        The URL.

    Raises:
        ConfigurationError: No URL is set (Prefect would start a throwaway in-process
            server, whose events nobody reads), the API does not answer its health check,
            or it refuses this receiver's credentials (``PREFECT_API_KEY`` or
            ``PREFECT_API_AUTH_STRING``).
    """
    from prefect.settings import PREFECT_API_URL

    url = api_url or PREFECT_API_URL.value()
    if not url:
        raise ConfigurationError(
            "the webhook receiver needs PREFECT_API_URL: without it its events would go to a "
            "throwaway in-process Prefect server and every delivery would be lost"
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigurationError(
            f"the Prefect API at {url} does not answer ({type(exc).__name__}); "
            "start it, or fix PREFECT_API_URL"
        ) from None
    try:  # the health check needs no credentials; reading events does
        with PrefectEventSink(str(url)).client() as client:
            client.read_events(limit=1)
    except Exception as exc:
        raise ConfigurationError(
            f"the Prefect API at {url} refuses this receiver ({type(exc).__name__}): check "
            "PREFECT_API_KEY or PREFECT_API_AUTH_STRING"
        ) from None
    return str(url)


class PrefectEventSink:
    """Sends one event to the Prefect API over HTTP and returns once the API accepted it.

    Prefect's own ``emit_event`` hands the event to a background worker and returns at once;
    acknowledging a delivery on that would lose it whenever the API is down. Here each event
    is a ``POST /events`` that must succeed, with the credentials Prefect's settings hold
    (``PREFECT_API_KEY``, ``PREFECT_API_AUTH_STRING``).

    Args:
        api_url: The Prefect API, as :func:`prefect_api_url` returns it.
    """

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url

    def client(self) -> SyncPrefectClient:
        """A client of the API with this process's Prefect credentials.

        Returns:
            A new client, to use as a context manager.
        """
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

        return SyncPrefectClient(
            self.api_url,
            api_key=PREFECT_API_KEY.value(),
            auth_string=PREFECT_API_AUTH_STRING.value(),
        )

    def __call__(
        self, event: str, resource: dict[str, str], payload: dict[str, Any], event_id: uuid.UUID
    ) -> bool:
        """Send one event.

        Args:
            event: The event's name.
            resource: Its resource.
            payload: Its data.
            event_id: Its id (Prefect stores an event of a given id once).

        Returns:
            True once the API has accepted it.

        Raises:
            httpx.HTTPError: The API could not be reached or refused the event.
        """
        from prefect.events import Event

        body = Event.model_validate(
            {"event": event, "resource": resource, "payload": payload, "id": event_id}
        ).model_dump(mode="json")
        with self.client() as client:
            client.request("POST", "/events", json=[body]).raise_for_status()
        return True


class DeliveryMemory(Protocol):
    """What a receiver remembers: the deliveries it emitted and which task each token
    delivered. A key is first claimed (:meth:`add`), then kept once its event is emitted
    (:meth:`keep`) or forgotten if it was not (:meth:`discard`)."""

    async def add(self, key: str, value: str = "") -> str | None:
        """Claim ``key`` with ``value``; the value already there, if there was one."""

    async def keep(self, keys: list[str]) -> None:
        """Keep the claimed ``keys``: their delivery's event was emitted."""

    async def discard(self, key: str) -> None:
        """Forget ``key``: its delivery's event was not emitted."""


class _Seen:
    """A bounded, thread-safe map of deliveries seen by this process, oldest forgotten
    first."""

    def __init__(self, capacity: int) -> None:
        self._seen: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    async def add(self, key: str, value: str = "") -> str | None:
        with self._lock:
            if key in self._seen:
                return self._seen[key]
            self._seen[key] = value
            if len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
            return None

    async def keep(self, keys: list[str]) -> None:
        return None  # a claim here lasts as long as the process

    async def discard(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)


class _SharedSeen:
    """The same memory in the Redis of ``JOURNEY_REDIS_URL``, shared by every receiver
    behind one URL and kept across their restarts. A claim lasts
    :data:`~prefect_journey.policy.DELIVERY_CLAIM_SECONDS`, so a receiver killed while
    emitting leaves nothing that would make the provider's next try a duplicate; a kept key
    lasts :data:`~prefect_journey.policy.DELIVERY_MEMORY_SECONDS`."""

    def __init__(self, url: str) -> None:
        from prefect_journey import coordination

        coordination.check_reachable(url)
        self.url = url

    def _client(self) -> Any:
        from prefect_journey import coordination

        return coordination.async_client(self.url)

    def _name(self, key: str) -> str:
        from prefect_journey import coordination

        return coordination.key(f"delivery:{key}")

    def _reaching(self) -> Any:
        from prefect_journey import coordination

        return coordination.reaching(self.url, "to the webhook receiver")

    async def add(self, key: str, value: str = "") -> str | None:
        with self._reaching():
            earlier = await self._client().set(
                self._name(key),
                value,
                nx=True,
                get=True,
                px=int(policy.DELIVERY_CLAIM_SECONDS * 1000),
            )
        return None if earlier is None else str(earlier.decode())

    async def keep(self, keys: list[str]) -> None:
        with self._reaching():
            async with self._client().pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.expire(self._name(key), int(policy.DELIVERY_MEMORY_SECONDS))
                await pipe.execute()

    async def discard(self, key: str) -> None:
        with self._reaching():
            await self._client().delete(self._name(key))


def delivery_memory() -> DeliveryMemory:
    """The receiver's memory: in the Redis of ``JOURNEY_REDIS_URL`` (or
    ``JOURNEY_REDIS_BLOCK``'s block) when it is set, else in this process.

    Returns:
        The memory.

    Raises:
        ConfigurationError: ``JOURNEY_REDIS_URL`` is malformed, or set without the
            ``redis`` extra.
        RedisUnavailableError: Its Redis does not answer.
    """
    from prefect_journey.redis_block import apply_redis_block  # loads Prefect's blocks

    apply_redis_block()
    url = settings.redis_url()
    return _Seen(DEDUP_CAPACITY) if url is None else _SharedSeen(url)


def _is_image_url(url: str | None) -> bool:
    try:
        check_http_url(url or "", what="image_url")
    except ValueError:
        return False
    return True


async def _body_within(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it passes ``limit`` bytes (the rest is never read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def create_webhook_app(
    secret: str | SecretStr,
    *,
    emit: Emitter | None = None,
    path: str = WEBHOOK_PATH,
    api_url: str | None = None,
    memory: DeliveryMemory | None = None,
) -> Starlette:
    """The receiver as an ASGI app.

    ``POST path`` and ``POST path/<token>`` take deliveries and answer: 401 with no detail
    to a wrong or missing secret; 404 to a token not minted with the secret; 413 to a body
    above :data:`MAX_BODY_BYTES`; 400 to anything but a task object; 202
    ``{"ignored": status}`` to a task not yet finished or failed; 409 to a token already
    used for another task, or a task already delivered under another token; 200
    ``{"duplicate": true}`` to a delivery already emitted; 503 when the event was not
    accepted by the Prefect API, so that the provider retries; else 200 ``{"event": name}``.
    ``GET /health`` answers 200 ``{"ok": true}``; ``GET /logo.png``, the Blocks' logo.

    Args:
        secret: The webhook secret; the provider secret (sent in ``x-webhook-secret``),
            the token key and the event key are derived from it.
        emit: Sends one event: called with the event's name, resource, payload and id,
            returns True once it was accepted; False or an exception counts as not sent.
            None (the default) posts to the Prefect API (:class:`PrefectEventSink`).
        path: The path deliveries are POSTed to; :data:`WEBHOOK_PATH` by default.
        api_url: The Prefect API for the default ``emit``; None reads ``PREFECT_API_URL``.
        memory: What the receiver remembers of deliveries; None for
            :func:`delivery_memory` (Redis when ``JOURNEY_REDIS_URL`` is set).

    Returns:
        The Starlette app, to run with any ASGI server.

    Raises:
        WeakSecretError: The secret could be guessed (a ValueError).
        ConfigurationError: ``emit`` is None and no Prefect API is set or reachable, or
            ``JOURNEY_REDIS_URL`` is malformed.
        RedisUnavailableError: ``JOURNEY_REDIS_URL``'s Redis does not answer.

    Example:
        ```python
        import os

        import uvicorn

        from prefect_journey.webhooks import create_webhook_app

        app = create_webhook_app(os.environ["JOURNEY_WEBHOOK_SECRET"])
        uvicorn.run(app, host="127.0.0.1", port=8780)
        ```
    """
    keys = WebhookKeys.from_secret(secret)
    expected = keys.provider_secret.get_secret_value().encode()
    sink = emit if emit is not None else PrefectEventSink(prefect_api_url(api_url))
    seen = memory if memory is not None else delivery_memory()

    async def deliver(request: Request, attempt: str | None) -> Response:
        try:
            return await _deliver(request, attempt)
        except RedisUnavailableError as exc:  # the provider tries again later
            logger.warning("delivery not taken: %s", exc)
            return JSONResponse({"error": "receiver unavailable"}, status_code=503)

    async def _deliver(request: Request, attempt: str | None) -> Response:
        provided = request.headers.get("x-webhook-secret", "").encode()
        if not hmac.compare_digest(provided, expected):
            return JSONResponse({}, status_code=401)
        body = await _body_within(request, MAX_BODY_BYTES)
        if body is None:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            task = TaskStatus.model_validate_json(body)
        except ValidationError:
            return JSONResponse({"error": "expected a task object with task_id and status"}, 400)
        if task.status not in ("finished", "failed"):
            return JSONResponse({"ignored": task.status}, status_code=202)
        if task.status == "finished" and not _is_image_url(task.image_url):
            return JSONResponse({"error": "a finished task needs its image_url"}, 400)
        event = f"journey.task.{task.status}"
        resource = {"prefect.resource.id": f"journey.task.{task.task_id}"}
        delivery = f"{task.task_id}:{task.status}"
        earlier: str | None = None
        owner: str | None = None
        claimed: list[str] = []
        if attempt is not None:
            earlier = await seen.add(f"attempt:{attempt}", task.task_id)
            if earlier is not None and earlier != task.task_id:
                return JSONResponse({"error": "token already used"}, status_code=409)
            if earlier is None:
                claimed.append(f"attempt:{attempt}")
            # One task per attempt, and one attempt per task: a task is made by one request,
            # so a task delivered again under another token is not that token's.
            owner = await seen.add(f"task:{task.task_id}", attempt)
            if owner is not None and owner != attempt:
                for key in claimed:
                    await seen.discard(key)
                return JSONResponse({"error": "task already delivered"}, status_code=409)
            if owner is None:
                claimed.append(f"task:{task.task_id}")
            event = f"{ATTEMPT_EVENT_PREFIX}{task.status}"
            resource = {
                "prefect.resource.id": attempt_resource(attempt),
                TASK_ID_LABEL: task.task_id,
            }
            delivery = f"{attempt}:{delivery}"
        if await seen.add(delivery) is not None:
            return JSONResponse({"duplicate": True})
        claimed.append(delivery)
        event_id = uuid.uuid5(_EVENT_NAMESPACE, delivery)
        payload = task.model_dump(exclude_none=True)
        payload[SIGNATURE_FIELD] = keys.sign(
            attempt=attempt, task_id=task.task_id, status=task.status, image_url=task.image_url
        )
        try:
            emitted = await asyncio.wait_for(
                asyncio.to_thread(sink, event, resource, payload, event_id), EMIT_DEADLINE
            )
        except Exception as exc:
            logger.warning("could not emit %s for task %s: %s", event, task.task_id, exc)
            emitted = False
        if not emitted:  # let the provider's retry try again
            for key in claimed:
                await seen.discard(key)
            return JSONResponse({"error": "event not emitted"}, status_code=503)
        await seen.keep(claimed)
        logger.info("task %s %s: emitted %s", task.task_id, task.status, event)
        return JSONResponse({"event": event})

    async def receive(request: Request) -> Response:
        return await deliver(request, None)

    async def receive_for_attempt(request: Request) -> Response:
        token = request.path_params["token"]
        if not is_valid_token(token, keys.token_key):
            # The secret is checked first, so a token is never judged for a stranger.
            provided = request.headers.get("x-webhook-secret", "").encode()
            status = 404 if hmac.compare_digest(provided, expected) else 401
            return JSONResponse({}, status_code=status)
        return await deliver(request, attempt_id(token))

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    logo_png = (resources.files("prefect_journey") / "assets" / "logo.png").read_bytes()

    async def logo(request: Request) -> Response:
        return Response(logo_png, media_type="image/png", headers=LOGO_HEADERS)

    base = path.rstrip("/")
    return Starlette(
        routes=[
            Route(base, receive, methods=["POST"]),
            Route(base + "/{token}", receive_for_attempt, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route(LOGO_PATH, logo, methods=["GET"]),
        ]
    )
