"""Request and response models for the JourneyAPI ``nano-banana-2`` endpoints.

Every rule the API states (and every rule we chose where it is silent) is checked here,
when the request is built, so bad input fails before any HTTP request and any credit.
The emulator imports these same models so that both sides enforce one set of rules.
"""

from __future__ import annotations

import ipaddress
import re
import textwrap
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
    """Return the (width, height) the API produces; an unset resolution means 1K."""
    return OUTPUT_SIZES[(aspect_ratio, resolution or "1K")]


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback IP literals (where plain http is acceptable)."""
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

    With ``https_only_remote``, plain http is accepted only for loopback hosts.
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
    """``text`` as one printable line of at most ``width`` characters, for log lines, run
    names, artifact titles and tables: runs of whitespace become one space, any other
    character that does not print (DEL, C1 controls, bidi overrides) its escape, and a text
    too long loses its last words to ``...``."""
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

    Construct with keyword arguments; invalid input raises
    :class:`~prefect_journey.errors.JourneyValidationError` listing every problem.
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
        """The JSON body sent on the wire (reveals the webhook secret: send, never log)."""
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


def encode_references(image_urls: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Wire encoding of reference images, kept in this one function.

    The model page documents a single ``image_url`` string and promises up to 14 references
    without saying how several are sent. We send:

    - no references: no ``image_url`` key (pure text-to-image);
    - one reference: ``"image_url": "<url>"``, exactly as documented;
    - several: ``"image_url": ["<url>", ...]``, a JSON array in the same field, which is how
      the provider's sibling endpoints accept lists. If the provider documents another form,
      only this function (and :func:`decode_references`) changes.
    """
    if not image_urls:
        return {}
    if len(image_urls) == 1:
        return {"image_url": image_urls[0]}
    return {"image_url": list(image_urls)}


def decode_references(payload: dict[str, Any]) -> tuple[str, ...]:
    """Inverse of :func:`encode_references` (used by the emulator)."""
    value = payload.get("image_url")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError("image_url must be a string or a list of strings")


def request_from_payload(payload: dict[str, Any]) -> ImagineRequest:
    """Build a request from a wire body, applying the same rules as the client."""
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
    """The finished task from ``/imagine`` plus what the call cost us."""

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


class TaskStatus(BaseModel):
    """A task as ``/fetch`` (and webhook deliveries) report it."""

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
    """``GET /api/v1/account``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    email: str
    credits: int
    total_images: int = 0
    plan: str | None = None
