"""Cache keys and records stay what earlier releases wrote: an upgrade never re-bills.

``tests/data/records-0.1.0/`` holds the result records that prefect-journey 0.1.0 (before
the campaign pipeline was one module) wrote for a two-item campaign: its ``imagine`` and
store records, with the keys its key functions computed (``index.json``), for the API at
``http://127.0.0.1:1`` and the destination ``memory://compat-bucket/images``. They expire in
2100.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest

from prefect_journey.cache import cached_result, imagine_cache_key, store_cache_key
from prefect_journey.campaigns.pipeline import Campaign, look_up
from prefect_journey.campaigns.plan import CAMPAIGN_KEY_TEMPLATE, plan_items
from prefect_journey.models import ImagineRequest, ImagineResult
from prefect_journey.storage import DEFAULT_KEY_TEMPLATE, Destination
from prefect_journey.tasks import astore_image, imagine

RECORDS = Path(__file__).parent / "data" / "records-0.1.0"
API = "http://127.0.0.1:1"
DESTINATION = "memory://compat-bucket/images"
ROWS = [
    {"prompt": "a red chair on a white background", "sku": "c-1"},
    {
        "prompt": "a blue chair, 16:9",
        "aspect_ratio": "16:9",
        "resolution": "2K",
        "references": "https://cdn.example.com/ref.png?X-Amz-Signature=abc",
    },
]


def index() -> list[dict[str, str]]:
    entries: list[dict[str, str]] = json.loads((RECORDS / "index.json").read_text())
    return entries


def test_key_functions_compute_the_keys_of_0_1_0() -> None:
    plan = plan_items(ROWS, campaign="Compat", key_template=CAMPAIGN_KEY_TEMPLATE)
    destination = Destination(DESTINATION)
    for item, entry in zip(plan, index(), strict=True):
        assert imagine_cache_key(item.request, "v1", API) == entry["imagine"]
        task_id = f"task-{item.row}"
        key = store_cache_key(task_id, destination, CAMPAIGN_KEY_TEMPLATE, item.key_fields)
        assert key == entry["store"]


def test_the_two_key_templates_keep_their_values() -> None:
    # One image alone is named by its task id; a campaign's images sit under its name.
    assert DEFAULT_KEY_TEMPLATE == "{task_id}.{ext}"
    assert CAMPAIGN_KEY_TEMPLATE == "{campaign}/{index:04d}-{slug}.{ext}"


def test_a_presigned_reference_and_the_key_do_not_change_the_image_key() -> None:
    signed = ImagineRequest(prompt="p", image_urls=["https://x.example/a.png?X-Amz-Signature=1"])
    resigned = ImagineRequest(prompt="p", image_urls=["https://x.example/a.png?X-Amz-Signature=2"])
    assert imagine_cache_key(signed, "", API) == imagine_cache_key(resigned, "", API)


@pytest.mark.usefixtures("prefect_harness")
def test_records_written_by_0_1_0_are_hits_for_the_campaign_pipeline(
    prefect_harness: Path,
) -> None:
    for record in RECORDS.glob("journey-*"):
        shutil.copy(record, prefect_harness / record.name)
    memory = fsspec.filesystem("memory")
    for entry in index():
        memory.pipe(entry["uri"], entry["bytes"].encode())
    plan = plan_items(ROWS, campaign="Compat", key_template=CAMPAIGN_KEY_TEMPLATE)
    campaign = Campaign(
        "Compat",
        Destination(DESTINATION),
        CAMPAIGN_KEY_TEMPLATE,
        "v1",
        None,
        None,
        None,
        base_url=API,
    )

    found = look_up(plan, campaign)

    assert sorted(found.finished) == [1, 2] and not found.restore
    assert all(
        o.status == "stored" and o.cached and o.credits == 0 for o in found.finished.values()
    )
    assert [o.uri for o in found.finished.values()] == [e["uri"] for e in index()]
    generated = cached_result(imagine, index()[0]["imagine"])
    assert isinstance(generated, ImagineResult) and generated.task_id == "task-1"
    assert cached_result(astore_image, index()[1]["store"]).task_id == "task-2"
