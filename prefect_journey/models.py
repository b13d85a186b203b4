"""Request and response models for the JourneyAPI ``nano-banana-2`` endpoints.

Every rule the API states (and every rule we chose where it is silent) is checked here,
when the request is built, so bad input fails before any HTTP request and any credit.
The emulator imports these same models so that both sides enforce one set of rules.
"""

from __future__ import annotations

import ipaddress
import re
import textwrap
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from prefect_journey.errors import JourneyValidationError

DEFAULT_MODEL = "nano-banana-2"
# The provider-wide default model is ``midjourney``: the request must always name this one.
SUPPORTED_MODELS = (DEFAULT_MODEL,)

AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"]
Resolution = Literal["1K", "2K", "4K"]
TaskState = Literal["staged", "pending", "starting", "processing", "finished", "failed"]
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
RESOLUTIONS: tuple[str, ...] = get_args(Resolution)

# The model page: "up to 14 reference images" (10 object + 4 character).
MAX_REFERENCES = 14
# The contract sets no prompt limit; Gemini's input budget is far larger, but a prompt past
# this size is almost always a bug (a file pasted by mistake) and would be billed anyway.
MAX_PROMPT_CHARS = 10_000
# Browsers and most servers refuse URLs past ~8 KB; a presigned S3 URL is ~1.5 KB.
MAX_URL_CHARS = 8_192
# Each successful imagine call costs 4 credits (the model page header).
CREDITS_PER_IMAGE = 4

# Google's output size table for Nano Banana 2, (width, height) per ratio and resolution.
OUTPUT_SIZES: dict[tuple[str, str], tuple[int, int]] = {
    ("1:1", "1K"): (1024, 1024),
    ("1:1", "2K"): (2048, 2048),
    ("1:1", "4K"): (4096, 4096),
    ("16:9", "1K"): (1376, 768),
    ("16:9", "2K"): (2752, 1536),
    ("16:9", "4K"): (5504, 3072),
    ("9:16", "1K"): (768, 1376),
    ("9:16", "2K"): (1536, 2752),
    ("9:16", "4K"): (3072, 5504),
    ("4:3", "1K"): (1200, 896),
    ("4:3", "2K"): (2400, 1792),
    ("4:3", "4K"): (4800, 3584),
    ("3:4", "1K"): (896, 1200),
    ("3:4", "2K"): (1792, 2400),
    ("3:4", "4K"): (3584, 4800),
    ("3:2", "1K"): (1264, 848),
    ("3:2", "2K"): (2528, 1696),
    ("3:2", "4K"): (5056, 3392),
    ("2:3", "1K"): (848, 1264),
    ("2:3", "2K"): (1696, 2528),
    ("2:3", "4K"): (3392, 5056),
}


def output_size(aspect_ratio: str, resolution: str | None) -> tuple[int, int]:
    """Return the (width, height) the API produces for an aspect ratio and a resolution.

    The sizes are Google's output table for Nano Banana 2 (:data:`OUTPUT_SIZES`).

    Args:
        aspect_ratio: One of :data:`ASPECT_RATIOS`, such as ``"16:9"``.
        resolution: ``"1K"``, ``"2K"`` or ``"4K"``; None means 1K, as an unset resolution
            does on the API.

    Returns:
        The image's width and height in pixels.

    Example:
        ```python
        from prefect_journey.models import output_size

        assert output_size("16:9", "2K") == (2752, 1536)
        assert output_size("1:1", None) == (1024, 1024)
        ```
    """
    return OUTPUT_SIZES[(aspect_ratio, resolution or "1K")]


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback IP literals (where plain http is acceptable).

    Args:
        host: A URL's host name, an IP literal (IPv6 with or without brackets), or None.

    Returns:
        Whether ``host`` is ``localhost`` (any case) or a loopback address; False for None
        and for any other name.
    """
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_http_url(url: str, *, what: str, https_only_remote: bool = False) -> str:
    """Validate an absolute http(s) URL with a host; return it unchanged.

    Refused: an empty URL, any whitespace, more than :data:`MAX_URL_CHARS` characters, a
    scheme other than http(s), no host, and credentials embedded as ``user:password@host``.

    Args:
        url: The URL to check.
        what: What the URL is (``"base_url"``, ``"webhook_url"``), to name it in the error.
        https_only_remote: Accept plain http only for loopback hosts; used where a secret
            travels with the request. False accepts http anywhere.

    Returns:
        ``url``, unchanged.

    Raises:
        ValueError: The URL breaks one of the rules (callers turn it into
            :class:`~prefect_journey.errors.JourneyValidationError`,
            :class:`~prefect_journey.errors.ConfigurationError` or
            :class:`~prefect_journey.errors.DownloadError`).
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{what} must be a non-empty URL")
    if url != url.strip() or any(c.isspace() for c in url):
        raise ValueError(f"{what} must not contain whitespace")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"{what} is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise ValueError(f"{what} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = scheme or "no scheme"
        raise ValueError(f"{what} must use http or https, not {shown!r}")
    if not host:
        raise ValueError(f"{what} has no host")
    if parts.username or parts.password:
        raise ValueError(f"{what} must not embed credentials (user:password@host)")
    if https_only_remote and scheme == "http" and not is_loopback_host(host):
        raise ValueError(f"{what} must use https (plain http is accepted only on loopback)")
    return url


