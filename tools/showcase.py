"""The package as a Prefect user sees it: ``make ui`` shows it live, ``make screenshots``
takes the pictures the docs show.

Both start a real ``prefect server`` (its own home and database in a temporary folder), the
JourneyAPI emulator and the webhook receiver (which serves the Blocks' logo, so the UI shows
it without internet: ``JOURNEY_BLOCK_LOGO_URL``), register and save the package's Blocks, deploy
``deployments/prefect.yaml``, and run the example flow and a campaign. Then:

- ``python -m tools.showcase`` (``make ui``) keeps them up and prints where to look in the
  UI, until Ctrl-C. The images are stored in ``./outputs``.
- ``python -m tools.showcase --capture docs/images`` (``make screenshots``) captures the UI's
  pages with headless Chromium (Debian's ``chromium``, driven by Playwright through
  ``executable_path``: no browser is downloaded) into ``docs/images/ui-*.png``.

The emulator runs as long as the server: an image artifact of a local folder links to the
emulator's CDN, which holds its images in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from pydantic import SecretStr

from tools.services import PREFECT, ROOT, free_port, port_is_free, prefect_server

if TYPE_CHECKING:
    from playwright.sync_api import Page

IMAGES = ROOT / "docs" / "images"
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
CHROMIUM = "/usr/bin/chromium"
# Prefect's own default, so the address is the one Prefect's docs show.
UI_PORT = 4200
# Chromium's own connections (updates, sync, safe browsing) are refused on a closed network;
# these flags keep it from trying. --no-sandbox: the captures run as root in CI containers.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
CAMPAIGN_PROMPTS = (
    "a lighthouse on a cliff at dusk, watercolor",
    "a red bicycle leaning on a bakery window, morning light",
    "a fox reading a newspaper in a cafe, gouache",
    "a paper boat on a rainy street, close-up",
    "a tram crossing a bridge in the fog",
    "a cat asleep on a stack of books, warm lamp",
)


@dataclass(frozen=True)
class Runs:
    """What the captures look at: ids read back from the Prefect API."""

    flow_run: str
    image_artifact: str
    campaign_run: str
    summary_artifact: str
    progress_artifact: str
    gallery_artifact: str
    deployment: str


def image_loaded(page: Page) -> None:
    """Wait until the page shows a picture (not a placeholder icon)."""
    page.wait_for_function(
        "() => [...document.images].some(i => i.complete && i.naturalWidth >= 200)"
    )


def logos_loaded(count: int) -> Callable[[Page], None]:
    """A wait until the page shows the Blocks' logo ``count`` times, loaded from the
    receiver."""

    def wait(page: Page) -> None:
        page.wait_for_function(
            "count => [...document.images].filter(i => i.src.endsWith('/logo.png')"
            " && i.complete && i.naturalWidth > 0).length >= count",
            arg=count,
        )

    return wait


def package_blocks_listed(page: Page) -> None:
    """Search the catalog for the package's Blocks, and wait until their logos show."""
    page.get_by_placeholder("Search blocks").fill("JourneyAPI")
    page.get_by_text("AWS Credentials").wait_for(state="detached")
    logos_loaded(4)(page)


@dataclass(frozen=True)
class Shot:
    """One picture: its file, the UI page (``{...}`` from :class:`Runs`), and what shows it
    loaded: a text only the loaded page has, and an extra wait if the page needs one."""

    name: str
    page: str
    shown: str
    ready: Callable[[Page], None] | None = None


