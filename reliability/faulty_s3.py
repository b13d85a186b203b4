"""A fault-injecting proxy in front of an S3 server (moto), for the soak test.

Write requests (object PUTs, multipart parts, completions) fail at a seeded rate: half of
the faults answer 503 ``SlowDown`` or 500 ``InternalError`` (as S3 does under load), half
cut the connection after the body was received (the upload's outcome is unknown to the
client). Reads pass through, so verification sees what was really stored.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by the soak test</Message></Error>"
)
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class _Cut(Response):
    """Announce a body and close the connection before sending it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]}
        )
        await send({"type": "http.response.body", "body": b"", "more_body": True})


def create_proxy(
    upstream: str, rate: float, seed: int = 0, *, lose_commits: bool = False
) -> tuple[Starlette, dict[str, int]]:
    """The proxy app and its live counters (``writes``, ``faults``). ``lose_commits``: on
    top of ``rate``, every multipart completion reaches the store and its answer is cut,
    and any repeat of it is answered 500 (the soak's worst case, made certain)."""
    rng = random.Random(seed)
    completed: set[str] = set()
    lock = threading.Lock()
    counters = {"writes": 0, "faults": 0}
    client = httpx.AsyncClient(base_url=upstream, timeout=60)

    async def send_upstream(request: Request, body: bytes) -> httpx.Response:
        return await client.request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=_headers(request),
            content=body,
        )

    async def forward(request: Request) -> Response:
        body = await request.body()
        is_write = request.method in ("PUT", "POST")
        upload = request.query_params.get("uploadId")
        if lose_commits and request.method == "POST" and upload:
            if upload in completed:
                return Response(
                    _ERROR.format(code="InternalError"), 500, media_type="application/xml"
                )
            completed.add(upload)
            await send_upstream(request, body)
            return _Cut()
        if is_write:
            with lock:
                counters["writes"] += 1
                roll = rng.random()
                faulty = roll < rate
                counters["faults"] += faulty
            if faulty:
                if roll < rate / 4:
                    return Response(
                        _ERROR.format(code="SlowDown"), 503, media_type="application/xml"
                    )
                if roll < rate / 2:
                    return Response(
                        _ERROR.format(code="InternalError"), 500, media_type="application/xml"
                    )
                await send_upstream(request, body)
                return _Cut()
        upstream_response = await send_upstream(request, body)
        return Response(
            upstream_response.content,
            upstream_response.status_code,
            headers=_response_headers(request, upstream_response),
        )

    app = Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "PUT", "POST", "DELETE", "HEAD"])]
    )
    return app, counters


def _headers(request: Request) -> dict[str, Any]:
    return {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}


def _response_headers(request: Request, upstream: httpx.Response) -> dict[str, str]:
    """The upstream headers minus hop-by-hop ones. A HEAD answer keeps its Content-Length:
    it is the object's size, and without it the response would announce the length of its
    own empty body, 0 (s3fs then reads every existing object as empty)."""
    keep = {"content-length"} if request.method == "HEAD" else set()
    return {
        k: v
        for k, v in upstream.headers.items()
        if k.lower() not in _HOP_HEADERS or k.lower() in keep
    }
