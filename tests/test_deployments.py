"""deployments/prefect.yaml and deployments/serve.py against a real `prefect server`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` in a subprocess with its own home and database; yields the
    environment that points a CLI or a client at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (
            home / "server.log"
        ).read_text()
        time.sleep(0.5)
    yield {**env, "PREFECT_API_URL": api}
    server.terminate()
    server.wait(timeout=30)
    log.close()


def prefect_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [*PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def read_deployments(env: dict[str, str]) -> dict[str, Any]:
    """name -> {"crons": [(cron, tz)], "pool": ..., "scheduled": [datetimes]} via the REST API."""
    api = env["PREFECT_API_URL"]
    found = {}
    for deployment in httpx.post(f"{api}/deployments/filter", json={}).json():
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={
                "deployments": {"id": {"any_": [deployment["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            },
        ).json()
        found[deployment["name"]] = {
            "crons": sorted(
                (s["schedule"]["cron"], s["schedule"]["timezone"]) for s in deployment["schedules"]
            ),
            "pool": deployment["work_pool_name"],
            "parameters": deployment["parameters"],
            "scheduled": [run["expected_start_time"] for run in runs],
        }
    return found


def expected() -> dict[str, Any]:
    config = yaml.safe_load(PREFECT_YAML.read_text())
    return {
        entry["name"]: {
            "crons": sorted((s["cron"], s["timezone"]) for s in entry.get("schedules", [])),
            "parameters": entry["parameters"],
        }
        for entry in config["deployments"]
    }


def wait_for(condition: Any, describe: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out; last seen: {describe()}"
        time.sleep(1)


def matches_cron(start: str, cron: str, timezone: str) -> bool:
    """Whether an ISO start time falls on the cron's minute and hour in its time zone."""
    from datetime import datetime

    local = (
        datetime.fromisoformat(start.replace("Z", "+00:00"))
        .astimezone(UTC)
        .astimezone(ZoneInfo(timezone))
    )
    minute, hour, _, _, weekday = cron.split()
    ok = local.minute == int(minute) and local.hour == int(hour)
    return ok and (weekday == "*" or local.isoweekday() % 7 == int(weekday))


def test_prefect_yaml_and_the_serve_script_deploy_the_same_schedules(
    prefect_server: dict[str, str],
) -> None:
    """Both ways of deploying, one after the other on one real server (a server of its own
    costs a worker a database migrated from scratch): prefect deploy in a subprocess, then a
    wait for the server's scheduler (every 2 s) to create the scheduled runs; then
    deployments/serve.py in a subprocess (it imports Prefect and the flows), and a wait for
    its deployments to appear."""
    check_prefect_yaml(prefect_server)
    check_serve_script(prefect_server)


def check_prefect_yaml(prefect_server: dict[str, str]) -> None:
    """prefect.yaml deploys every deployment with its schedules, parameters and trigger."""
    prefect_cli(prefect_server, "work-pool", "create", "journey-pool", "--type", "process")
    prefect_cli(
        prefect_server, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML)
    )
    wanted = expected()

    def all_scheduled() -> dict[str, Any] | None:
        found = read_deployments(prefect_server)
        scheduled = all(found[name]["scheduled"] for name in wanted if wanted[name]["crons"])
        return found if set(found) == set(wanted) and scheduled else None

    found = wait_for(all_scheduled, lambda: read_deployments(prefect_server))
    for name, want in wanted.items():
        assert found[name]["crons"] == want["crons"]
        assert found[name]["pool"] == "journey-pool"
        assert found[name]["parameters"] == want["parameters"]
        for cron, timezone in want["crons"]:
            assert all(matches_cron(start, cron, timezone) for start in found[name]["scheduled"])
    assert webhook_triggers(prefect_server) == ["journey.task.finished"]


def webhook_triggers(env: dict[str, str]) -> list[str]:
    """Events expected by the automations that `prefect deploy` made from the triggers."""
    automations = httpx.post(f"{env['PREFECT_API_URL']}/automations/filter", json={}).json()
    return sorted(event for a in automations for event in a["trigger"].get("expect", []))


def check_serve_script(prefect_server: dict[str, str]) -> None:
    """serve.py serves the same deployments, schedules and parameters, without a work pool."""
    api = prefect_server["PREFECT_API_URL"]
    for deployment in httpx.post(f"{api}/deployments/filter", json={}).json():
        # SQLite answers 503 while the scheduler holds its write lock: try again.
        wait_for(
            lambda d=deployment: httpx.delete(f"{api}/deployments/{d['id']}").status_code < 500,
            lambda: "deleting deployments",
            timeout=60,
        )
    served = subprocess.Popen(
        [sys.executable, str(ROOT / "deployments" / "serve.py")],
        env=prefect_server,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wanted = expected()

        def served_by_the_script() -> dict[str, Any] | None:
            found = read_deployments(prefect_server)
            return found if set(found) == set(wanted) else None

        found = wait_for(served_by_the_script, lambda: read_deployments(prefect_server))
        for name, want in wanted.items():
            assert found[name]["crons"] == want["crons"]
            assert found[name]["parameters"] == want["parameters"]
            assert found[name]["pool"] is None  # served by the process, not a work pool
    finally:
        served.terminate()
        served.wait(timeout=30)
