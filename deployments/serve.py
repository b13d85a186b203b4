"""Serve the deployments of ``prefect.yaml`` from this process, with the same schedules.

    python deployments/serve.py

The deployments are read from ``prefect.yaml`` (not restated here), so the two cannot drift:
each entry's flow is imported from its entrypoint and served with its schedules, event
triggers, parameters, tags and description. Needs ``PREFECT_API_URL`` pointing at a Prefect server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger, DeploymentTriggerTypes, TriggerTypes
from prefect.flows import Flow, load_flow_from_entrypoint

HERE = Path(__file__).resolve().parent
PREFECT_YAML = HERE / "prefect.yaml"


def load_deployments(path: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    """One served deployment per entry of ``prefect.yaml``."""
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    deployments = []
    for entry in config["deployments"]:
        flow: Flow[..., Any] = load_flow_from_entrypoint(entry["entrypoint"])
        schedules = [
            CronSchedule(cron=item["cron"], timezone=item.get("timezone"))
            for item in entry.get("schedules", [])
            if item.get("active", True)
        ]
        triggers: list[DeploymentTriggerTypes | TriggerTypes] = [
            DeploymentEventTrigger.model_validate({k: v for k, v in item.items() if k != "type"})
            for item in entry.get("triggers", [])
            if item.get("type", "event") == "event"
        ]
        deployment = flow.to_deployment(
            name=entry["name"],
            schedules=schedules,
            triggers=triggers,
            parameters=entry.get("parameters", {}),
            tags=entry.get("tags", []),
            description=entry.get("description"),
        )
        # Called from sync code, to_deployment returns the deployment, not a coroutine.
        assert isinstance(deployment, RunnerDeployment)
        deployments.append(deployment)
    return deployments


if __name__ == "__main__":
    serve(*load_deployments())
