"""Fault soak: a campaign through every fault the emulator knows, plus S3 failing mid-upload.

    make soak            # 500 items, 25 % faults; prints one line; exit 1 if anything is lost

Nothing may be lost: every item is either stored exactly once, with the bytes the emulator
made for its task (sha256 checked against the emulator's ledger), or reported failed with a
reason; no other object is in the bucket; no attempt record is left behind.

The run has a webhook receiver in front of a real Prefect server, so possibly-billed answers
are recovered from their deliveries (which have faults of their own); ``credits_wasted``
(credits charged - 4 x images stored) must stay within :data:`MAX_WASTED_SHARE` of the
credits charged. ``--no-receiver`` shows what the same faults cost without recovery, and
``--repay N`` runs the campaign with ``repay_possibly_billed=N`` (default: the package's).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from prefect_journey.signing import new_secret

# Faults per request kind, 25 % in all for each of the API, the CDN and S3 writes.
API_FAULTS = {
    "429": 0.05,
    "503": 0.04,
    "500": 0.04,
    "drop": 0.04,
    "slow": 0.03,
    "malformed": 0.03,
    "failed": 0.02,
}
CDN_FAULTS = {"truncate": 0.125, "corrupt": 0.125}
# Faults of the webhook deliveries themselves (tests cover lost and late ones one by one).
WEBHOOK_FAULTS = {"duplicate": 0.02}
S3_FAULT_RATE = 0.25
# "slow" answers after SLOW_SECONDS; the client gives up after READ_TIMEOUT. The timeout
# leaves seconds of room over a generation (tens of ms here) because a loaded machine can
# hold any request that long: one given up before the emulator billed it, or before its 429
# came back, is an unknown the run must count as spent and has no delivery to recover from.
SLOW_SECONDS = 6.0
READ_TIMEOUT = 4.0
# Deliveries come within seconds here (scaled-down generations, fast delivery retries); the
# window leaves room for the Prefect server to store their events.
RECOVERY_WINDOW = 30.0
WEBHOOK_RETRY_DELAYS = (0.5, 1.0, 2.0)
SECRET = new_secret()  # a fresh one per soak
# credits_wasted / credits_charged at most, with a receiver.
MAX_WASTED_SHARE = 0.01


@dataclass
class SoakResult:
    items: int
    stored: int
    stored_once: int
    corrupt: int
    orphans: int
    calls: int
    credits_charged: int
    emulator_credits: int
    possibly_billed: int
    recovered: int = 0
    not_repaid: int = 0
    # Attempt records the campaign left behind (prefect_journey.attempts): none once every
    # attempt has settled.
    attempt_records: int = 0
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def credits_wasted(self) -> int:
        """Credits that bought no kept image: charged - 4 x distinct images stored."""
        return self.emulator_credits - 4 * self.stored_once

    @property
    def nothing_lost(self) -> bool:
        reported = sum(self.failures.values())
        return (
            self.stored == self.stored_once
            and self.corrupt == 0
            and self.orphans == 0
            and self.stored + reported == self.items
        )

    def line(self) -> str:
        failures = (
            ",".join(f"{name}:{count}" for name, count in sorted(self.failures.items())) or "none"
        )
        return (
            f"soak items={self.items} stored={self.stored} stored_exactly_once={self.stored_once} "
            f"corrupt_objects={self.corrupt} orphan_objects={self.orphans} calls={self.calls} "
            f"credits_charged={self.credits_charged} emulator_charged={self.emulator_credits} "
            f"possibly_billed_retries={self.possibly_billed} recovered={self.recovered} "
            f"possibly_billed_not_repaid={self.not_repaid} "
            f"credits_wasted={self.credits_wasted} attempt_records_left={self.attempt_records} "
            f"failures={failures} nothing_lost={'yes' if self.nothing_lost else 'NO'}"
        )


def configure_faults(emulator: Any, seed: int) -> None:
    emulator.admin(
        "faults",
        {
            "rates": {**API_FAULTS, **CDN_FAULTS, **WEBHOOK_FAULTS},
            "seed": seed,
            "retry_after": 0.2,
            "slow_seconds": SLOW_SECONDS,
        },
    )


def run_soak(
    n_items: int,
    *,
    emulator: Any,
    bucket: str,
    s3_fs: Any,
    concurrency: int = 16,
    repay_possibly_billed: int | None = None,
) -> SoakResult:
    """Run the campaign (faults already configured) and audit the bucket through ``s3_fs``,
    which must read the store directly (not through the faulty proxy); ``repay_possibly_billed``
    None runs the campaign's default."""
    from prefect_journey.attempts import records_left
    from prefect_journey.flows.campaign import batch_campaign

    repay = repay_possibly_billed
    options = {} if repay is None else {"repay_possibly_billed": repay}
    tag = uuid.uuid4().hex[:8]
    items = [
        {"prompt": f"soak item {i} #{tag}", "aspect_ratio": ["1:1", "16:9", "3:4"][i % 3]}
        for i in range(n_items)
    ]
    records_before = set(records_left())
    report = batch_campaign(
        items=items,
        campaign=f"soak-{tag}",
        destination=f"s3://{bucket}",
        max_concurrency=concurrency,
        concurrency_limit=None,
        allow_failures=True,
        **options,
    )
    ledger = emulator.ledger()
    served = ledger["images"]
    s3_fs.invalidate_cache()
    objects = {path.split("/", 1)[1] for path in s3_fs.find(f"{bucket}/soak-{tag}")}
    stored = [o for o in report.outcomes if o.status == "stored"]
    stored_once = corrupt = 0
    for outcome in stored:
        key = outcome.uri.removeprefix(f"s3://{bucket}/")
        if key not in objects:
            continue
        digest = hashlib.sha256(s3_fs.cat(f"{bucket}/{key}")).hexdigest()
        if digest == outcome.sha256 == served[outcome.task_id]["sha256"]:
            stored_once += 1
        else:
            corrupt += 1
    expected_keys = {o.uri.removeprefix(f"s3://{bucket}/") for o in stored}
    by_digest = {image["sha256"]: task_id for task_id, image in served.items()}
    for key in sorted(objects - expected_keys):  # what an orphan is says how it came to be
        digest = hashlib.sha256(s3_fs.cat(f"{bucket}/{key}")).hexdigest()
        origin = by_digest.get(digest, "no image the emulator served")
        print(f"orphan {key}: sha256 {digest[:12]}, the image of {origin}", file=sys.stderr)
    failures = Counter(o.reason.split(":", 1)[0] for o in report.outcomes if o.status != "stored")
    return SoakResult(
        items=n_items,
        stored=len(stored),
        stored_once=stored_once,
        corrupt=corrupt,
        orphans=len(objects - expected_keys),
        calls=report.calls,
        credits_charged=report.credits_charged,
        emulator_credits=ledger["credits_charged"],
        possibly_billed=report.possibly_billed_retries,
        recovered=report.recovered,
        not_repaid=report.possibly_billed_not_repaid,
        attempt_records=len(set(records_left()) - records_before),
        failures=failures,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="fault soak of batch_campaign")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--no-receiver", action="store_true", help="no webhook receiver: no recovery"
    )
    parser.add_argument(
        "--repay",
        type=int,
        default=None,
        metavar="N",
        help="the campaign's repay_possibly_billed (default: the package's default)",
    )
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="journey-soak-")
    os.environ.update(
        {
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ACCESS_KEY_ID": "soak",
            "AWS_SECRET_ACCESS_KEY": "soak",
            "JOURNEY_READ_TIMEOUT": str(READ_TIMEOUT),
        }
    )
    import logging

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from prefect_journey.emulator import (
        BackgroundServer,
        EmulatorConfig,
        EmulatorServer,
        LatencyModel,
    )
    from prefect_journey.webhooks import WEBHOOK_PATH, create_webhook_app
    from reliability.faulty_s3 import create_proxy

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    direct = f"http://{host}:{port}"
    bucket = "journey-soak"
    boto3.client("s3", endpoint_url=direct, region_name="us-east-1").create_bucket(Bucket=bucket)
    proxy_app, s3_counters = create_proxy(direct, S3_FAULT_RATE, seed=args.seed)
    emulator_config = EmulatorConfig(
        latency=LatencyModel(time_scale=0.01),
        credits=10**7,
        webhook_retry_delays=WEBHOOK_RETRY_DELAYS,
    )
    with ExitStack() as stack:
        emulator = stack.enter_context(EmulatorServer(emulator_config))
        proxy = stack.enter_context(BackgroundServer(proxy_app))
        os.environ.update(
            {
                "JOURNEY_API_KEY": emulator.api_key,
                "JOURNEY_BASE_URL": emulator.url,
                "AWS_ENDPOINT_URL_S3": proxy.url,
            }
        )
        if not args.no_receiver:
            # The receiver needs a Prefect server it can reach: a real one, not the
            # in-process server a flow alone would start.
            stack.enter_context(prefect_test_harness())
            app = create_webhook_app(SECRET, api_url=PREFECT_API_URL.value())
            receiver = stack.enter_context(BackgroundServer(app))
            os.environ.update(
                {
                    "JOURNEY_WEBHOOK_URL": f"{receiver.url}{WEBHOOK_PATH}",
                    "JOURNEY_WEBHOOK_SECRET": SECRET,
                    "JOURNEY_RECOVERY_WINDOW": str(RECOVERY_WINDOW),
                }
            )
        configure_faults(emulator, args.seed)
        result = run_soak(
            args.items,
            emulator=emulator,
            bucket=bucket,
            s3_fs=s3fs.S3FileSystem(endpoint_url=direct, skip_instance_cache=True),
            concurrency=args.concurrency,
            repay_possibly_billed=args.repay,
        )
    moto.stop()
    print(f"{result.line()} s3_writes={s3_counters['writes']} s3_faults={s3_counters['faults']}")
    wasted_ok = args.no_receiver or result.credits_wasted <= MAX_WASTED_SHARE * max(
        result.emulator_credits, 1
    )
    return 0 if result.nothing_lost and wasted_ok and result.attempt_records == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
