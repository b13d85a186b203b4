"""Receive JourneyAPI webhooks and turn them into Prefect events.

The provider POSTs the finished task (the ``/fetch`` shape) to ``webhook_url`` with the
request's ``webhook_secret`` in the ``x-webhook-secret`` header. That is a bare shared
secret: no signature over the body, no timestamp. So this receiver:

- compares the header with :func:`hmac.compare_digest` (constant time) and answers 401 with
  no detail to a wrong or missing secret;
- accepts only a JSON object of at most :data:`MAX_BODY_BYTES` with a ``task_id`` and a
  ``status``;
- de-duplicates on ``task_id`` (the provider may deliver twice): a replay is acknowledged
  with 200 and emits nothing. In memory, the last :data:`DEDUP_CAPACITY` task ids; across
  restarts the event id is derived from the task id and status, so Prefect itself stores a
  replayed event once;
- emits ``journey.task.finished`` or ``journey.task.failed`` (resource
  ``journey.task.<task_id>``), which a deployment trigger can turn into a flow run;
- answers 503 if the event could not be emitted, so the provider retries.

Run it with ``JOURNEY_WEBHOOK_SECRET=... prefect-journey webhooks --port 8780``. The secret
is read from the environment, never from the command line (which other users can see).
"""

from __future__ import annotations

import hmac
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from prefect_journey import settings
from prefect_journey.models import TaskStatus

WEBHOOK_PATH = "/webhooks/journey"
# A task result is a few hundred bytes; anything near this is not from the provider.
MAX_BODY_BYTES = 64 * 1024
DEDUP_CAPACITY = 100_000
_EVENT_NAMESPACE = uuid.UUID("1b671a64-40d5-491e-99b0-da01ff1f3341")

logger = logging.getLogger("prefect_journey.webhooks")

Emitter = Callable[[str, dict[str, str], dict[str, Any], uuid.UUID], bool]


def emit_prefect_event(
    event: str, resource: dict[str, str], payload: dict[str, Any], event_id: uuid.UUID
) -> bool:
    """Send the event to Prefect (``PREFECT_API_URL``); True if it was handed over.

    Prefect is imported on the first call, not with this module.

    Args:
        event: The event's name, such as ``journey.task.finished``.
        resource: The event's resource (``prefect.resource.id`` and any labels).
        payload: The event's data.
        event_id: The event's id; Prefect stores an event of a given id once, so a replayed
            delivery is not recorded twice.

    Returns:
        True if Prefect's events worker took the event; False when Prefect sends no events
        (events disabled, or no client that can send them).
    """
    from prefect.events import emit_event

    return emit_event(event, resource=resource, payload=payload, id=event_id) is not None


class _SeenTaskIds:
    """A bounded, thread-safe set of task ids, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def add(self, task_id: str) -> bool:
        """Record ``task_id``; False if it was already there."""
        with self._lock:
            if task_id in self._ids:
                return False
            self._ids[task_id] = None
            if len(self._ids) > self._capacity:
                self._ids.popitem(last=False)
            return True

    def discard(self, task_id: str) -> None:
        with self._lock:
            self._ids.pop(task_id, None)


def create_webhook_app(
    secret: str | SecretStr, *, emit: Emitter = emit_prefect_event, path: str = WEBHOOK_PATH
) -> Starlette:
    """The receiver as an ASGI app. ``emit`` sends events (Prefect's by default).

    ``POST path`` takes deliveries and answers: 401 with no detail to a wrong or missing
    secret; 413 to a body above :data:`MAX_BODY_BYTES`; 400 to anything but a task object;
    202 ``{"ignored": status}`` to a task not yet finished or failed; 200
    ``{"duplicate": true}`` to a task id already emitted; 503 when the event could not be
    emitted, so that the provider retries; else 200 ``{"event": name}``.
    ``GET /health`` answers 200 ``{"ok": true}``.

    Args:
        secret: The shared secret the provider sends in ``x-webhook-secret`` (the
            request's ``webhook_secret``).
        emit: Sends one event: called with the event's name, resource, payload and id,
            returns whether it was sent; an exception counts as not sent. Defaults to
            :func:`emit_prefect_event` (tests pass their own).
        path: The path deliveries are POSTed to; :data:`WEBHOOK_PATH` by default.

    Returns:
        The Starlette app, to run with any ASGI server.

    Raises:
        ValueError: The secret is empty or blank.

    Example:
        ```python
        import os

        import uvicorn

        from prefect_journey.webhooks import create_webhook_app

        app = create_webhook_app(os.environ["JOURNEY_WEBHOOK_SECRET"])
        uvicorn.run(app, host="127.0.0.1", port=8780)
        ```
    """
    expected = (secret.get_secret_value() if isinstance(secret, SecretStr) else secret).encode()
    if not expected.strip():
        raise ValueError(f"a webhook secret is required (set {settings.WEBHOOK_SECRET.name})")
    seen = _SeenTaskIds(DEDUP_CAPACITY)

    async def receive(request: Request) -> Response:
        provided = request.headers.get("x-webhook-secret", "").encode()
        if not hmac.compare_digest(provided, expected):
            return JSONResponse({}, status_code=401)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            task = TaskStatus.model_validate_json(body)
        except ValidationError:
            return JSONResponse({"error": "expected a task object with task_id and status"}, 400)
        if task.status not in ("finished", "failed"):
            return JSONResponse({"ignored": task.status}, status_code=202)
        if not seen.add(task.task_id):
            return JSONResponse({"duplicate": True})
        event = f"journey.task.{task.status}"
        payload = task.model_dump(exclude_none=True)
        resource = {"prefect.resource.id": f"journey.task.{task.task_id}"}
        event_id = uuid.uuid5(_EVENT_NAMESPACE, f"{task.task_id}:{task.status}")
        try:
            emitted = emit(event, resource, payload, event_id)
        except Exception as exc:
            logger.warning("could not emit %s for task %s: %s", event, task.task_id, exc)
            emitted = False
        if not emitted:
            seen.discard(task.task_id)  # let the provider's retry try again
            return JSONResponse({"error": "event not emitted"}, status_code=503)
        logger.info("task %s %s: emitted %s", task.task_id, task.status, event)
        return JSONResponse({"event": event})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[Route(path, receive, methods=["POST"]), Route("/health", health, methods=["GET"])]
    )
