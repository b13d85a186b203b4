"""Request rules: every bad input is a typed error raised before any HTTP request."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from prefect_journey.client import JourneyClient
from prefect_journey.emulator import EmulatorServer
from prefect_journey.errors import JourneyValidationError
from prefect_journey.models import (
    MAX_REFERENCES,
    ImagineRequest,
    decode_references,
    encode_references,
    output_size,
    request_from_payload,
)

REF = "https://cdn.example.com/ref.png"


def refs(n: int) -> list[str]:
    return [f"https://cdn.example.com/ref-{i}.png" for i in range(n)]


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("blank prompt", {"prompt": ""}, "prompt"),
    ("whitespace prompt", {"prompt": "   \n\t"}, "prompt"),
    ("missing prompt", {}, "prompt"),
    ("prompt not a string", {"prompt": 42}, "prompt"),
    ("prompt too long", {"prompt": "x" * 10_001}, "prompt"),
    ("15 references", {"prompt": "p", "image_urls": refs(15)}, "at most 14"),
    ("ftp reference", {"prompt": "p", "image_urls": ["ftp://host/a.png"]}, "http or https"),
    ("file reference", {"prompt": "p", "image_urls": ["file:///etc/passwd"]}, "http or https"),
    ("s3 reference", {"prompt": "p", "image_urls": ["s3://bucket/key.png"]}, "http or https"),
    ("relative reference", {"prompt": "p", "image_urls": ["/images/a.png"]}, "http or https"),
    ("hostless reference", {"prompt": "p", "image_urls": ["https:///a.png"]}, "no host"),
    ("blank reference", {"prompt": "p", "image_urls": [""]}, "non-empty"),
    (
        "reference with space",
        {"prompt": "p", "image_urls": ["https://a.com/a b.png"]},
        "whitespace",
    ),
    (
        "reference with credentials",
        {"prompt": "p", "image_urls": ["https://u:p@a.com/x"]},
        "credentials",
    ),
    ("duplicate references", {"prompt": "p", "image_urls": [REF, REF]}, "repeat"),
    ("reference not a string", {"prompt": "p", "image_urls": [123]}, "image_urls"),
    ("ratio 5:4", {"prompt": "p", "aspect_ratio": "5:4"}, "aspect_ratio"),
    ("ratio 21:9", {"prompt": "p", "aspect_ratio": "21:9"}, "aspect_ratio"),
    ("ratio with spaces", {"prompt": "p", "aspect_ratio": "16 : 9"}, "aspect_ratio"),
    ("ratio as float", {"prompt": "p", "aspect_ratio": 1.0}, "aspect_ratio"),
    ("resolution 8K", {"prompt": "p", "resolution": "8K"}, "resolution"),
    ("resolution lowercase", {"prompt": "p", "resolution": "2k"}, "resolution"),
    ("resolution as pixels", {"prompt": "p", "resolution": "1024"}, "resolution"),
    ("other model", {"prompt": "p", "model": "midjourney"}, "model"),
    ("blank model", {"prompt": "p", "model": ""}, "model"),
    ("secret without url", {"prompt": "p", "webhook_secret": "s3cret"}, "webhook_url"),
    ("http webhook remote", {"prompt": "p", "webhook_url": "http://hooks.example.com/x"}, "https"),
    ("ftp webhook", {"prompt": "p", "webhook_url": "ftp://hooks.example.com/x"}, "http or https"),
    (
        "blank webhook secret",
        {"prompt": "p", "webhook_url": "https://h.example/x", "webhook_secret": " "},
        "blank",
    ),
    ("unknown field", {"prompt": "p", "seed": 3}, "seed"),
    ("negative prompt typo", {"prompt": "p", "negative_prompt": "x"}, "negative_prompt"),
]


@pytest.mark.parametrize(
    ("name", "fields", "expected"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_is_rejected_before_any_call(
    emulator: EmulatorServer, name: str, fields: dict[str, Any], expected: str
) -> None:
    with JourneyClient(emulator.api_key, base_url=emulator.url) as client:
        with pytest.raises(JourneyValidationError) as caught:
            client.imagine(**fields)
    assert expected in str(caught.value)
    assert not caught.value.retryable and not caught.value.possibly_billed
    assert emulator.ledger()["calls_total"] == 0


def test_at_least_25_bad_inputs_are_covered() -> None:
    assert len(BAD_REQUESTS) >= 25


def test_validation_error_lists_every_problem() -> None:
    with pytest.raises(JourneyValidationError) as caught:
        ImagineRequest(prompt="", aspect_ratio="5:4", resolution="8K")
    assert len(caught.value.problems) == 3


def test_validation_error_never_echoes_the_webhook_secret() -> None:
    secret = "whsec-do-not-print-me"
    with pytest.raises(JourneyValidationError) as caught:
        ImagineRequest(prompt="p", webhook_secret=secret)
    assert secret not in str(caught.value) and secret not in repr(caught.value)


def test_valid_request_defaults_and_payload() -> None:
    request = ImagineRequest(prompt="  a cat  ")
    assert request.prompt == "a cat"
    assert request.to_payload() == {
        "model": "nano-banana-2",
        "prompt": "a cat",
        "aspect_ratio": "1:1",
    }
    assert request.output_size == (1024, 1024)


def test_full_request_payload_reveals_secret_only_on_the_wire() -> None:
    request = ImagineRequest(
        prompt="p",
        image_urls=refs(MAX_REFERENCES),
        aspect_ratio="16:9",
        resolution="4K",
        webhook_url="http://127.0.0.1:9000/hook",
        webhook_secret=SecretStr("whsec"),
    )
    payload = request.to_payload()
    assert payload["image_url"] == refs(14)
    assert payload["resolution"] == "4K"
    assert payload["webhook_secret"] == "whsec"
    assert "whsec" not in repr(request) and "whsec" not in str(request)


def test_single_reference_is_sent_as_the_documented_string() -> None:
    assert encode_references([REF]) == {"image_url": REF}
    assert encode_references([]) == {}
    assert decode_references(encode_references(refs(3))) == tuple(refs(3))
    assert ImagineRequest(prompt="p", image_urls=REF).image_urls == (REF,)


def test_payload_round_trips_through_the_emulator_decoder() -> None:
    request = ImagineRequest(prompt="p", image_urls=refs(2), resolution="2K")
    assert request_from_payload(request.to_payload()) == request


def test_output_size_for_unset_resolution_is_1k() -> None:
    assert output_size("16:9", None) == (1376, 768)
    assert output_size("2:3", "4K") == (3392, 5056)