# The docs pages embed these file names (a test checks that each is shown somewhere).
PICTURES = (
    Shot("ui-flow-run.png", "/runs/flow-run/{flow_run}", "stored task_id="),
    Shot(
        "ui-image-artifact.png", "/artifacts/artifact/{image_artifact}", "Image URL", image_loaded
    ),
    Shot("ui-campaign-run.png", "/runs/flow-run/{campaign_run}", "items to run"),
    Shot("ui-campaign-summary.png", "/artifacts/artifact/{summary_artifact}", "credits_charged="),
    Shot("ui-campaign-progress.png", "/artifacts/artifact/{progress_artifact}", "stored 6"),
    Shot(
        "ui-campaign-gallery.png",
        "/artifacts/artifact/{gallery_artifact}",
        "6 of the 6 images",
        image_loaded,
    ),
    Shot(
        "ui-block-form.png",
        "/blocks/catalog/journeyapi-credentials/create",
        "API Key",
        logos_loaded(1),
    ),
    Shot("ui-block-catalog.png", "/blocks/catalog", "JourneyAPI Redis", package_blocks_listed),
    Shot("ui-deployment.png", "/deployments/deployment/{deployment}", "every day"),
)


def prefect_cli(*args: str) -> None:
    """One ``prefect`` command against the server the environment points at."""
    subprocess.run([*PREFECT, *args], cwd=ROOT, check=True, capture_output=True)


