"""The address rules: where an image download and a reference URL may lead.

A URL names a host; what matters is the address a connection goes to. So the rules judge
the addresses a host name resolves to, not the name:

- An address must be public: not loopback, private, link-local, shared (carrier-grade NAT),
  multicast, reserved, unspecified, nor any other range IANA marks as not global. An IPv6
  address that carries an IPv4 one (IPv4-mapped, 6to4, NAT64) is judged by that IPv4
  address as well.
- Except an endpoint explicitly allowed: the configured API itself (``JOURNEY_BASE_URL``,
  such as the emulator on loopback) and the ``host:port`` pairs of
  ``JOURNEY_PRIVATE_ENDPOINTS``. Only that host and port, never the whole machine.
- For downloads only: when ``JOURNEY_IMAGE_HOSTS`` lists host names, an image (and every
  redirect of it) must come from one of them.

Downloads enforce the rules at connect time in :class:`CheckedTransport` and
:class:`AsyncCheckedTransport`: a host is resolved once, every address it resolves to is
checked, and the connection goes to a checked address, while the Host header, TLS's server
name and the certificate check keep the URL's host name. Neither a redirect nor a DNS answer
that changes between a check and the connection (rebinding) reaches a refused address.

Reference URLs are fetched by the provider, not here: :func:`check_references` applies the
same rules to them before the paid call, so a run never pays for a request that points the
provider at a private address. A reference host that does not resolve here is let through,
since the provider resolves it on its own side (a worker may reach the internet only through
a proxy and resolve no public name).

This module does not import Prefect.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

import anyio.to_thread
import httpx

from prefect_journey import settings
from prefect_journey.errors import (
    ConfigurationError,
    DownloadRefusedError,
    ReferenceRefusedError,
)

Resolver = Callable[[str, int], Sequence[str]]
"""Resolves ``(host, port)`` to IP addresses as strings, like :func:`system_resolver`."""

_DEFAULT_PORTS = {"http": 80, "https": 443}
# The well-known NAT64 prefix: its addresses reach the IPv4 address in their last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to for a TCP connection, in the system's order.

    Args:
        host: A host name or IP literal.
        port: The port to connect to.

    Returns:
        The distinct IP addresses, as strings.

    Raises:
        OSError: The name does not resolve (``socket.gaierror``).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(address: str) -> bool:
    """Whether ``address`` is a public unicast address that anyone on the internet reaches.

    Args:
        address: An IPv4 or IPv6 address (an IPv6 scope such as ``%eth0`` is ignored).

    Returns:
        False for loopback, private, link-local, shared, multicast, reserved, unspecified
        and every other non-global range, and for an IPv6 address whose embedded IPv4
        address (IPv4-mapped, 6to4, NAT64) is one of those; True otherwise.

    Raises:
        ValueError: ``address`` is not an IP address.

    Example:
        ```python
        from prefect_journey.address_rules import is_public_address

        assert is_public_address("93.184.215.14")
        assert not is_public_address("169.254.169.254")
        assert not is_public_address("::ffff:127.0.0.1")
        ```
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    judged: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        judged += [embedded for embedded in (ip.ipv4_mapped, ip.sixtofour) if embedded]
        if ip in _NAT64:
            judged.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    # is_global alone lets multicast through (224.0.0.0/4 holds globally scoped groups), and
    # IPv6 site-local addresses (fec0::/10, deprecated but still routed inside some sites).
    return all(
        one.is_global
        and not (one.is_multicast or one.is_reserved or one.is_unspecified)
        and not (isinstance(one, ipaddress.IPv6Address) and one.is_site_local)
        for one in judged
    )


def _normal_host(host: str) -> str:
    """A host as the rules compare it: lower case, IP literals in their canonical form."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8000`` for IPv6) as the rules compare it.

    Args:
        text: The endpoint.

    Returns:
        The host (lower case, IP literals canonical) and the port.

    Raises:
        ValueError: No host, or no port, or a port out of range.
    """
    try:
        parts = urlsplit(f"//{text.strip()}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not host:port ({exc})") from None
    if not host or port is None or parts.path or parts.username:
        raise ValueError(f"{text!r} is not host:port")
    return _normal_host(host), port


class Origin(NamedTuple):
    """Where a request goes: its scheme, host (as the rules compare it) and port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: httpx.URL | str) -> Origin:
        """The origin of ``url``; the port defaults to the scheme's."""
        url = httpx.URL(url)
        scheme = url.scheme.lower()
        host = _normal_host(url.raw_host.decode("ascii"))
        return cls(scheme, host, url.port or _DEFAULT_PORTS.get(scheme, 0))


