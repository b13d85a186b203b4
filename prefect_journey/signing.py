"""The webhook secret and the keys derived from it: one configured secret, one job per key.

A user configures one secret (``JOURNEY_WEBHOOK_SECRET`` or a receiver block) on the
receiver and on the runs. It is never used as it is. Three keys are derived from it with
HMAC-SHA256 under distinct labels, so that knowing one tells nothing of the others:

- the **provider secret**, sent with every request as ``webhook_secret`` and echoed back by
  the provider in ``x-webhook-secret``: whoever sees requests or deliveries (the provider, a
  proxy's log) learns this one only, and can neither mint attempt tokens nor sign events;
- the **token key**, the MAC key of the per-attempt tokens (:mod:`prefect_journey.tokens`);
- the **event key**, the MAC key of what the receiver emits (:meth:`WebhookKeys.sign`): a
  run, or the webhook-triggered store, believes a ``journey.*`` event only when its
  signature checks, so writing events to the Prefect API is not enough to forge one.

A secret is refused unless it looks like at least :data:`MIN_SECRET_BITS` bits of
randomness (:func:`check_secret`); :func:`new_secret` (``prefect-journey new-secret``)
makes one.

This module does not import Prefect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import string
from dataclasses import dataclass, field

from pydantic import SecretStr

# 32 bytes: the strength of the HMAC-SHA256 keys derived from the secret.
MIN_SECRET_BITS = 256
# A secret with fewer distinct characters than this is a pattern, whatever its length.
MIN_DISTINCT_CHARACTERS = 8
GENERATOR_COMMAND = "prefect-journey new-secret"
# The payload field of a receiver's event that holds its signature of the delivery.
SIGNATURE_FIELD = "signature"
_LABEL = "prefect-journey/v1/"
_HEX = frozenset(string.hexdigits.lower())
_CLASSES = (
    (frozenset(string.digits), 10),
    (frozenset(string.ascii_lowercase), 26),
    (frozenset(string.ascii_uppercase), 26),
)
_OTHER_PRINTABLE = 33  # punctuation and space


class WeakSecretError(ValueError):
    """The webhook secret is blank, short or a pattern: it could be guessed."""


def new_secret() -> str:
    """A new webhook secret: 32 random bytes as 64 hex digits.

    Returns:
        The secret, to set as ``JOURNEY_WEBHOOK_SECRET`` on the receiver and the workers.

    Example:
        ```python
        from prefect_journey.signing import new_secret

        print(new_secret())
        ```
    """
    return secrets.token_hex(MIN_SECRET_BITS // 8)


def secret_bits(secret: str) -> float:
    """An upper estimate of the randomness in ``secret``: its length times the bits of the
    alphabet its characters come from (hex digits, or the classes of characters it uses).

    A chosen phrase can score high; a short or one-class secret cannot. It is an estimate,
    not a proof: :func:`new_secret` is the way to a secret that is truly random.

    Args:
        secret: The secret.

    Returns:
        Bits.
    """
    characters = set(secret)
    if not characters:
        return 0.0
    if characters <= _HEX or characters <= set(string.hexdigits.upper()):
        pool = 16
    else:
        pool = sum(size for members, size in _CLASSES if characters & members)
        pool += _OTHER_PRINTABLE if characters - set(string.ascii_letters + string.digits) else 0
    return len(secret) * math.log2(pool)


def _repeats(secret: str) -> bool:
    """Whether ``secret`` is a shorter string repeated."""
    return any(
        secret == (secret[:period] * (len(secret) // period + 1))[: len(secret)]
        for period in range(1, len(secret) // 2 + 1)
    )


def check_secret(secret: str) -> str:
    """``secret``, if it may be used as the webhook secret.

    Args:
        secret: The configured secret.

    Returns:
        The secret, unchanged.

    Raises:
        WeakSecretError: It is blank, estimates below :data:`MIN_SECRET_BITS` bits
            (:func:`secret_bits`), has fewer than :data:`MIN_DISTINCT_CHARACTERS`
            distinct characters, or repeats a shorter string. The message says how to
            make a good one and never contains the secret.
    """
    bits = secret_bits(secret)
    if (
        bits < MIN_SECRET_BITS
        or len(set(secret)) < MIN_DISTINCT_CHARACTERS
        or _repeats(secret)
        or secret != secret.strip()
    ):
        raise WeakSecretError(
            f"the webhook secret is too weak (about {bits:.0f} bits of an estimated "
            f"{MIN_SECRET_BITS} needed, or a pattern): make one with `{GENERATOR_COMMAND}` "
            "(64 random hex digits) and set it on the receiver and the workers"
        )
    return secret


def _derive(secret: str, purpose: str) -> bytes:
    return hmac.new(secret.encode(), (_LABEL + purpose).encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class WebhookKeys:
    """The keys derived from one webhook secret (see the module docstring).

    Build it with :meth:`from_secret`, which checks the secret. Nothing here prints a key.

    Example:
        Sign what a receiver emits and check it where a run reads it:
        ```python
        from prefect_journey.signing import WebhookKeys, new_secret

        keys = WebhookKeys.from_secret(new_secret())
        signature = keys.sign(
            attempt=None, task_id="t1", status="finished", image_url="https://cdn.example.com/t1.png"
        )
        assert keys.signed(
            signature,
            attempt=None,
            task_id="t1",
            status="finished",
            image_url="https://cdn.example.com/t1.png",
        )
        ```
    """

    provider_secret: SecretStr
    token_key: bytes = field(repr=False)
    event_key: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: str | SecretStr) -> WebhookKeys:
        """The keys of ``secret``, once it passed :func:`check_secret`.

        Args:
            secret: The configured webhook secret.

        Returns:
            The keys.

        Raises:
            WeakSecretError: The secret could be guessed.
        """
        plain = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        check_secret(plain)
        return cls(
            provider_secret=SecretStr(_derive(plain, "provider header").hex()),
            token_key=_derive(plain, "attempt token"),
            event_key=_derive(plain, "delivery event"),
        )

    def _mac(self, attempt: str | None, task_id: str, status: str, image_url: str | None) -> str:
        # A JSON list: no field can run into the next, whatever it contains.
        message = json.dumps([attempt or "", task_id, status, image_url or ""])
        return hmac.new(self.event_key, message.encode(), hashlib.sha256).hexdigest()

    def sign(self, *, attempt: str | None, task_id: str, status: str, image_url: str | None) -> str:
        """The signature of one delivery, as the receiver puts it in the event it emits.

        Args:
            attempt: The attempt id of a token delivery; None for one on the plain path.
            task_id: The delivered task's id.
            status: ``finished`` or ``failed``.
            image_url: The delivered image URL; None for a failed task.

        Returns:
            64 hex digits.
        """
        return self._mac(attempt, task_id, status, image_url)

    def signed(
        self,
        signature: object,
        *,
        attempt: str | None,
        task_id: str,
        status: str,
        image_url: str | None,
    ) -> bool:
        """Whether ``signature`` is this delivery's, compared in constant time.

        Args:
            signature: The signature read from an event (anything: events come from outside).
            attempt: The attempt the event is about; None for a ``journey.task.*`` event.
            task_id: The task the event names.
            status: The status it names.
            image_url: The image URL it names.

        Returns:
            True only for the receiver's signature of exactly these fields.
        """
        if not isinstance(signature, str):
            return False
        expected = self._mac(attempt, task_id, status, image_url)
        return hmac.compare_digest(signature.encode(), expected.encode())
