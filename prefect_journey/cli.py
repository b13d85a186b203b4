"""``prefect-journey``: thin command-line entry points.

prefect-journey emulator --port 8765 [--time-scale 0.1] [--fault 429=0.1] ...
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _fault(value: str) -> tuple[str, float]:
    kind, sep, rate = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND=RATE, got {value!r}")
    try:
        return kind.strip(), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate must be a number, got {rate!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefect-journey", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    emulator = commands.add_parser(
        "emulator", help="run the local JourneyAPI emulator (offline, follows the contract)"
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8765)
    emulator.add_argument(
        "--api-key",
        action="append",
        help="a key the emulator accepts (repeatable; default: $JOURNEY_API_KEY or "
        "'journey-emulator-key')",
    )
    emulator.add_argument("--credits", type=int, help="starting credit balance")
    emulator.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply generation latency (0.01: fast)"
    )
    emulator.add_argument(
        "--fixed-latency", type=float, help="every generation takes exactly this many seconds"
    )
    emulator.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="KIND=RATE",
        help="inject a fault at a rate in 0..1; kinds: 400 429 503 500 drop slow failed "
        "malformed truncate corrupt (repeatable)",
    )
    emulator.add_argument("--seed", type=int, default=0, help="seed of the fault dice")
    emulator.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of 429/503")
    emulator.add_argument(
        "--slow-seconds", type=float, default=300.0, help="extra delay of the 'slow' fault"
    )
    emulator.add_argument(
        "--jpeg-as-png",
        type=float,
        default=0.0,
        metavar="RATE",
        help="fraction of images served as JPEG bytes under a .png URL",
    )
    emulator.add_argument(
        "--realistic-sizes", action="store_true", help="photo-like grain: multi-MB PNGs"
    )
    return parser


def _run_emulator(args: argparse.Namespace) -> int:
    from prefect_journey.emulator import (
        DEFAULT_API_KEY,
        EmulatorConfig,
        FaultPlan,
        LatencyModel,
        serve_forever,
    )

    keys = tuple(args.api_key or [os.environ.get("JOURNEY_API_KEY") or DEFAULT_API_KEY])
    config = EmulatorConfig(
        api_keys=keys,
        latency=LatencyModel(time_scale=args.time_scale, fixed=args.fixed_latency),
        faults=FaultPlan(
            rates=dict(args.fault),
            seed=args.seed,
            retry_after=args.retry_after,
            slow_seconds=args.slow_seconds,
        ),
        jpeg_as_png_rate=args.jpeg_as_png,
        realistic_sizes=args.realistic_sizes,
    )
    if args.credits is not None:
        config.credits = args.credits
    print(
        f"JourneyAPI emulator on http://{args.host}:{args.port}  "
        f"(keys accepted: {len(keys)}; set JOURNEY_BASE_URL=http://{args.host}:{args.port})",
        flush=True,
    )
    serve_forever(config, host=args.host, port=args.port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "emulator":
            return _run_emulator(args)
    except ValueError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