# NUL and the C0 controls other than tab and newline: a prompt made of them is blank in all
# but name, and they would reach log lines, run names and artifact titles as terminal escapes.
_FORBIDDEN_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f]")


def _no_control_characters(value: str) -> str:
    found = _FORBIDDEN_CONTROLS.search(value)
    if found:
        raise ValueError(
            f"must not contain control characters (found {found.group()!r} at position "
            f"{found.start()}); only tab and newline are allowed"
        )
    return value


Prompt = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS),
    AfterValidator(_no_control_characters),
]


def display_text(text: str, width: int = 80) -> str:
    """``text`` as one printable line of at most ``width`` characters.

    For log lines, run names, artifact titles and tables: runs of whitespace become one
    space, any other character that does not print (DEL, C1 controls, bidi overrides) its
    escape, and a text too long loses its last words to ``...``.

    Args:
        text: Text from a user, such as a prompt or a campaign name.
        width: The most characters to return; 80 by default.

    Returns:
        The printable line; a first word longer than ``width`` is cut and ends in ``...``.

    Example:
        ```python
        from prefect_journey.models import display_text

        assert display_text("a  lighthouse   at dusk") == "a lighthouse at dusk"
        assert display_text("a lighthouse at dusk", width=15) == "a lighthouse..."
        ```
    """
    shown = "".join(
        char if char.isprintable() or char.isspace() else ascii(char)[1:-1] for char in text
    )
    short = textwrap.shorten(shown, width=width, placeholder="...")
    if short == "..." and shown.strip():  # one word longer than the width
        short = shown.strip()[: max(width - 3, 0)] + "..."
    return short


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImagineRequest(_Model):
    """One ``POST /api/v1/imagine`` call for ``nano-banana-2``.

    Construct with keyword arguments. Every rule is checked here, so bad input fails before
    any HTTP request and any credit; the emulator applies the same rules. The request is
    immutable and refuses unknown fields.

    Attributes:
        prompt: What the image should show: 1 to :data:`MAX_PROMPT_CHARS` characters once
            surrounding whitespace is stripped, with no control characters other than tab
            and newline (they would reach log lines, run names and artifact titles as
            terminal escapes).
        model: The model, always sent explicitly because the provider-wide default is
            another one; only ``"nano-banana-2"`` (the default) is accepted.
        image_urls: 0 to :data:`MAX_REFERENCES` (14) reference image URLs, http(s), none
            repeated; empty by default (text-to-image). A single string is taken as one URL.
        aspect_ratio: One of ``"1:1"`` (the default), ``"16:9"``, ``"9:16"``, ``"4:3"``,
            ``"3:4"``, ``"3:2"``, ``"2:3"``.
        resolution: ``"1K"``, ``"2K"`` or ``"4K"``; None (the default) leaves it out of the
            request, and the API makes 1K.
        webhook_url: Where the provider POSTs the finished task; https unless the host is
            loopback. None (the default) asks for no webhook.
        webhook_secret: Sent by the provider in the webhook's ``x-webhook-secret`` header;
            must not be blank and needs ``webhook_url``. A ``SecretStr``, so that it never
            shows in a repr or a log; None by default.

    Raises:
        JourneyValidationError: The input breaks a rule; the message lists every problem
            (field and reason, never the value).

    Example:
        ```python
        from prefect_journey import ImagineRequest

        request = ImagineRequest(
            prompt="a lighthouse at dusk", aspect_ratio="16:9", resolution="2K"
        )
        assert request.output_size == (2752, 1536)
        ```
    """

    prompt: Prompt = Field(description="What the image should show.")
    model: str = Field(default=DEFAULT_MODEL, description="Always sent explicitly.")
    image_urls: tuple[str, ...] = Field(
        default=(), description=f"0 to {MAX_REFERENCES} http(s) reference image URLs."
    )
    aspect_ratio: AspectRatio = "1:1"
    resolution: Resolution | None = None
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise JourneyValidationError.from_pydantic(exc, "ImagineRequest") from None

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in SUPPORTED_MODELS:
            raise ValueError(f"model must be one of {list(SUPPORTED_MODELS)}, not {value!r}")
        return value

    @field_validator("image_urls", mode="before")
    @classmethod
    def _coerce_references(cls, value: Any) -> Any:
        # A single string is a common slip; iterating it would make one URL per character.
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("image_urls")
    @classmethod
    def _check_references(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_REFERENCES:
            raise ValueError(
                f"at most {MAX_REFERENCES} reference images are allowed, got {len(value)}"
            )
        for index, url in enumerate(value):
            check_http_url(url, what=f"reference image {index}")
        if len(set(value)) != len(value):
            raise ValueError("reference images must not repeat")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_http_url(value, what="webhook_url", https_only_remote=True)

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("webhook_secret must not be blank")
        return value

    @model_validator(mode="after")
    def _secret_needs_url(self) -> ImagineRequest:
        if self.webhook_secret is not None and self.webhook_url is None:
            raise ValueError("webhook_secret is only meaningful with webhook_url")
        return self

    @property
    def output_size(self) -> tuple[int, int]:
        """The (width, height) the API will return for this request."""
        return output_size(self.aspect_ratio, self.resolution)

    def to_payload(self) -> dict[str, Any]:
        """The JSON body sent on the wire (reveals the webhook secret: send, never log).

        Returns:
            ``model``, ``prompt`` and ``aspect_ratio``; the references as
            :func:`encode_references` writes them; and ``resolution``, ``webhook_url`` and
            ``webhook_secret`` when set.
        """
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt,
            "aspect_ratio": self.aspect_ratio,
        }
        payload.update(encode_references(self.image_urls))
        if self.resolution is not None:
            payload["resolution"] = self.resolution
        if self.webhook_url is not None:
            payload["webhook_url"] = self.webhook_url
        if self.webhook_secret is not None:
            payload["webhook_secret"] = self.webhook_secret.get_secret_value()
        return payload


