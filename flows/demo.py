"""``make demo``: generate_and_store end to end against the local emulator.

With ``JOURNEY_API_KEY`` set, the real API is used instead (and ``JOURNEY_DESTINATION``, e.g.
``s3://my-bucket/demo``, replaces ``./outputs``).
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from prefect_journey.emulator import EmulatorConfig, EmulatorServer, LatencyModel
from prefect_journey.flows import generate_and_store

PROMPT = "a lighthouse on a cliff at dusk, watercolor, warm light"
# The demo's emulator: not the README's 8765, so both can run at once.
DEMO_PORT = 8766


def main() -> None:
    with ExitStack() as stack:
        if not os.environ.get("JOURNEY_API_KEY"):
            # A tenth of the realistic latency: about a second for this image. Always the
            # same port: the API's address is part of an image's cache key, so a second demo
            # finds the first one's image instead of refusing to store over it.
            config = EmulatorConfig(latency=LatencyModel(time_scale=0.1))
            emulator = stack.enter_context(EmulatorServer(config, port=DEMO_PORT))
            os.environ["JOURNEY_API_KEY"] = emulator.api_key
            os.environ["JOURNEY_BASE_URL"] = emulator.url
            print(f"JourneyAPI emulator running on {emulator.url}")
        report = generate_and_store(PROMPT, aspect_ratio="16:9", resolution="2K")
    image = report.outcomes[0]
    print(f"\nImage: {image.uri}")
    print(f"  task {image.task_id}, {image.credits} credits, {image.latency_s:.1f} s")
    print(f"  sha256 {image.sha256}")


if __name__ == "__main__":
    main()
