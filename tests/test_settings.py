"""Every ``JOURNEY_*`` variable is read in one module, and a bad value is a typed error."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from prefect_journey import settings
from prefect_journey.errors import ConfigurationError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prefect_journey"


def test_no_other_module_reads_the_environment() -> None:
    readers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            code = node.value if isinstance(node, ast.Constant) else None
            if isinstance(code, str) and re.fullmatch(r"JOURNEY_[A-Z_]+", code):
                readers.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {code}")
    assert readers == []


def test_every_variable_is_listed_once_and_documented() -> None:
    names = [variable.name for variable in settings.VARIABLES]
    assert len(names) == len(set(names)) and all(n.startswith("JOURNEY_") for n in names)
    page = (ROOT / "docs" / "configuration.md").read_text()
    for variable in settings.VARIABLES:
        assert f"`{variable.name}`" in page, variable.name


def test_values_are_read_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in settings.VARIABLES:
        monkeypatch.delenv(variable.name, raising=False)
    assert settings.base_url() == "https://api.journeyapi.com"
    assert settings.destination() == "./outputs"
    assert settings.budget_dir(Path("/home")) == Path("/home/journey/budgets")
    assert settings.lock_lease_seconds() == 60
    assert settings.read_timeout() is None
    assert settings.api_key() is None and settings.webhook_secret() == ""
    assert settings.block_logo_url() == settings.DEFAULT_BLOCK_LOGO_URL
    monkeypatch.setenv("JOURNEY_BUDGET_DIR", "/var/budgets")
    monkeypatch.setenv("JOURNEY_READ_TIMEOUT", "240")
    monkeypatch.setenv("JOURNEY_BLOCK_LOGO_URL", "http://receiver.internal:8780/logo.png")
    assert settings.block_logo_url() == "http://receiver.internal:8780/logo.png"
    assert settings.budget_dir(Path("/home")) == Path("/var/budgets")
    assert settings.read_timeout() == 240


@pytest.mark.parametrize(
    ("name", "value", "reader"),
    [
        ("JOURNEY_READ_TIMEOUT", "soon", settings.read_timeout),
        ("JOURNEY_READ_TIMEOUT", "-5", settings.read_timeout),
        ("JOURNEY_LOCK_LEASE_SECONDS", "0.5", settings.lock_lease_seconds),
        ("JOURNEY_LOCK_LEASE_SECONDS", "inf", settings.lock_lease_seconds),
        ("JOURNEY_BLOCK_LOGO_URL", "assets/logo.png", settings.block_logo_url),
        ("JOURNEY_BLOCK_LOGO_URL", "data:image/png;base64,iVBORw0KGgo=", settings.block_logo_url),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, reader: object
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        reader()  # type: ignore[operator]
    assert name.removeprefix("JOURNEY_").lower() in str(caught.value).lower()
