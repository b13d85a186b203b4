"""A campaign knows what its keys hold before it pays: run again where its cache records are
gone (a fresh Prefect home, the 7-day expiry, a worker without shared result storage), an
object made from the same request is the item's image, free; an object made from another
request fails the item before its call, unless the campaign overwrites. In S3 (moto) and in
a local folder, under a real Prefect server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from prefect_journey import ImageDestination
from prefect_journey.cache import cached_result, imagine_cache_key
from prefect_journey.emulator import EmulatorServer
from prefect_journey.flows.campaign import CampaignReport, batch_campaign
from prefect_journey.models import ImagineRequest
from prefect_journey.tasks import imagine

from . import prefect_api
from .conftest import Bucket

pytestmark = pytest.mark.usefixtures("prefect_harness")

# The campaign a user ran twice.
ITEMS = 12
CAMPAIGN = "Spring"


def items(tag: str) -> list[dict[str, Any]]:
    return [{"prompt": f"product {i} on a white background #{tag}"} for i in range(1, ITEMS + 1)]


def charged(emulator: EmulatorServer) -> int:
    return int(emulator.ledger()["credits_charged"])


def served_sha256(emulator: EmulatorServer, task_id: str) -> str:
    return str(emulator.ledger()["images"][task_id]["sha256"])


@contextmanager
def fresh_prefect_home(tmp_path: Path) -> Iterator[None]:
    """No cache record of any earlier run: results go to an empty folder."""
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "fresh-home"}):
        yield


class Where:
    """A campaign's destination (a bucket through a block, or a local folder) and what it
    holds: every object or file, hidden ones included, so a record beside an image shows."""

    def __init__(self, kind: str, bucket: Bucket, tmp_path: Path) -> None:
        self.kind, self.bucket, self.folder = kind, bucket, tmp_path / "images"
        if kind == "s3":
            name = f"occupied-{bucket.name}"
            ImageDestination(url=bucket.url, storage_options=bucket.storage_options).save(
                name, overwrite=True
            )
            self.options: dict[str, Any] = {"destination_block": name}
        else:
            self.options = {"destination": str(self.folder)}

    def objects(self) -> list[str]:
        if self.kind == "s3":
            return self.bucket.objects()
        files = (p for p in self.folder.rglob("*") if p.is_file())
        return sorted(p.relative_to(self.folder).as_posix() for p in files)

    def unrecorded_copy(self, uri: str) -> None:
        """Write the object at ``uri`` again by hand, without its record."""
        if self.kind == "s3":
            fs = self.bucket.fs()
            fs.pipe(uri, fs.cat(uri))
        else:
            path = Path(uri.removeprefix("file://"))
            content = path.read_bytes()
            path.unlink()
            path.write_bytes(content)


KINDS = pytest.mark.parametrize("kind", ["local", "s3"])


@KINDS
@pytest.mark.parametrize("images_per_task_run", [1, 4])
def test_a_rerun_from_a_fresh_prefect_home_pays_nothing(
    journey_env: EmulatorServer,
    bucket: Bucket,
    tmp_path: Path,
    kind: str,
    images_per_task_run: int,
) -> None:
    """Two campaign runs, the second with a fresh Prefect home, in a bucket or a folder."""
    where, batch = Where(kind, bucket, tmp_path), items(uuid.uuid4().hex[:8])
    first = batch_campaign(
        items=batch, campaign=CAMPAIGN, images_per_task_run=images_per_task_run, **where.options
    )
    assert first.stored == ITEMS and charged(journey_env) == 4 * ITEMS
    objects = where.objects()
    assert len(objects) == ITEMS  # the records live on the objects, not beside them

    with fresh_prefect_home(tmp_path):
        request = ImagineRequest(prompt=batch[0]["prompt"])
        assert cached_result(imagine, imagine_cache_key(request, "", journey_env.url)) is None
        state = batch_campaign(
            items=batch,
            campaign=CAMPAIGN,
            images_per_task_run=images_per_task_run,
            return_state=True,
            **where.options,
        )
    report: CampaignReport = state.result()
    assert (report.stored, report.cache_hits, report.calls, report.credits_charged) == (
        ITEMS,
        ITEMS,
        0,
        0,
    )
    assert all(o.cached and o.credits == 0 and o.status == "stored" for o in report.outcomes)
    assert [(o.uri, o.sha256, o.task_id) for o in report.outcomes] == [
        (o.uri, o.sha256, o.task_id) for o in first.outcomes
    ]
    assert charged(journey_env) == 4 * ITEMS and where.objects() == objects
    logs = prefect_api.logs([prefect_api.flow_run_id(state)])
    assert any("up to 0 credits" in line for line in logs)


@KINDS
def test_keys_holding_other_requests_images_fail_before_any_call_unless_overwrite(
    journey_env: EmulatorServer, bucket: Bucket, tmp_path: Path, kind: str
) -> None:
    """Three campaign runs on the same keys, in a bucket or a folder, and the second's logs
    read back from the API."""
    where, batch = Where(kind, bucket, tmp_path), items(uuid.uuid4().hex[:8])
    first = batch_campaign(items=batch, campaign=CAMPAIGN, variant="first", **where.options)
    objects = where.objects()
    where.unrecorded_copy(first.outcomes[0].uri)  # copied by hand: no record of its origin

    state = batch_campaign(
        items=batch,
        campaign=CAMPAIGN,
        variant="second",  # the same keys, another request
        allow_failures=True,
        return_state=True,
        **where.options,
    )
    report: CampaignReport = state.result()
    assert charged(journey_env) == 4 * ITEMS  # the first run's, nothing more
    assert (report.failed, report.calls, report.credits_charged) == (ITEMS, 0, 0)
    for done, failed in zip(first.outcomes, report.outcomes, strict=True):
        assert failed.status == "failed" and failed.attempts == 0 and failed.credits == 0
        assert done.uri in failed.reason and "overwrite=True" in failed.reason
        assert "another key template" in failed.reason
    assert "no record" in report.outcomes[0].reason
    assert all("another request" in o.reason for o in report.outcomes[1:])
    logs = prefect_api.logs([prefect_api.flow_run_id(state)])
    assert any("up to 0 credits" in line for line in logs)
    assert where.objects() == objects

    replaced = batch_campaign(
        items=batch, campaign=CAMPAIGN, variant="second", overwrite=True, **where.options
    )
    assert (replaced.stored, replaced.calls, replaced.credits_charged) == (
        ITEMS,
        ITEMS,
        4 * ITEMS,
    )
    assert charged(journey_env) == 2 * 4 * ITEMS and where.objects() == objects
    for before, after in zip(first.outcomes, replaced.outcomes, strict=True):
        assert after.uri == before.uri and after.task_id != before.task_id
        assert after.sha256 == served_sha256(journey_env, after.task_id) != before.sha256
