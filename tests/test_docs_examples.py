"""Every example in README.md and docs/ runs, against the emulator and a moto bucket.

Each fenced ``python`` block is run in a fresh interpreter, and each ``bash`` block in bash,
in an empty folder, with the
package's variables pointing at the emulator, s3fs at moto and Prefect at the test harness.
The examples name the places a reader has (``s3://my-bucket``, ``api_key="..."``); this
module's :data:`SUBSTITUTIONS` is the one place where those become the test's own. A block
that cannot run here says why in the page source, on the line before its fence:
``<!-- example not run: <reason> -->``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

from prefect_journey.emulator import EmulatorServer

from .conftest import Bucket, free_port

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<language>python|bash)\n(?P<code>.*?)^(?P=indent)```", re.M | re.S
)
NOT_RUN = re.compile(r"<!-- example not run: (?P<reason>.+?) -->\s*$")

# What an example names -> what the test has. {bucket}, {key} and {emulator} are filled in.
SUBSTITUTIONS = {
    "s3://brand/campaigns/spring.csv": "s3://{bucket}/campaigns/spring.csv",
    "s3://my-bucket": "s3://{bucket}",
    'JourneyCredentials(api_key="...")': (
        'JourneyCredentials(api_key="{key}", base_url="{emulator}")'
    ),
    'storage_options={"key": "...", "secret": "..."}': (
        'storage_options={{"key": "testing", "secret": "testing"}}'
    ),
    # Shell examples: the emulator on a free port, the key from the environment, the
    # campaign file of the test.
    "8765": "{port}",
    "JOURNEY_API_KEY=... ": "",
    "campaign.csv": "{campaign_csv}",
    "flows/batch_campaign.py": "{root}/flows/batch_campaign.py",
}
# The campaign file the examples read; {tag} keeps one example's images out of another's
# cache (the emulator forgets its images between tests, Prefect's cache does not).
SPRING_CSV = "prompt,sku\na red chair {tag},c-1\na blue chair {tag},c-2\n"


@dataclass
class Example:
    page: Path
    line: int
    language: str
    code: str
    skipped_because: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples() -> list[Example]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            reason = NOT_RUN.search(before)
            code = textwrap.dedent(match.group("code"))
            found.append(
                Example(
                    page,
                    line,
                    match.group("language"),
                    code,
                    reason.group("reason") if reason else None,
                )
            )
    return found


EXAMPLES = examples()


def test_every_page_with_python_has_examples_found() -> None:
    # The fence pattern finds indented blocks (inside list items) too.
    assert sum(e.language == "python" for e in EXAMPLES) >= 10
    assert sum(e.language == "bash" for e in EXAMPLES) >= 8
    assert any(e.page.name == "webhooks.md" for e in EXAMPLES)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_runs(
    example: Example, emulator: EmulatorServer, bucket: Bucket, tmp_path: Path
) -> None:
    """Each example runs in a fresh interpreter or shell, which imports Prefect (2-3 s of CPU)
    before the example's own flow runs against the Prefect server."""
    if example.skipped_because:
        pytest.skip(example.skipped_because)
    boto3.client(
        "s3",
        endpoint_url=bucket.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).put_object(
        Bucket=bucket.name,
        Key="campaigns/spring.csv",
        Body=SPRING_CSV.format(tag=uuid.uuid4().hex[:8]).encode(),
    )
    campaign_csv = tmp_path / "campaign.csv"
    campaign_csv.write_text(SPRING_CSV.format(tag=uuid.uuid4().hex[:8]))
    code = example.code
    for placeholder, ours in SUBSTITUTIONS.items():
        filled = ours.format(
            bucket=bucket.name,
            key=emulator.api_key,
            emulator=emulator.url,
            port=free_port(),
            campaign_csv=campaign_csv,
            root=ROOT,
        )
        code = code.replace(placeholder, filled)
    env = {
        **os.environ,
        "JOURNEY_API_KEY": emulator.api_key,
        "JOURNEY_BASE_URL": emulator.url,
        "AWS_ENDPOINT_URL_S3": bucket.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(PREFECT_LOCAL_STORAGE_PATH.value()),
    }
    # The blocks the examples load by name are the ones the Blocks page saves.
    setup = (
        "from prefect_journey import ImageDestination, JourneyCredentials\n"
        f"JourneyCredentials(api_key={emulator.api_key!r}, base_url={emulator.url!r})"
        ".save('journey', overwrite=True)\n"
        f"ImageDestination(url='s3://{bucket.name}/images')"
        ".save('journey-images', overwrite=True)\n"
    )
    if example.language == "python":
        command = [sys.executable, "-c", setup + code]
    else:  # a background process of the example ends with it
        script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + code
        command = ["bash", "-c", script]
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        env["JOURNEY_DESTINATION"] = str(tmp_path / "outputs")
    done = subprocess.run(
        command,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"{example.id}\n{code}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert "api.journeyapi.com" not in done.stdout + done.stderr  # never the real API
