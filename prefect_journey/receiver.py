"""The ``JourneyWebhookReceiver`` Block and the configuration of recovery.

Where the provider delivers finished tasks, with which secret, and how long a
possibly-billed attempt waits for its delivery: a saved :class:`JourneyWebhookReceiver`, or
``JOURNEY_WEBHOOK_URL`` and ``JOURNEY_WEBHOOK_SECRET`` (:func:`load_receiver`). The timeouts
that depend on the configuration are sized here too (:func:`attempt_timeout`,
:func:`task_timeout`), so that ``JOURNEY_READ_TIMEOUT`` is read in one place on the way to
:mod:`prefect_journey.policy`, which does not read the environment. How an attempt uses the
receiver: :mod:`prefect_journey.recovery`.
"""

from __future__ import annotations

import time
from typing import cast

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, HttpUrl, SecretStr, field_validator

from prefect_journey import policy, settings
from prefect_journey._compat import call_sync
from prefect_journey.attempts import Attempt, AttemptRecord, check_records_storage
from prefect_journey.credentials import DOCUMENTATION_URL, LOGO_URL
from prefect_journey.errors import ConfigurationError
from prefect_journey.models import ImagineRequest, check_http_url
from prefect_journey.signing import WebhookKeys, check_secret
from prefect_journey.tokens import attempt_id, delivery_url, mint_token