def as_request(request: ImagineRequest | Mapping[str, Any]) -> ImagineRequest:
    """Accept a request or its fields (as a deployment parameter would pass them).

    Args:
        request: An :class:`ImagineRequest` or its fields.

    Returns:
        The checked request.

    Raises:
        JourneyValidationError: Neither, or fields that break a rule.
    """
    if isinstance(request, ImagineRequest):
        return request
    if isinstance(request, Mapping):
        return ImagineRequest(**request)
    raise JourneyValidationError(
        f"request must be an ImagineRequest or a mapping, not {type(request).__name__}"
    )


def encode_references(image_urls: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Wire encoding of reference images, kept in this one function.

    The model page documents a single ``image_url`` string and promises up to 14 references
    without saying how several are sent. We send:

    - no references: no ``image_url`` key (pure text-to-image);
    - one reference: ``"image_url": "<url>"``, exactly as documented;
    - several: ``"image_url": ["<url>", ...]``, a JSON array in the same field, which is how
      the provider's sibling endpoints accept lists. If the provider documents another form,
      only this function (and :func:`decode_references`) changes.

    Args:
        image_urls: The reference image URLs, in order.

    Returns:
        The body's fields for the references: empty, or ``{"image_url": ...}``.
    """
    if not image_urls:
        return {}
    if len(image_urls) == 1:
        return {"image_url": image_urls[0]}
    return {"image_url": list(image_urls)}


def decode_references(payload: dict[str, Any]) -> tuple[str, ...]:
    """Inverse of :func:`encode_references` (used by the emulator).

    Args:
        payload: A request body as received.

    Returns:
        The reference URLs; empty when ``image_url`` is absent or null.

    Raises:
        ValueError: ``image_url`` is neither a string nor a list of strings.
    """
    value = payload.get("image_url")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError("image_url must be a string or a list of strings")


def request_from_payload(payload: dict[str, Any]) -> ImagineRequest:
    """Build a request from a wire body, applying the same rules as the client.

    Args:
        payload: A ``POST /api/v1/imagine`` body as received; a missing ``model`` means
            :data:`DEFAULT_MODEL`.

    Returns:
        The validated request.

    Raises:
        JourneyValidationError: The body breaks a rule or has an unknown field.
    """
    data = dict(payload)
    if "image_url" in data:
        try:
            data["image_urls"] = decode_references(data)
        except ValueError as exc:
            raise JourneyValidationError(str(exc)) from None
        del data["image_url"]
    data.setdefault("model", DEFAULT_MODEL)
    return ImagineRequest(**data)


class ImagineResult(_Model):
    """The finished task from ``/imagine`` plus what the call cost us.

    Attributes:
        task_id: The provider's id of the task.
        status: The task's state: ``"finished"`` for a result the client returns.
        image_url: The generated image on the provider's CDN (the provider keeps it for 14
            days).
        elapsed_seconds: Wall time of the call, retries included.
        credits_charged: Credits this call cost: :data:`CREDITS_PER_IMAGE` for a
            generation, 0 for a result built from a task this run did not pay for.
        attempts: Attempts made, including retries; 1 by default.
        possibly_billed_attempts: Earlier attempts whose outcome was unknown and which may
            have been billed; 0 by default.
        recovered: The image came from the webhook delivery of an attempt whose answer was
            lost, not from an HTTP answer (see :mod:`prefect_journey.recovery`); False by
            default.
    """

    task_id: str
    status: TaskState
    image_url: str
    elapsed_seconds: float = Field(description="Wall time of the call, retries included.")
    credits_charged: int = Field(description="Credits this call cost (0 if it failed).")
    attempts: int = Field(default=1, description="HTTP attempts made, including retries.")
    possibly_billed_attempts: int = Field(
        default=0,
        description="Earlier attempts whose outcome was unknown and which may have been billed.",
    )
    recovered: bool = Field(
        default=False,
        description="Recovered from the webhook delivery of an attempt whose answer was lost.",
    )

    def __setstate__(self, state: dict[Any, Any]) -> None:
        # Cache records pickle results; a record written before a field existed lacks it.
        for name, info in type(self).model_fields.items():
            if not info.is_required():
                state["__dict__"].setdefault(name, info.get_default(call_default_factory=True))
        super().__setstate__(state)


class TaskStatus(BaseModel):
    """A task as ``/fetch`` (and webhook deliveries) report it; unknown fields are ignored.

    Attributes:
        task_id: The provider's id of the task.
        status: ``"staged"``, ``"pending"``, ``"starting"``, ``"processing"``,
            ``"finished"`` or ``"failed"``.
        percentage: Progress from 0 to 100 (the API sends it as a string); None if absent
            or blank.
        image_url: The image's URL once the task has finished, else None.
        error: Why the task failed, if it did and the API said; else None.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    task_id: str
    status: TaskState
    percentage: int | None = None
    image_url: str | None = None
    error: str | None = None

    @field_validator("percentage", mode="before")
    @classmethod
    def _percentage_from_string(cls, value: Any) -> Any:
        # The API sends "0".."100" as a string.
        if isinstance(value, str):
            return int(value) if value.strip() else None
        return value


class Account(BaseModel):
    """The account as ``GET /api/v1/account`` reports it; unknown fields are ignored.

    Attributes:
        email: The account's e-mail address.
        credits: The credit balance.
        total_images: Images the account has generated; 0 when not reported.
        plan: The account's plan, if reported.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    email: str
    credits: int
    total_images: int = 0
    plan: str | None = None
