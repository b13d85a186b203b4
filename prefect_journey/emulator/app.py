"""The JourneyAPI emulator as an ASGI app (starlette).

Endpoints follow the documented contract:

- ``POST /api/v1/imagine``: synchronous generation, 4 credits, ``{task_id, status, image_url}``
- ``POST /api/v1/fetch``: ``{"task_id": ...}`` -> the task
- ``GET /api/v1/account``: ``{email, credits, total_images, plan}``
- ``GET /cdn/{task_id}.png``: the image, no auth (as a CDN URL)

An image is rendered once, while its generation runs, and the CDN serves those bytes, as a
real CDN serves a stored object: rendering on every GET would let the emulator's CPU, not
the client, set the pace of a benchmark on a small machine, and would give a retried
download of a grainy image different bytes.

Bad key: 401 ``{}``. Bad body: 400 ``{"errors": [{"msg": ...}]}``. Out of credits: 402.

Admin endpoints for tests and operators (no auth; the emulator binds to loopback):

- ``GET /_emulator/ledger``: calls received (each with when it arrived and, for a
  generation, when it ended), credits charged, webhooks sent, images served
- ``POST /_emulator/reset``: forget tasks and the ledger, restore credits
- ``POST /_emulator/faults``: replace the fault plan (``rates``, ``queue``, ``seed``, ...)
- ``POST /_emulator/config``: change latency, credits, the JPEG-under-PNG rate or the quota at
  run time
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from prefect_journey.emulator.config import EmulatorConfig, FaultPlan, Quota
from prefect_journey.emulator.images import EncodedAs, render_image
from prefect_journey.errors import JourneyValidationError
from prefect_journey.models import CREDITS_PER_IMAGE, ImagineRequest, request_from_payload

logger = logging.getLogger("prefect_journey.emulator")

CDN_CHUNK = 64 * 1024
# Rendered images kept for the CDN. Past this the oldest are dropped and rendered again if
# asked for: a soak or a 1,000-image benchmark makes thousands of images.
RENDERED_BYTES_KEPT = 256 * 1024 * 1024
WEBHOOK_TIMEOUT = 10.0


@dataclass
class _Task:
    task_id: str
    request: ImagineRequest
    status: str = "processing"
    error: str | None = None
    image_url: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "task_id": self.task_id,
            "status": self.status,
            "percentage": "100" if self.status in ("finished", "failed") else "50",
        }
        if self.image_url:
            body["image_url"] = self.image_url
        if self.error:
            body["error"] = self.error
        return body


@dataclass
class EmulatorState:
    """Everything the emulator knows: its settings, the account, the tasks and the ledger.

    One per app, at ``app.state.emulator`` (and :attr:`EmulatorServer.state`); tests read and
    change it directly. Building one calls :meth:`reset`.

    Attributes:
        config: The emulator's settings; changes apply to the next request.
        credits: The credits left; :meth:`reset` restores ``config.credits``.
        tasks: Every task created since the last reset, by task id.
        calls: One entry per call received, in order (endpoint, status, ``at``: the wall
            time it arrived, and what the call did: task id, credits, fault, ...); a call
            that started a generation also has ``ended_at``, the wall time it ended, so a
            benchmark can draw when each paid call ran.
        webhooks: One entry per webhook delivery attempt (task id, URL, whether it carried
            a secret, the delivery fault if any, and the answer's status code or the
            error's name); a ``lost`` delivery has one entry with neither.
        images: What the CDN serves, by task id: sha256, bytes, format, width and height.
        in_flight: Generations running now.
        peak_in_flight: The most generations running at once since the last reset.
        rng: The random source of latency jitter, JPEG-under-PNG choices and corruption;
            seeded with ``config.faults.seed`` by :meth:`reset`.
        renders: Rendered (or rendering) images by task id, oldest first; the oldest are
            dropped past :data:`RENDERED_BYTES_KEPT`.
        rendered_bytes: The bytes of the images held in ``renders``.
        background: Generations and webhook deliveries running on their own.
        quota_opened: When (``time.monotonic``) the quota's first window opened; None
            until the first call under a quota.
        quota_window: The number of the quota's current window, 0 for the first.
        quota_used: The calls the quota admitted in its current window.
    """

    config: EmulatorConfig
    credits: int = 0
    tasks: dict[str, _Task] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_flight: int = 0
    peak_in_flight: int = 0
    rng: random.Random = field(default_factory=random.Random)
    renders: OrderedDict[str, asyncio.Task[bytes]] = field(default_factory=OrderedDict)
    rendered_bytes: int = 0
    background: set[asyncio.Future[None]] = field(default_factory=set)
    quota_opened: float | None = None
    quota_window: int = 0
    quota_used: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget tasks, calls, webhooks and images, restore the credits and reseed ``rng``.

        Generations and deliveries still running are cancelled (safe from any thread).
        """
        for running in list(self.background):
            running.get_loop().call_soon_threadsafe(running.cancel)
        self.background.clear()
        self.credits = self.config.credits
        self.tasks.clear()
        self.calls.clear()
        self.webhooks.clear()
        self.images.clear()
        self.renders.clear()
        self.rendered_bytes = 0
        self.in_flight = self.peak_in_flight = 0
        self.rng = random.Random(self.config.faults.seed)
        self.restart_quota()

    def restart_quota(self) -> None:
        """Forget the quota's windows: the next call opens the first one."""
        self.quota_opened, self.quota_window, self.quota_used = None, 0, 0

    def over_quota(self) -> float | None:
        """Count a generation against ``config.quota``, or say how long its window lasts.

        Returns:
            None when the call is admitted (and counted), or no quota is set; else the
            seconds until the current window ends.
        """
        quota = self.config.quota
        if quota is None:
            return None
        now = time.monotonic()
        if self.quota_opened is None:
            self.quota_opened = now
        window = int((now - self.quota_opened) // quota.window)
        if window != self.quota_window:
            self.quota_window, self.quota_used = window, 0
        if self.quota_used >= quota.calls:
            return self.quota_opened + (window + 1) * quota.window - now
        self.quota_used += 1
        return None

    def record(self, endpoint: str, status: int | None, **extra: Any) -> dict[str, Any]:
        """Log a call as it arrives; the returned entry is updated as the call proceeds.

        Args:
            endpoint: ``"imagine"``, ``"fetch"``, ``"account"`` or ``"cdn"``.
            status: The answer's status, or None while it is not known yet.
            **extra: More fields of the entry (``task_id``, ``credits``, ``fault``, ...).

        Returns:
            The entry, already in :attr:`calls`.
        """
        entry = {"endpoint": endpoint, "status": status, "at": time.time(), **extra}
        self.calls.append(entry)
        return entry

    def ledger(self) -> dict[str, Any]:
        """What the emulator has done since the last reset (``GET /_emulator/ledger``).

        Returns:
            ``calls_total`` (API calls, downloads excluded), ``calls`` (a count per
            endpoint), ``credits_charged``, ``credits_remaining``, ``billed_tasks``,
            ``peak_concurrency``, ``webhooks_sent``, ``webhooks``, ``images`` (by task id)
            and ``log`` (every call's entry, with ``at`` and, for a generation,
            ``ended_at``: see :attr:`calls`).
        """
        by_endpoint: dict[str, int] = {}
        for call in self.calls:
            by_endpoint[call["endpoint"]] = by_endpoint.get(call["endpoint"], 0) + 1
        api_calls = [c for c in self.calls if c["endpoint"] != "cdn"]
        return {
            "calls_total": len(api_calls),
            "calls": by_endpoint,
            "credits_charged": sum(c.get("credits", 0) for c in self.calls),
            "credits_remaining": self.credits,
            "billed_tasks": [c["task_id"] for c in self.calls if c.get("credits")],
            "peak_concurrency": self.peak_in_flight,
            "webhooks_sent": sum("status_code" in w or "error" in w for w in self.webhooks),
            "webhooks": list(self.webhooks),
            "images": dict(self.images),
            "log": list(self.calls),
        }

    def start_render(self, task: _Task, encode_as: EncodedAs | None = None) -> asyncio.Task[bytes]:
        """Render ``task``'s image in a worker thread (once; see the module docstring).

        Called on the event loop, which runs the returned task.

        Args:
            task: The task whose image to render, at its request's output size.
            encode_as: ``"png"`` or ``"jpeg"``; None picks JPEG at the configured
                ``jpeg_as_png_rate``, else PNG.

        Returns:
            The running render, also kept in :attr:`renders`; its result is the image's
            bytes.
        """
        if encode_as is None:
            jpeg = self.rng.random() < self.config.jpeg_as_png_rate
            encode_as = "jpeg" if jpeg else "png"
        render = asyncio.ensure_future(self._render(task, encode_as))
        self.renders[task.task_id] = render
        return render

    async def image(self, task: _Task) -> bytes:
        """The bytes the CDN serves for ``task``, waiting for its render if it runs.

        An image dropped to bound memory is rendered again, in its first format.

        Args:
            task: A task whose generation has started (not a failed one).

        Returns:
            The image's bytes.
        """
        render = self.renders.get(task.task_id)
        if render is None:  # dropped to bound memory: render the same image again
            known = self.images.get(task.task_id)
            render = self.start_render(task, known["format"] if known else "png")
        # Shielded: a download cut short must not cancel the render other GETs wait for.
        return await asyncio.shield(render)

    async def _render(self, task: _Task, encode_as: EncodedAs) -> bytes:
        data = await asyncio.to_thread(
            render_image,
            task.request.prompt,
            task.task_id,
            task.request.output_size,
            encode_as=encode_as,
            noise=self.config.realistic_sizes,
            plain=self.config.plain_images,
        )
        if task.task_id not in self.renders:  # the state was reset meanwhile
            return data
        self.images[task.task_id] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "format": encode_as,
            "width": task.request.output_size[0],
            "height": task.request.output_size[1],
        }
        self.rendered_bytes += len(data)
        while self.rendered_bytes > RENDERED_BYTES_KEPT:
            oldest_id, oldest = next(iter(self.renders.items()))
            if not oldest.done():  # still rendering (this one finishes after this line)
                break
            del self.renders[oldest_id]
            if not oldest.cancelled() and oldest.exception() is None:
                self.rendered_bytes -= len(oldest.result())
        return data


def _errors(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errors": [{"msg": message}]}, status_code=status, headers=headers)


class _CutShortResponse(Response):
    """Announces ``length`` bytes, sends ``body`` (fewer), then returns: the server closes
    the connection and the client sees a dropped connection mid-response."""

    def __init__(self, body: bytes, length: int, media_type: str) -> None:
        super().__init__(content=body, media_type=media_type)
        self.headers["content-length"] = str(length)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})