class JourneyWebhookReceiver(Block):
    """Where the provider delivers finished tasks: the public URL of a
    ``prefect-journey webhooks`` receiver and the secret it expects.

    Given to a campaign (``webhook_block``) or to the ``imagine`` tasks (``webhook``), it turns
    on the recovery of possibly-billed generations (see :mod:`prefect_journey.recovery`).

    Example:
        Load a saved receiver and run a campaign that recovers lost answers:
        ```python
        from prefect_journey.flows import batch_campaign
        from prefect_journey.receiver import JourneyWebhookReceiver

        receiver = JourneyWebhookReceiver.load("BLOCK_NAME")
        print(receiver.url, receiver.recovery_window_seconds)
        batch_campaign(items=[{"prompt": "a lighthouse at dusk"}], webhook_block="BLOCK_NAME")
        ```
    """

    # A validation error never echoes what it was given: that could be a secret.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "JourneyAPI Webhook Receiver"
    # The card in the UI shows about two lines: one sentence, not the docstring.
    _description = "Where finished tasks are delivered, so a lost answer is not paid twice."
    _block_type_slug = "journeyapi-webhook-receiver"
    _logo_url = LOGO_URL
    _documentation_url = HttpUrl(DOCUMENTATION_URL)

    url: str = Field(
        default=...,
        title="Receiver URL",
        description=(
            "The receiver's public deliveries URL, such as "
            "https://hooks.example.com/webhooks/journey (plain http only on loopback)."
        ),
    )
    secret: SecretStr = Field(
        default=...,
        description=(
            "The receiver's JOURNEY_WEBHOOK_SECRET: 32 random bytes or more "
            "(make one with `prefect-journey new-secret`)."
        ),
    )
    recovery_window_seconds: float = Field(
        default=policy.RECOVERY_WINDOW,
        gt=0,
        title="Recovery window (seconds)",
        description="How long a possibly-billed attempt waits for its delivery before a retry.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_http_url(value, what="webhook_url", https_only_remote=True)

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        check_secret(value.get_secret_value())
        return value

    @property
    def signing_keys(self) -> WebhookKeys:
        """The keys derived from the secret (:mod:`prefect_journey.signing`)."""
        return WebhookKeys.from_secret(self.secret)

    def new_attempt(self, request: ImagineRequest) -> Attempt:
        """A new attempt at ``request``: a fresh token, stamped now, with its deadline.

        Args:
            request: The request it sends (sizes its deadline).

        Returns:
            The attempt, to record and then send with :meth:`Attempt.request`.
        """
        keys = self.signing_keys
        token = mint_token(keys.token_key)
        sent_at = time.time()
        deadline = policy.delivery_deadline(
            sent_at, attempt_timeout(request), self.recovery_window_seconds
        )
        return Attempt(
            record=AttemptRecord(
                id=attempt_id(token),
                sent_at=sent_at,
                deadline=deadline,
                expires_at=policy.attempt_record_expiry(deadline),
            ),
            webhook_url=delivery_url(self.url, token),
            webhook_secret=keys.provider_secret,
        )


def attempt_timeout(request: ImagineRequest, read_timeout: float | None = None) -> float:
    """One paid attempt's deadline (:func:`~prefect_journey.policy.attempt_timeout`) with
    the read timeout its client uses: ``read_timeout``, else ``JOURNEY_READ_TIMEOUT``, else
    the formula. Every deadline of the Prefect layer is sized through this function, so none
    cuts a call off before the read timeout the user set.

    Args:
        request: The request the attempt sends.
        read_timeout: The client's read timeout when it was given one; None reads
            ``JOURNEY_READ_TIMEOUT``.

    Returns:
        The deadline in seconds.

    Raises:
        ConfigurationError: ``JOURNEY_READ_TIMEOUT`` is malformed.

    Example:
        ```python
        from prefect_journey.models import ImagineRequest
        from prefect_journey.receiver import attempt_timeout

        # 10 s to connect + 90 s to generate a bare 1K image + 15 s of margin
        assert attempt_timeout(ImagineRequest(prompt="a lighthouse"), read_timeout=90) == 115
        ```
    """
    if read_timeout is None:
        read_timeout = settings.read_timeout()
    return policy.attempt_timeout(request, read_timeout)


def receiver_for(
    request: ImagineRequest, receiver: JourneyWebhookReceiver | None
) -> JourneyWebhookReceiver | None:
    """The receiver that recovers ``request``'s attempts: none for a request that carries
    its own webhook (the provider delivers to one URL, and that one is the caller's).

    Args:
        request: The request to send.
        receiver: The configured receiver, if any.

    Returns:
        ``receiver``, or None.
    """
    return None if request.webhook_url is not None else receiver


def task_timeout(request: ImagineRequest, receiver: JourneyWebhookReceiver | None) -> float:
    """The timeout of an ``imagine`` task run for ``request``: its attempt's deadline
    (:func:`attempt_timeout`, ``JOURNEY_READ_TIMEOUT`` included), and
    when ``receiver`` recovers its attempts the waits for deliveries too
    (:func:`~prefect_journey.policy.recovering_timeout`).

    Args:
        request: The request.
        receiver: The configured receiver, if any (none recovers a request that carries its
            own webhook, see :func:`receiver_for`).

    Returns:
        Seconds.

    Raises:
        ConfigurationError: ``JOURNEY_READ_TIMEOUT`` is malformed.
    """
    attempt = attempt_timeout(request)
    receiver = receiver_for(request, receiver)
    if receiver is None:
        return attempt
    return policy.recovering_timeout(attempt, receiver.recovery_window_seconds)


def load_receiver(block_name: str | None = None) -> JourneyWebhookReceiver | None:
    """The receiver to use: the named block, else ``JOURNEY_WEBHOOK_URL`` and
    ``JOURNEY_WEBHOOK_SECRET``, else None (no recovery).

    Args:
        block_name: A saved :class:`JourneyWebhookReceiver`; None reads the environment.

    Returns:
        The receiver, or None when none is configured.

    Raises:
        ConfigurationError: The URL is set without the secret, or is malformed, the secret
            is too weak, or the result storage cannot keep attempt records
            (:mod:`prefect_journey.attempts`).
    """
    if block_name:
        loaded = cast(JourneyWebhookReceiver, call_sync(JourneyWebhookReceiver.load, block_name))
        check_records_storage()
        return loaded
    url, secret = settings.webhook_url(), settings.webhook_secret()
    if not url:  # the secret alone configures a receiver process, not recovery
        return None
    if not secret:
        raise ConfigurationError(
            f"{settings.WEBHOOK_URL.name} is set without {settings.WEBHOOK_SECRET.name}: "
            "recovery needs both"
        )
    try:
        receiver = JourneyWebhookReceiver(
            url=url,
            secret=SecretStr(secret),
            recovery_window_seconds=settings.recovery_window(),
        )
    except ValueError as exc:  # the URL's or the secret's rule: the message says which
        raise ConfigurationError(
            f"{settings.WEBHOOK_URL.name} / {settings.WEBHOOK_SECRET.name}: {exc}"
        ) from None
    check_records_storage()
    return receiver


def webhook_keys(block_name: str | None = None) -> WebhookKeys:
    """The keys of the receiver's secret: the named block's, else ``JOURNEY_WEBHOOK_SECRET``'s.

    Args:
        block_name: A saved :class:`JourneyWebhookReceiver`; None reads the environment.

    Returns:
        The keys.

    Raises:
        ConfigurationError: No secret is configured, or it is too weak.
    """
    if block_name:
        return cast(
            JourneyWebhookReceiver, call_sync(JourneyWebhookReceiver.load, block_name)
        ).signing_keys
    secret = settings.webhook_secret()
    if not secret:
        raise ConfigurationError(
            f"checking the receiver's signature needs its secret: set "
            f"{settings.WEBHOOK_SECRET.name} or name a JourneyWebhookReceiver block"
        )
    try:
        return WebhookKeys.from_secret(secret)
    except ValueError as exc:
        raise ConfigurationError(f"{settings.WEBHOOK_SECRET.name}: {exc}") from None
