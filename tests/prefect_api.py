"""Read back what a flow run left in the Prefect API: logs, artifacts, task runs, states."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL
from prefect.states import State


def flow_run_id(state: State[Any]) -> UUID:
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    return run_id


def logs(run_ids: list[UUID]) -> list[str]:
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        records = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
    return [record.message for record in records]


def artifacts(run_ids: list[UUID]) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )


def task_runs(run_ids: list[UUID], at_least: int = 0, timeout: float = 30) -> list[Any]:
    """Task runs of ``run_ids`` (at most the API's page of 200), once there are ``at_least``:
    Prefect records task runs from their events, a moment after they ran."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
            )
            if len(runs) >= at_least or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def flow_runs(run_ids: list[UUID]) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )


def flow_runs_of_parent(parent_id: UUID) -> list[Any]:
    """Subflow runs started by the flow run ``parent_id``."""
    with get_client(sync_client=True) as client:
        children = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent_id]))
        )
        child_ids = [run.state.state_details.child_flow_run_id for run in children if run.state]
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[i for i in child_ids if i]))
        )


def events(name: str) -> list[dict[str, Any]]:
    """Events called ``name`` from the API (read over REST)."""
    api = str(PREFECT_API_URL.value())
    body = {
        "filter": {"event": {"name": [name]}, "occurred": {"since": "2000-01-01T00:00:00Z"}},
        "limit": 50,
    }
    page = httpx.post(f"{api}/events/filter", json=body, timeout=30).json()
    found = list(page["events"])
    while page.get("next_page"):
        page = httpx.get(page["next_page"], timeout=30).json()
        found += page["events"]
    return found


def task_runs_by_name(prefix: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        return [run for run in client.read_task_runs(limit=200) if run.name.startswith(prefix)]