@dataclass(frozen=True)
class AddressRules:
    """Which hosts and addresses a download or a reference may lead to.

    Build it with :meth:`from_settings`; the fields are for tests and tools.

    Attributes:
        image_hosts: The host names images may come from, lower case; ``*.example.com``
            stands for any name under ``example.com``. Empty: any host whose addresses are
            public.
        allowed_endpoints: ``(host, port)`` pairs that may be on a non-public address (as
            :func:`parse_endpoint` gives them); a pair matches a URL's host name or an
            address it resolves to.
        resolver: Turns a host and port into addresses; :func:`system_resolver` by default.

    Example:
        ```python
        from prefect_journey.address_rules import AddressRules

        rules = AddressRules(resolver=lambda host, port: ["10.0.0.7"])
        rules.resolve("cdn.example.com", 443)  # ValueError: a private address
        ```
    """

    image_hosts: tuple[str, ...] = ()
    allowed_endpoints: frozenset[tuple[str, int]] = frozenset()
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_settings(cls, resolver: Resolver | None = None) -> AddressRules:
        """The rules the environment configures.

        The configured API (``JOURNEY_BASE_URL``, else the provider's) is an allowed
        endpoint, so the emulator on loopback serves its images; so is each
        ``JOURNEY_PRIVATE_ENDPOINTS`` entry. ``JOURNEY_IMAGE_HOSTS`` gives the image hosts.

        Args:
            resolver: The resolver to use; None for :func:`system_resolver`.

        Returns:
            The rules.

        Raises:
            ConfigurationError: A variable is malformed.
        """
        api = Origin.of(settings.base_url())
        try:
            private = {parse_endpoint(entry) for entry in settings.private_endpoints()}
        except ValueError as exc:
            raise ConfigurationError(f"{settings.PRIVATE_ENDPOINTS.name}: {exc}") from None
        return cls(
            image_hosts=settings.image_hosts(),
            allowed_endpoints=frozenset({(api.host, api.port), *private}),
            resolver=resolver or system_resolver,
        )

    def check_image_host(self, host: str) -> None:
        """Refuse ``host`` unless it is one of :attr:`image_hosts` (or none are set).

        Raises:
            ValueError: The host is not on the list.
        """
        host = _normal_host(host)
        if not self.image_hosts or any(_host_matches(host, name) for name in self.image_hosts):
            return
        raise ValueError(
            f"host {host!r} is not one of the image hosts {settings.IMAGE_HOSTS.name} allows"
        )

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host:port``, every one of them checked.

        Args:
            host: The URL's host.
            port: The port.

        Returns:
            The addresses ``host`` resolves to, all public or allowed, in order.

        Raises:
            ValueError: One of the addresses is not public and not allowed (naming the host
                and that address), or the name resolves to no address.
            OSError: The name does not resolve.
        """
        host = _normal_host(host)
        addresses = list(self.resolver(host, port))
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        for address in addresses:
            if not self._allows(host, port, address):
                raise ValueError(
                    f"{host}:{port} resolves to {address}, which is not a public address; "
                    f"list the endpoint in {settings.PRIVATE_ENDPOINTS.name} to allow it"
                )
        return addresses

    def _allows(self, host: str, port: int, address: str) -> bool:
        if (host, port) in self.allowed_endpoints:
            return True
        if (_normal_host(address.split("%", 1)[0]), port) in self.allowed_endpoints:
            return True
        return is_public_address(address)


def _host_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def check_references(image_urls: Iterable[str], rules: AddressRules | None = None) -> None:
    """Refuse reference URLs that lead to a non-public address, before the paid call.

    IP literals are judged as they are; a host name by every address it resolves to here. A
    name that does not resolve here is let through (the provider resolves it on its side).

    Args:
        image_urls: The references of a request (already checked as http(s) URLs).
        rules: The rules; None reads them from the environment
            (:meth:`AddressRules.from_settings`).

    Raises:
        ReferenceRefusedError: A reference leads to a non-public address that is not
            allowed; the message names its position and host, never the whole URL (a
            presigned URL carries a signature).
        ConfigurationError: A ``JOURNEY_*`` variable of the rules is malformed.

    Example:
        ```python
        from prefect_journey.address_rules import check_references

        check_references(["https://93.184.215.14/ref.png"])  # fine
        check_references(["http://169.254.169.254/latest"])  # ReferenceRefusedError
        ```
    """
    urls = list(image_urls)
    if not urls:
        return
    rules = rules or AddressRules.from_settings()
    for position, url in enumerate(urls):
        origin = Origin.of(url)
        try:
            rules.resolve(origin.host, origin.port)
        except ValueError as exc:
            raise ReferenceRefusedError(f"image_urls[{position}]: {exc}") from None
        except OSError:
            continue  # not resolvable here: the provider resolves it on its side


async def acheck_references(image_urls: Iterable[str], rules: AddressRules | None = None) -> None:
    """Async twin of :func:`check_references`; names are resolved in a worker thread.

    Args:
        image_urls: The references of a request.
        rules: The rules; None reads them from the environment.

    Raises:
        ReferenceRefusedError: A reference leads to a non-public address not allowed.
        ConfigurationError: A ``JOURNEY_*`` variable of the rules is malformed.
    """
    urls = list(image_urls)
    if urls:
        await anyio.to_thread.run_sync(check_references, urls, rules)


def _checked_addresses(rules: AddressRules, request: httpx.Request) -> tuple[Origin, list[str]]:
    """The request's origin and the checked addresses to connect to, or a refusal."""
    origin = Origin.of(request.url)
    try:
        rules.check_image_host(origin.host)
        return origin, rules.resolve(origin.host, origin.port)
    except ValueError as exc:
        raise DownloadRefusedError(f"refusing to download: {exc}") from None
    except OSError as exc:
        raise httpx.ConnectError(f"cannot resolve {origin.host}: {exc}", request=request) from None


