"""What every benchmark shares: an emulator in its own process, medians, ratios."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

RUNS = 3  # every figure is the median of at least this many runs
ROOT = Path(__file__).resolve().parent.parent


def measured_since(started: datetime) -> str:
    """When a measurement ran, from ``started`` to now: ``2026-12-05 14:59-15:21 UTC``."""
    return f"{started:%Y-%m-%d %H:%M}-{datetime.now(UTC):%H:%M} UTC"


def commit() -> str:
    """The checkout's short commit, which every saved measurement names."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call_in_subprocess(function: str, *args: Any, env: dict[str, str] | None = None) -> Any:
    """``module:function(*args)`` in a fresh Python process, with ``env`` added to this
    one's environment; arguments and result cross as JSON."""
    module, name = function.split(":")
    code = (
        f"import json, sys; from {module} import {name}; "
        f"print(json.dumps({name}(*json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def emulator_process(*args: str) -> Iterator[str]:
    """``prefect-journey emulator`` in a separate process (so its work is not ours);
    yields its URL once it answers."""
    port = free_port()
    command = ["-m", "prefect_journey.cli", "emulator", "--port", str(port)]
    with serving([*command, "--credits", str(10**8), *args], port) as url:
        yield url


@contextlib.contextmanager
def serving(python_args: list[str], port: int) -> Iterator[str]:
    """``python *python_args`` in a separate process, serving on ``port``; yields its URL
    once it answers ``/_emulator/ledger``."""
    process = subprocess.Popen(
        [sys.executable, *python_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JOURNEY_API_KEY": "bench-key"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_up(url: str, timeout: float = 60) -> float:
    """Seconds until ``url`` answers its ledger."""
    started = time.monotonic()
    while True:
        try:
            httpx.get(f"{url}/_emulator/ledger", timeout=1)
            return time.monotonic() - started
        except httpx.HTTPError:
            if time.monotonic() - started > timeout:
                raise
            time.sleep(0.01)


@dataclass
class Figure:
    """One measured quantity against its baseline, both medians of ``RUNS`` runs."""

    name: str
    value: float
    baseline: float
    unit: str
    baseline_name: str
    target: str = ""
    # Prefect's own floor of the same shape (the same task runs, artifacts and events, no
    # work), against the same baseline: how much of the ratio is Prefect's.
    floor: float | None = None

    @property
    def ratio(self) -> float:
        return self.value / self.baseline

    @property
    def status(self) -> str:
        """``met`` or ``missed`` against a target of ``<= x`` or ``>= x``; empty without one."""
        if not self.target:
            return ""
        comparison, bound = self.target.split()
        return verdict(
            self.ratio <= float(bound) if comparison == "<=" else self.ratio >= float(bound)
        )

    def row(self) -> str:
        target = f"{self.target}: {self.status}" if self.target else ""
        return (
            f"| {self.name} | {self.value:.3f} {self.unit} | {self.baseline_name}: "
            f"{self.baseline:.3f} {self.unit} | **{self.ratio:.3f}** | {target} |"
        )


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def median(values: list[float]) -> float:
    return float(statistics.median(values))