def run_flows(api: str, outputs: Path) -> Runs:
    """Save the Blocks, deploy, run the example flow and a campaign; read back their ids."""
    # Imported here: Prefect reads its settings from the environment when first imported.
    from prefect_journey import ImageDestination, JourneyCredentials
    from prefect_journey.flows import batch_campaign, generate_and_store

    prefect_cli("block", "register", "-m", "prefect_journey")
    JourneyCredentials(
        api_key=SecretStr(os.environ["JOURNEY_API_KEY"]), base_url=os.environ["JOURNEY_BASE_URL"]
    ).save("journey", overwrite=True)
    ImageDestination(url=str(outputs)).save("journey-images", overwrite=True)
    prefect_cli("work-pool", "create", "journey-pool", "--type", "process")
    prefect_cli("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML))

    single = generate_and_store(
        "a lighthouse on a cliff at dusk, watercolor, warm light",
        aspect_ratio="16:9",
        resolution="2K",
        credentials_block="journey",
        destination_block="journey-images",
        return_state=True,
    )
    campaign = batch_campaign(
        items=[{"prompt": prompt} for prompt in CAMPAIGN_PROMPTS],
        campaign="spring-launch",
        credentials_block="journey",
        destination_block="journey-images",
        max_concurrency=3,
        max_credits=100,
        return_state=True,
    )
    flow_run = str(single.state_details.flow_run_id)
    campaign_run = str(campaign.state_details.flow_run_id)
    return Runs(
        flow_run=flow_run,
        image_artifact=artifact_id(api, flow_run, "image"),
        campaign_run=campaign_run,
        summary_artifact=artifact_id(api, campaign_run, "table"),
        progress_artifact=artifact_id(api, campaign_run, "progress"),
        gallery_artifact=artifact_id(api, campaign_run, "markdown"),
        deployment=httpx.get(f"{api}/deployments/name/generate-and-store/daily-postcard")
        .raise_for_status()
        .json()["id"],
    )


def artifact_id(api: str, flow_run: str, kind: str) -> str:
    """The first artifact of type ``kind`` a flow run (or one of its task runs) created."""
    found = (
        httpx.post(
            f"{api}/artifacts/filter",
            json={
                "flow_runs": {"id": {"any_": [flow_run]}},
                "artifacts": {"type": {"any_": [kind]}},
            },
        )
        .raise_for_status()
        .json()
    )
    if not found:
        raise SystemExit(f"flow run {flow_run} created no {kind} artifact")
    return str(min(found, key=lambda artifact: artifact["created"])["id"])


def capture(base: str, runs: Runs, out: Path, chromium: str) -> list[Path]:
    """Each page of :data:`PICTURES`, as the UI draws it, into ``out``.

    A page is captured once its loaded state is on screen, so an error page fails the run
    instead of becoming a picture.
    """
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            for shot in PICTURES:
                url = base + shot.page.format(**dataclasses.asdict(runs))
                page.goto(url, wait_until="networkidle", timeout=60_000)
                page.get_by_text(shot.shown).first.wait_for(timeout=60_000)
                if shot.ready is not None:
                    shot.ready(page)
                # The run graph lays itself out after its data arrives.
                page.wait_for_timeout(2_000)
                page.screenshot(path=out / shot.name)
                written.append(out / shot.name)
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> None:
    """Show the runs in the UI until Ctrl-C, or capture :data:`PICTURES` with ``--capture``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", type=Path, metavar="FOLDER", help="take the pictures")
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--port", type=int, default=UI_PORT, help="the UI's port (make ui)")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="(make ui)")
    args = parser.parse_args(argv)
    if args.capture and not Path(args.chromium).exists():
        raise SystemExit(f"no Chromium at {args.chromium}: apt-get install chromium")
    port = free_port() if args.capture else args.port
    if not port_is_free(port):
        raise SystemExit(f"port {port} is in use (another Prefect server?): pass --port")
    # Ctrl-C or a plain `kill` at any moment stops the server and the emulator on the way
    # out (also when started in the background, where SIGINT starts out ignored).
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _interrupt)

    from prefect_journey.emulator import EmulatorConfig, EmulatorServer, LatencyModel

    with tempfile.TemporaryDirectory(prefix="journey-showcase-") as scratch:
        home = Path(scratch)
        with (
            prefect_server(home, port) as base,
            EmulatorServer(EmulatorConfig(latency=LatencyModel(time_scale=0.05))) as emulator,
        ):
            os.environ.update(
                PREFECT_HOME=str(home),
                PREFECT_API_URL=f"{base}/api",
                JOURNEY_API_KEY=emulator.api_key,
                JOURNEY_BASE_URL=emulator.url,
            )
            with webhook_receiver(f"{base}/api") as logo_url:
                os.environ["JOURNEY_BLOCK_LOGO_URL"] = logo_url
                # A folder per run: a campaign's keys hold the last run's images otherwise,
                # and this run's emulator makes other requests of them (refused, as they
                # should be).
                run_folder = f"ui-{time.strftime('%Y%m%d-%H%M%S')}"
                outputs = home / "outputs" if args.capture else args.outputs.resolve() / run_folder
                runs = run_flows(f"{base}/api", outputs)
                flush_run_logs()
                if args.capture:
                    for path in capture(base, runs, args.capture, args.chromium):
                        print(path)
                else:
                    show(base, runs, outputs)


@contextlib.contextmanager
def webhook_receiver(api: str) -> Iterator[str]:
    """The webhook receiver in this process, which serves the Blocks' logo as well; yields
    the logo's address."""
    # Imported here: Prefect reads its settings from the environment when first imported.
    from prefect_journey.emulator.server import BackgroundServer
    from prefect_journey.signing import new_secret
    from prefect_journey.webhooks import LOGO_PATH, create_webhook_app

    with BackgroundServer(create_webhook_app(new_secret(), api_url=api)) as server:
        yield f"{server.url}{LOGO_PATH}"


def flush_run_logs() -> None:
    """Send the runs' buffered log lines now, while the server still answers."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


def show(base: str, runs: Runs, outputs: Path) -> None:
    """Print where each part shows in the UI, then wait for Ctrl-C."""
    print(
        f"""
The Prefect UI: {base}
  the example flow's run ........ {base}/runs/flow-run/{runs.flow_run}
  its image ..................... {base}/artifacts/artifact/{runs.image_artifact}
  a campaign's run .............. {base}/runs/flow-run/{runs.campaign_run}
  its summary table ............. {base}/artifacts/artifact/{runs.summary_artifact}
  its progress .................. {base}/artifacts/artifact/{runs.progress_artifact}
  the scheduled deployment ...... {base}/deployments/deployment/{runs.deployment}
  the package's Blocks .......... {base}/blocks/catalog (search "JourneyAPI")
The images are in {outputs}. Ctrl-C stops the server and the emulator.""",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before the runs were shown: everything is stopped
        sys.exit(130)