def _pinned(request: httpx.Request, origin: Origin, address: str) -> httpx.Request:
    """``request`` sent to ``address``, still naming its host in Host and in TLS."""
    extensions = dict(request.extensions)
    if origin.scheme == "https":
        # The TLS server name and the certificate check use the URL's host, not the address.
        extensions["sni_hostname"] = origin.host
    return httpx.Request(
        request.method,
        request.url.copy_with(host=address.split("%", 1)[0]),
        headers=request.headers,  # keeps the Host header of the URL's host
        stream=request.stream,
        extensions=extensions,
    )


class CheckedTransport(httpx.BaseTransport):
    """An httpx transport that connects only where :class:`AddressRules` allow.

    Each request (each redirect hop is one) resolves its host once, checks every address,
    and is sent to the first checked address that accepts a connection. Each origin has its
    own connection pool, so a connection made for one host name (its TLS server name and
    certificate) never carries a request for another. Environment proxies are not used: a
    proxy would connect wherever it resolves the host.

    Args:
        rules: The rules; None reads them from the environment.
        verify: The TLS context.
        limits: The connection limits of each origin's pool.

    Raises:
        DownloadRefusedError: From :meth:`handle_request`: the host or one of its addresses
            is refused.

    Example:
        ```python
        import httpx
        from prefect_journey.address_rules import CheckedTransport

        with httpx.Client(transport=CheckedTransport()) as http:
            http.get("http://127.0.0.1:9/")  # DownloadRefusedError: not a public address
        ```
    """

    def __init__(
        self,
        rules: AddressRules | None = None,
        *,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008 - immutable
    ) -> None:
        self.rules = rules or AddressRules.from_settings()
        self._new_pool = functools.partial(
            httpx.HTTPTransport, verify=verify, limits=limits, trust_env=False
        )
        self._pools: dict[Origin, httpx.HTTPTransport] = {}
        self._pools_lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        origin, addresses = _checked_addresses(self.rules, request)
        with self._pools_lock:
            pool = self._pools.get(origin) or self._pools.setdefault(origin, self._new_pool())
        for address in addresses[:-1]:
            try:
                return pool.handle_request(_pinned(request, origin, address))
            except httpx.ConnectError:
                continue  # nothing was sent: the next address
        return pool.handle_request(_pinned(request, origin, addresses[-1]))

    def close(self) -> None:
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


class AsyncCheckedTransport(httpx.AsyncBaseTransport):
    """Async twin of :class:`CheckedTransport`; names are resolved in a worker thread.

    Args:
        rules: The rules; None reads them from the environment.
        verify: The TLS context.
        limits: The connection limits of each origin's pool.

    Raises:
        DownloadRefusedError: From :meth:`handle_async_request`: the host or one of its
            addresses is refused.
    """

    def __init__(
        self,
        rules: AddressRules | None = None,
        *,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008 - immutable
    ) -> None:
        self.rules = rules or AddressRules.from_settings()
        self._new_pool = functools.partial(
            httpx.AsyncHTTPTransport, verify=verify, limits=limits, trust_env=False
        )
        # Used from one event loop only: no await between a lookup and an insertion.
        self._pools: dict[Origin, httpx.AsyncHTTPTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin, addresses = await anyio.to_thread.run_sync(_checked_addresses, self.rules, request)
        pool = self._pools.get(origin) or self._pools.setdefault(origin, self._new_pool())
        for address in addresses[:-1]:
            try:
                return await pool.handle_async_request(_pinned(request, origin, address))
            except httpx.ConnectError:
                continue  # nothing was sent: the next address
        return await pool.handle_async_request(_pinned(request, origin, addresses[-1]))

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()
