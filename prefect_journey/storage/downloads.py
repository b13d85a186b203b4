"""Download clients for an image's URL: no credentials, checked hops, a size cap and a deadline.

The download goes through its own HTTP client, with no ``Authorization`` header: the API key
is never sent to the CDN. Only https is accepted for non-loopback hosts, on every redirect
hop, and at most :data:`MAX_REDIRECTS` hops are followed. Every hop connects only to an
address the address rules allow, checked after name resolution
(:mod:`prefect_journey.address_rules`). The socket's pieces are regrouped into
:data:`DOWNLOAD_CHUNK` chunks, and the download ends once it passes its deadline
(:func:`~prefect_journey.policy.download_deadline`).

This module does not import Prefect.
"""

from __future__ import annotations

import time

import httpx

from prefect_journey import policy
from prefect_journey.address_rules import AddressRules, AsyncCheckedTransport, CheckedTransport
from prefect_journey.errors import DownloadRefusedError, DownloadTimeoutError
from prefect_journey.models import check_http_url
from prefect_journey.tls import shared_ssl_context

# The API's images are 2-10 MB, a 4K PNG ~25 MB; 100 MB means something is wrong.
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
# Download piece size: large enough to keep syscalls rare, small against memory.
DOWNLOAD_CHUNK = 1024 * 1024
# A CDN redirects once or twice; more is a loop or an attack.
MAX_REDIRECTS = 5
# A download's timeouts: the API's for connecting, writing and the pool, its own for reading.
DOWNLOAD_TIMEOUT = httpx.Timeout(
    connect=policy.CONNECT_TIMEOUT,
    read=policy.DOWNLOAD_READ_TIMEOUT,
    write=policy.WRITE_TIMEOUT,
    pool=policy.POOL_TIMEOUT,
)


class _Regrouper:
    """Regroups the pieces the socket gives into :data:`DOWNLOAD_CHUNK` chunks, and ends the
    download past its deadline. The deadline is checked as each piece arrives, so a trickle
    is cut off at its next byte; a silent connection ends at the read timeout first."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._ends = time.monotonic() + deadline
        self._buffer = bytearray()
        self._received = 0

    def add(self, piece: bytes) -> bytes | None:
        """Take ``piece``; return a whole chunk when one is ready."""
        self._received += len(piece)
        if time.monotonic() > self._ends:
            raise DownloadTimeoutError(
                f"image download passed its {self._deadline:g} s deadline after "
                f"{self._received} bytes "
                f"(slower than {policy.MIN_DOWNLOAD_BYTES_PER_SECOND} bytes/s)"
            )
        self._buffer += piece
        return self.rest() if len(self._buffer) >= DOWNLOAD_CHUNK else None

    def rest(self) -> bytes | None:
        """The bytes taken and not yet returned, if any."""
        if not self._buffer:
            return None
        chunk = bytes(self._buffer)
        self._buffer.clear()
        return chunk


def _check_download_url(request: httpx.Request) -> None:
    try:
        check_http_url(str(request.url), what="image URL", https_only_remote=True)
    except ValueError as exc:
        raise DownloadRefusedError(f"refusing to download: {exc}") from None


def _hop_check(request: httpx.Request) -> None:
    _check_download_url(request)


async def _async_hop_check(request: httpx.Request) -> None:
    _check_download_url(request)


def download_client(
    transport: httpx.BaseTransport | None = None, *, rules: AddressRules | None = None
) -> httpx.Client:
    """An HTTP client for CDN downloads: no credentials, checked redirects and addresses.

    The API key is never sent to the CDN: this client has no ``Authorization`` header. It
    follows at most :data:`MAX_REDIRECTS` redirects, and every hop must be http(s), https
    unless the host is loopback, and must connect where the address rules allow
    (:mod:`prefect_journey.address_rules`); a refused hop raises
    :class:`~prefect_journey.errors.DownloadRefusedError` (not retryable).

    Args:
        transport: An httpx transport that is trusted with the connections (tests); None
            (the default) connects through a
            :class:`~prefect_journey.address_rules.CheckedTransport`.
        rules: The address rules of that transport; None reads them from the environment.

    Returns:
        A new client with :data:`DOWNLOAD_TIMEOUT`; the caller closes it.

    Raises:
        ConfigurationError: A variable of the address rules is malformed.
    """
    return httpx.Client(
        transport=transport or CheckedTransport(rules, verify=shared_ssl_context()),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=DOWNLOAD_TIMEOUT,
        verify=shared_ssl_context(),
        event_hooks={"request": [_hop_check]},
    )


def async_download_client(
    transport: httpx.AsyncBaseTransport | None = None,
    max_connections: int = 100,
    *,
    rules: AddressRules | None = None,
) -> httpx.AsyncClient:
    """Async twin of :func:`download_client`: no credentials, checked redirects and addresses.

    Args:
        transport: An httpx async transport that is trusted with the connections (tests);
            None (the default) connects through an
            :class:`~prefect_journey.address_rules.AsyncCheckedTransport`.
        max_connections: The size of the connection pool; 100 by default. One client
            shared by many concurrent downloads needs at least their number: past it a
            download waits for a connection, and fails after the pool timeout (30 s).
        rules: The address rules of that transport; None reads them from the environment.

    Returns:
        A new client with :data:`DOWNLOAD_TIMEOUT`; the caller closes it.

    Raises:
        ConfigurationError: A variable of the address rules is malformed.
    """
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=policy.KEEPALIVE_CONNECTIONS
    )
    return httpx.AsyncClient(
        transport=transport
        or AsyncCheckedTransport(rules, verify=shared_ssl_context(), limits=limits),
        limits=limits,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=DOWNLOAD_TIMEOUT,
        verify=shared_ssl_context(),
        event_hooks={"request": [_async_hop_check]},
    )
