"""The process's one TLS context, shared by the API clients and the download clients.

This module does not import Prefect.
"""

from __future__ import annotations

import functools
import ssl

import certifi


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context for every client of the process, built on first use.

    Building one (loading the CA bundle) costs tens of milliseconds of CPU, more than the
    rest of a task run's share of this package.

    Returns:
        The process's TLS context, verifying against certifi's CA bundle.
    """
    return ssl.create_default_context(cafile=certifi.where())
