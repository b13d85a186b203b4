"""deployments/prefect.yaml and deployments/serve.py against a real `prefect server`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any, cast
from uuid import UUID
from zoneinfo import ZoneInfo

import httpx
import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

from prefect_journey import JourneyCredentials, settings

from .conftest import SENTINEL_KEY, free_port

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
    wait for the server's scheduler (every 2 s) to create the scheduled runs; then the Docker
    work pool's file on a pool of type docker; then deployments/serve.py in a subprocess (it
    imports Prefect and the flows), and a wait for its deployments to appear."""
    check_prefect_yaml(prefect_server)
    check_docker_deployment(prefect_server)
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


DOCKER_DIR = ROOT / "deployments" / "docker"
DOCKER_YAML = DOCKER_DIR / "prefect.yaml"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
DOCS = ROOT / "docs" / "deployments.md"
# The variables whose value is a secret: a Block holds each, never a deployment.
SECRET_VARIABLES = {settings.API_KEY.name, settings.WEBHOOK_SECRET.name, settings.REDIS_URL.name}


def docker_deployment() -> dict[str, Any]:
    [entry] = yaml.safe_load(DOCKER_YAML.read_text())["deployments"]
    return cast(dict[str, Any], entry)


def documented_docker_env() -> dict[str, str]:
    """The variables the "Docker work pool" section of docs/deployments.md lists in its table
    of the deployment's `env`: `| `NAME` | `value` | ... |` rows."""
    section = DOCS.read_text().split("## Docker work pool", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", section, flags=re.MULTILINE))


def check_docker_deployment(prefect_server: dict[str, str]) -> None:
    """deployments/docker/prefect.yaml deploys on a pool of type docker (prefect-docker's base
    job template); its job variables satisfy that template's schema, carry the variables the
    docs list and no secret; the Docker worker's own code turns them into a container's
    configuration without the API key, which stays in its block. No Docker engine: no
    container is started."""
    api = prefect_server["PREFECT_API_URL"]
    prefect_cli(prefect_server, "work-pool", "create", "journey-docker", "--type", "docker")
    pool = httpx.get(f"{api}/work_pools/journey-docker").json()
    assert pool["type"] == "docker"
    assert pool["base_job_template"] == DockerWorker.get_default_base_job_template()
    with temporary_settings(updates={PREFECT_API_URL: api}):
        JourneyCredentials(api_key=SENTINEL_KEY).save("journey", overwrite=True)

    prefect_cli(
        prefect_server, "--no-prompt", "deploy", "--all", "--prefect-file", str(DOCKER_YAML)
    )
    entry = docker_deployment()
    wanted = entry["work_pool"]["job_variables"]
    [deployment] = httpx.post(
        f"{api}/deployments/filter",
        json={"deployments": {"name": {"any_": [entry["name"]]}}},
    ).json()
    assert deployment["work_pool_name"] == "journey-docker"
    assert deployment["job_variables"] == wanted
    # The same campaign as the process pool's, in a container.
    assert deployment["parameters"] == expected()["weekly-campaign"]["parameters"]

    schema = pool["base_job_template"]["variables"]
    jsonschema.validate(wanted, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema does check values
        jsonschema.validate({**wanted, "image_pull_policy": "Sometimes"}, schema)

    env = wanted["env"]
    assert env == documented_docker_env()
    journey = {name for name in env if name.startswith("JOURNEY_")}
    assert journey <= {variable.name for variable in settings.VARIABLES}
    assert not journey & SECRET_VARIABLES
    # A template would be resolved by `prefect deploy` and stored in clear.
    assert not any("{{" in str(value) for value in wanted.values())
    assert not any("{{" in value for value in env.values())

    run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}).json()
    container = asyncio.run(container_configuration(api, pool, deployment["id"], run["id"]))
    assert container.image == wanted["image"]
    assert container.command == "prefect flow-run execute"
    assert container.env.items() >= env.items()
    # On Linux the container reaches a server on loopback through the host's network.
    assert container.get_network_mode() == "host"
    assert container.env["PREFECT_API_URL"] == api
    assert container.env["PREFECT__FLOW_RUN_ID"] == run["id"]
    assert SENTINEL_KEY not in container.model_dump_json()
    assert SENTINEL_KEY not in json.dumps(deployment)


async def container_configuration(
    api: str, pool: dict[str, Any], deployment_id: str, flow_run_id: str
) -> DockerWorkerJobConfiguration:
    """What a Docker worker would create the flow run's container from: the pool's template
    filled with the deployment's job variables, prepared for the run (image, command,
    environment), by prefect-docker's own code."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            deployment = await client.read_deployment(UUID(deployment_id))
            flow_run = await client.read_flow_run(UUID(flow_run_id))
            flow = await client.read_flow(flow_run.flow_id)
            configuration = await DockerWorkerJobConfiguration.from_template_and_values(
                pool["base_job_template"], deployment.job_variables or {}, client=client
            )
            configuration.prepare_for_flow_run(flow_run=flow_run, deployment=deployment, flow=flow)
    return configuration


def test_the_dockerfile_installs_the_package_on_a_python_it_supports_as_a_user() -> None:
    """deployments/docker/Dockerfile, read statically (CI has no Docker engine to build it):
    an official Prefect image whose Python this package supports, this package with its redis
    extra at this version, a user other than root, and no secret in its ENV or ARG lines."""
    dockerfile = DockerfileParser(path=str(DOCKERFILE), cache_content=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    base = re.fullmatch(r"prefecthq/prefect:([0-9.]+)-python(3\.[0-9]+)", dockerfile.baseimage)
    assert base, dockerfile.baseimage
    prefect_tag, python = base.groups()
    assert Version(python) in SpecifierSet(project["requires-python"])
    [prefect] = [Requirement(r) for r in project["dependencies"] if r.startswith("prefect")]
    # `3` is the newest 3.x; a full release must be one this package supports.
    assert prefect_tag == "3" or Version(prefect_tag) in prefect.specifier

    package = Requirement(dockerfile.args["PACKAGE"])
    assert package.name == project["name"]
    assert package.extras == {"redis"}
    assert Version(project["version"]) in package.specifier
    runs = [i["value"] for i in dockerfile.structure if i["instruction"] == "RUN"]
    assert any('pip install --no-cache-dir "${PACKAGE}"' in run for run in runs)

    instructions = [i["instruction"] for i in dockerfile.structure]
    last_user = len(instructions) - 1 - instructions[::-1].index("USER")
    user = dockerfile.structure[last_user]["value"]
    assert user not in {"root", "0"}
    assert any(re.search(rf"useradd .*\b{user}\b", run) for run in runs)
    assert "RUN" not in instructions[last_user:]  # nothing runs as root after it

    names = {*dockerfile.envs, *dockerfile.args}
    assert not names & SECRET_VARIABLES
    assert not [name for name in names if re.search("KEY|SECRET|PASSWORD|TOKEN", name)]
