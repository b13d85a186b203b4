"""Per-attempt webhook tokens: unguessable, unique per paid attempt, checkable by the receiver.

A paid attempt sends ``webhook_url=<receiver URL>/<token>``. A token is 32 random hex digits
followed by 32 hex digits of an HMAC-SHA256 over them keyed with the token key derived from
the webhook secret (:class:`~prefect_journey.signing.WebhookKeys`), so the receiver can tell
a token a run minted from one it did not without sharing any state with the runs, and
nobody without the secret can make one up.

The token itself goes only into the request. Everything else (the receiver's Prefect event,
the attempt record a resumed run reads, log lines) names the attempt by its digest,
:func:`attempt_id`: whoever reads those cannot post deliveries under the token.

This module does not import Prefect.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

# 32 hex digits of nonce, 32 of MAC: 128 bits each.
NONCE_HEX = 32
TOKEN_PATTERN = re.compile(rf"[0-9a-f]{{{2 * NONCE_HEX}}}")
# Deliveries of the package's own attempts are Prefect events named ``journey.attempt.<status>``
# about the resource ``journey.attempt.<attempt id>``: apart from ``journey.task.*``, which
# deployment triggers react to for requests sent with a user's own webhook.
ATTEMPT_EVENT_PREFIX = "journey.attempt."
# The label of that resource naming the provider's task.
TASK_ID_LABEL = "journey.task_id"


def _mac(nonce: str, key: bytes) -> str:
    return hmac.new(key, nonce.encode(), hashlib.sha256).hexdigest()[:NONCE_HEX]


def mint_token(key: bytes) -> str:
    """A new token for one paid attempt.

    Args:
        key: The token key (:attr:`~prefect_journey.signing.WebhookKeys.token_key`).

    Returns:
        64 lower-case hex digits: a random nonce and its MAC.
    """
    nonce = secrets.token_hex(NONCE_HEX // 2)
    return nonce + _mac(nonce, key)


def is_valid_token(token: str, key: bytes) -> bool:
    """Whether ``token`` has the token's shape and was minted with ``key``.

    Args:
        token: The last segment of a delivery's path.
        key: The token key.

    Returns:
        True for a well-formed token whose MAC matches (compared in constant time).
    """
    if not TOKEN_PATTERN.fullmatch(token):
        return False
    nonce, mac = token[:NONCE_HEX], token[NONCE_HEX:]
    return hmac.compare_digest(mac, _mac(nonce, key))


def attempt_id(token: str) -> str:
    """The name of a token's attempt everywhere but the request: a digest of the token.

    Args:
        token: A token from :func:`mint_token`.

    Returns:
        32 hex digits.
    """
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def attempt_resource(attempt: str) -> str:
    """The Prefect resource id of an attempt's deliveries.

    Args:
        attempt: The attempt's id (:func:`attempt_id`).

    Returns:
        ``journey.attempt.<attempt>``.
    """
    return f"{ATTEMPT_EVENT_PREFIX}{attempt}"


def delivery_url(receiver_url: str, token: str) -> str:
    """The ``webhook_url`` of one attempt: the receiver's URL with the token as last segment.

    Args:
        receiver_url: The receiver's public URL (its deliveries path).
        token: A token from :func:`mint_token`.

    Returns:
        ``<receiver_url>/<token>``.
    """
    return f"{receiver_url.rstrip('/')}/{token}"