def _authorised(state: EmulatorState, request: Request) -> bool:
    return request.headers.get("authorization", "") in state.config.api_keys


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise JourneyValidationError("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise JourneyValidationError("body must be a JSON object")
    return body


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """Build the emulator app; its :class:`EmulatorState` is ``app.state.emulator``.

    Args:
        config: The emulator's settings; None for the defaults.

    Returns:
        The Starlette app, serving the endpoints of the module docstring.

    Example:
        ```python
        import uvicorn

        from prefect_journey.emulator import EmulatorConfig, create_app

        app = create_app(EmulatorConfig(credits=100))
        uvicorn.run(app, host="127.0.0.1", port=8765)
        ```
    """
    state = EmulatorState(config or EmulatorConfig())

    async def imagine(request: Request) -> Response:
        entry = state.record("imagine", None)
        if not _authorised(state, request):
            entry["status"] = 401
            return JSONResponse({}, status_code=401)
        try:
            task_request = request_from_payload(await _json_body(request))
        except JourneyValidationError as exc:
            entry["status"] = 400
            return _errors(400, exc.message)
        entry["references"] = list(task_request.image_urls)
        wait = state.over_quota()
        if wait is not None:  # a refusal before any work: not billed, no fault drawn
            entry.update(status=429, quota=True)
            until_next = {"Retry-After": str(max(1, math.ceil(wait)))}
            return _errors(429, "Quota exceeded: too many generations in this window", until_next)
        fault = entry["fault"] = state.config.faults.draw("api")
        if fault == "400":
            entry["status"] = 400
            return _errors(400, "Invalid request")
        if fault in ("429", "503"):
            entry["status"] = int(fault)
            retry_after = f"{state.config.faults.retry_after:g}"
            message = "Too many requests" if fault == "429" else "Service unavailable"
            return _errors(int(fault), message, {"Retry-After": retry_after})
        if state.credits < CREDITS_PER_IMAGE:
            entry["status"] = 402
            return _errors(402, f"Insufficient credits: {state.credits} left, 4 needed")

        task = _Task(task_id=str(uuid.uuid4()), request=task_request)
        state.tasks[task.task_id] = task
        if fault != "failed":  # the image exists when the generation ends
            state.start_render(task)
        state.credits -= CREDITS_PER_IMAGE
        entry.update(task_id=task.task_id, credits=CREDITS_PER_IMAGE)
        cdn_url = str(request.url_for("cdn", name=f"{task.task_id}.png"))
        # The generation runs on its own: a caller that hangs up (or is killed) neither stops
        # it nor its webhook delivery, as on the provider's side.
        generation = asyncio.ensure_future(_generate(state, task, entry, fault, cdn_url))
        state.background.add(generation)
        generation.add_done_callback(state.background.discard)
        if fault in ("gateway_502", "gateway_503"):
            status = int(fault.removeprefix("gateway_"))
            headers = {"Retry-After": f"{state.config.faults.retry_after:g}"}
            return _errors(
                status, "Bad gateway" if status == 502 else "Service unavailable", headers
            )
        await asyncio.shield(generation)

        if fault == "500":
            return JSONResponse({}, status_code=500)
        if fault == "malformed":
            return Response("<html>upstream error</html>", media_type="text/html")
        body: dict[str, Any] = {"task_id": task.task_id, "status": task.status}
        if fault == "failed":
            body["error"] = task.error
        else:
            body["image_url"] = task.image_url
        if fault == "drop":
            raw = bytes(JSONResponse(body).body)
            return _CutShortResponse(raw[: len(raw) // 2], len(raw), "application/json")
        return JSONResponse(body)

    async def fetch(request: Request) -> Response:
        if not _authorised(state, request):
            state.record("fetch", 401)
            return JSONResponse({}, status_code=401)
        try:
            body = await _json_body(request)
        except JourneyValidationError as exc:
            state.record("fetch", 400)
            return _errors(400, exc.message)
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            state.record("fetch", 400)
            return _errors(400, "task_id is required")
        task = state.tasks.get(task_id)
        if task is None:
            state.record("fetch", 404)
            return _errors(404, "Task not found")
        state.record("fetch", 200, task_id=task_id)
        return JSONResponse(task.as_json())

    async def account(request: Request) -> Response:
        if not _authorised(state, request):
            state.record("account", 401)
            return JSONResponse({}, status_code=401)
        state.record("account", 200)
        return JSONResponse(
            {
                "email": state.config.email,
                "credits": state.credits,
                "total_images": sum(1 for t in state.tasks.values() if t.status == "finished"),
                "plan": state.config.plan,
            }
        )

    async def cdn(request: Request) -> Response:
        name = request.path_params["name"]
        task = state.tasks.get(name.removesuffix(".png"))
        if task is None or task.status != "finished":
            state.record("cdn", 404)
            return Response("not found", status_code=404, media_type="text/plain")
        data = await state.image(task)
        fault = state.config.faults.draw("cdn")
        # Recorded so tests can prove the API key never travels to the CDN.
        state.record(
            "cdn",
            200,
            task_id=task.task_id,
            fault=fault,
            authorization="authorization" in request.headers,
        )
        delay = state.config.cdn_chunk_delay
        if fault == "truncate":
            # Sent without a length, then ended early and cleanly: only the content can tell.
            return _streamed(data[: len(data) // 2], delay, announce_length=False)
        if fault == "corrupt":
            data = _corrupt(data, state.rng)
        return _streamed(data, delay)

    async def ledger(request: Request) -> Response:
        return JSONResponse(state.ledger())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    async def faults(request: Request) -> Response:
        body = await request.json()
        try:
            state.config.faults = FaultPlan(**body)
        except (TypeError, ValueError) as exc:
            return _errors(400, str(exc))
        return JSONResponse({"faults": sorted(body)})

    async def configure(request: Request) -> Response:
        body = await request.json()
        if "quota" in body:  # checked first: a bad quota changes nothing
            try:
                quota = Quota(**body["quota"]) if body["quota"] else None
            except (TypeError, ValueError) as exc:
                return _errors(400, str(exc))
            state.config.quota = quota
            state.restart_quota()
        latency = state.config.latency
        for key in ("time_scale", "fixed", "per_reference", "jitter"):
            if key in body:
                setattr(latency, key, body[key])
        if "credits" in body:
            state.credits = state.config.credits = int(body["credits"])
        for key in ("jpeg_as_png_rate", "realistic_sizes", "cdn_chunk_delay"):
            if key in body:
                setattr(state.config, key, body[key])
        return JSONResponse({"configured": sorted(body)})

    app = Starlette(
        routes=[
            Route("/api/v1/imagine", imagine, methods=["POST"]),
            Route("/api/v1/fetch", fetch, methods=["POST"]),
            Route("/api/v1/account", account, methods=["GET"]),
            Route("/cdn/{name}", cdn, methods=["GET"], name="cdn"),
            Route("/_emulator/ledger", ledger, methods=["GET"]),
            Route("/_emulator/reset", reset, methods=["POST"]),
            Route("/_emulator/faults", faults, methods=["POST"]),
            Route("/_emulator/config", configure, methods=["POST"]),
        ]
    )
    app.state.emulator = state
    return app


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    """Garble a span in the middle and drop a JPEG's end marker, keeping the length."""
    middle = len(data) // 2
    garbage = bytes(rng.getrandbits(8) for _ in range(64))
    data = data[:middle] + garbage + data[middle + 64 :]
    return data[:-2] + b"\x00\x00"


def _streamed(data: bytes, delay: float, *, announce_length: bool = True) -> Response:
    async def chunks() -> Any:
        for start in range(0, len(data), CDN_CHUNK):
            if delay:
                await asyncio.sleep(delay)
            yield data[start : start + CDN_CHUNK]

    headers = {"content-length": str(len(data))} if announce_length else None
    # The real CDN answers image/png whatever the bytes are.
    return StreamingResponse(chunks(), media_type="image/png", headers=headers)


async def _generate(
    state: EmulatorState, task: _Task, entry: dict[str, Any], fault: str | None, cdn_url: str
) -> None:
    """One generation, from billing to its end and its webhook delivery."""
    request = task.request
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        seconds = state.config.latency.seconds(
            len(request.image_urls), request.resolution, state.rng
        )
        await asyncio.sleep(seconds)
        if fault == "slow":
            await asyncio.sleep(state.config.faults.slow_seconds)
    finally:
        state.in_flight -= 1
    entry["ended_at"] = time.time()
    # What the caller was answered; a gateway's answer went out before the generation ended.
    entry["status"] = {"500": 500, "gateway_502": 502, "gateway_503": 503}.get(fault or "", 200)
    if fault == "failed":
        # A refusal (content policy) is not billed.
        state.credits += CREDITS_PER_IMAGE
        entry["credits"] = 0
        task.status, task.error = "failed", "Content policy violation"
    else:
        task.status, task.image_url = "finished", cdn_url
    if request.webhook_url is not None:
        delivery = asyncio.ensure_future(_deliver(state, task))
        state.background.add(delivery)
        delivery.add_done_callback(state.background.discard)


async def _deliver(state: EmulatorState, task: _Task) -> None:
    """POST the finished task to its webhook as the provider does: after
    ``config.webhook_delay``, again after each of ``config.webhook_retry_delays`` until a 2xx,
    with the delivery faults of the plan."""
    url = task.request.webhook_url
    assert url is not None
    secret = task.request.webhook_secret
    fault = state.config.faults.draw("webhook")
    base: dict[str, Any] = {"task_id": task.task_id, "url": url, "signed": bool(secret)}
    if fault == "lost":
        state.webhooks.append({**base, "fault": fault})
        return
    headers = {"x-webhook-secret": secret.get_secret_value()} if secret else {}
    if fault == "wrong_secret":
        headers = {"x-webhook-secret": "not-the-secret"}
    delay = state.config.webhook_delay
    if fault == "late":
        delay += state.config.faults.late_seconds
    waits = (delay, *state.config.webhook_retry_delays)
    sends = 2 if fault == "duplicate" else 1
    async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT) as client:
        for wait in waits:
            await asyncio.sleep(wait)
            entry = {**base, "fault": fault}
            try:
                response = await client.post(url, json=task.as_json(), headers=headers)
                entry["status_code"] = response.status_code
            except httpx.HTTPError as exc:
                entry["error"] = type(exc).__name__
            state.webhooks.append(entry)
            if entry.get("status_code", 0) // 100 == 2:
                sends -= 1
                if not sends:
                    return
