"""``prefect-journey``: the everyday commands, beside the Prefect flows.

Each command is a thin entry point over the package; ``prefect-journey --help`` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from prefect_journey.models import ImagineRequest, ImagineResult
    from prefect_journey.storage import Destination, StoredImage

# Outside a flow run: a failed attempt's warning goes to Python logging (stderr).
_LOGGER = logging.getLogger("prefect_journey.cli")


def _fault(value: str) -> tuple[str, float]:
    kind, sep, rate = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND=RATE, got {value!r}")
    try:
        return kind.strip(), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate must be a number, got {rate!r}") from None


# What the top-level help says, as plain text (the module docstring is for the API docs).
DESCRIPTION = (
    "JourneyAPI (nano-banana-2) images from the command line: generate and store one, show "
    "the account's credits, fetch a task, price and run a campaign sheet, run the offline "
    "emulator or the webhook receiver. The key comes from $JOURNEY_API_KEY; 4 credits an image."
)


def _parser(flow_options: bool = True) -> argparse.ArgumentParser:
    """The command line's parser; ``flow_options=False`` leaves out the campaign command's
    options, which come from the flow's schema and so cost Prefect's import."""
    from prefect_journey import __version__
    from prefect_journey.models import ASPECT_RATIOS, RESOLUTIONS

    parser = argparse.ArgumentParser(prog="prefect-journey", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    imagine = commands.add_parser(
        "imagine", help="generate one image (key from $JOURNEY_API_KEY) and optionally store it"
    )
    imagine.add_argument("prompt", help="what the image should show (quote it)")
    imagine.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="URL",
        help="a reference image (https URL), repeatable, at most 14",
    )
    imagine.add_argument("--aspect-ratio", default="1:1", choices=ASPECT_RATIOS)
    imagine.add_argument("--resolution", choices=RESOLUTIONS, help="default: 1K")
    imagine.add_argument(
        "--destination",
        help="fsspec URL or folder to store the image in; checked before anything is paid",
    )
    imagine.add_argument(
        "--key-template", help="object key of the stored image (default: {task_id}.{ext})"
    )
    imagine.add_argument(
        "--json", action="store_true", help="print the result (and stored object) as JSON"
    )
    imagine.add_argument(
        "--repay-possibly-billed",
        type=int,
        default=None,
        metavar="N",
        help="times a possibly-billed failure (read timeout, 500/502/504, lost answer: the "
        "image may be made and billed already) is paid again, 0-5 (default: 1)",
    )

    commands.add_parser(
        "account", help="print the account's credits, plan and images made so far (free)"
    )
    fetch = commands.add_parser(
        "fetch",
        help="a task's status and image URL by its task id, and with --destination the "
        "image stored (free: nothing is generated)",
    )
    fetch.add_argument("task_id", help="the task id an imagine call or a webhook returned")
    fetch.add_argument("--destination", help="fsspec URL or folder to store the finished image in")
    fetch.add_argument(
        "--key-template", help="object key of the stored image (default: {task_id}.{ext})"
    )
    campaign = commands.add_parser(
        "campaign",
        help="check, price and run a campaign sheet with the batch-campaign flow",
        description="Run a campaign sheet with the batch-campaign flow (a live bar on a "
        "terminal), or with --dry-run check and price it without a call. The options are "
        "the flow's parameters.",
    )
    campaign.add_argument("sheet", help="a .csv or .jsonl file, local or any fsspec URL")
    campaign.add_argument(
        "--dry-run",
        action="store_true",
        help="check every row, the destination, the blocks and the budget, look up what "
        "earlier runs made and print the price; no call, nothing stored",
    )
    if flow_options:
        _add_flow_options(campaign)
    commands.add_parser(
        "new-secret",
        help="print a new webhook secret (64 random hex digits) for JOURNEY_WEBHOOK_SECRET",
    )
    webhooks = commands.add_parser(
        "webhooks", help="receive JourneyAPI webhooks and emit Prefect events"
    )
    webhooks.add_argument("--host", default="127.0.0.1")
    webhooks.add_argument("--port", type=int, default=8780)
    return parser


# The campaign command's options are the flow's parameters, read from the schema Prefect
# builds for a deployment's form, so the command and the flow cannot drift apart.
_FLOW_INPUTS = ("items", "source")  # the sheet is the command's positional argument
_OPTION_TYPES: dict[str, tuple[type, str]] = {
    "string": (str, "TEXT"),
    "integer": (int, "N"),
    "number": (float, "NUMBER"),
}


def _add_flow_options(parser: argparse.ArgumentParser) -> None:
    from prefect_journey.flows.campaign import batch_campaign

    properties = batch_campaign.parameters.model_dump()["properties"]
    for name, spec in properties.items():
        if name in _FLOW_INPUTS:
            continue
        kinds = [s["type"] for s in spec.get("anyOf", [spec]) if s.get("type") != "null"]
        text = " ".join(str(spec.get("description", "")).replace("``", "").split())
        default = spec.get("default")
        if default not in (None, "", False) and "default" not in text:
            text += f" (default: {default})"
        flag = "--" + name.replace("_", "-")
        help_text = text.replace("%", "%%")
        if kinds == ["boolean"]:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            kind, metavar = _OPTION_TYPES[kinds[0]]
            parser.add_argument(flag, type=kind, default=None, metavar=metavar, help=help_text)


def _flow_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flow parameters given on the command line; the rest keep the flow's defaults."""
    from prefect_journey.flows.campaign import batch_campaign

    names = set(batch_campaign.parameters.properties) - set(_FLOW_INPUTS)
    return {
        name: value for name, value in vars(args).items() if name in names and value is not None
    }


def _run_imagine(args: argparse.Namespace) -> int:
    from prefect_journey import policy
    from prefect_journey.errors import JourneyError
    from prefect_journey.models import ImagineRequest

    key_template = args.key_template or _default_key()
    repay = args.repay_possibly_billed
    # The flows' default: a command-line call is a user's call, not a library's.
    repay = policy.check_repay_possibly_billed(
        policy.DEFAULT_REPAY_POSSIBLY_BILLED if repay is None else repay
    )
    destination = _checked_destination(args.destination, key_template)  # before paying
    request = ImagineRequest(
        prompt=args.prompt,
        image_urls=args.reference,
        aspect_ratio=args.aspect_ratio,
        resolution=args.resolution,
    )
    # Progress goes to stderr, and only to a terminal: stdout stays the result alone.
    console = Console(stderr=True)
    shown = console.is_terminal and not args.json
    with _working(console, "generating", shown):
        result = asyncio.run(_generate(request, repay))
    stored = None
    if destination is not None:
        with _working(console, "storing", shown):
            try:
                stored = asyncio.run(
                    _store(result.image_url, result.task_id, destination, key_template)
                )
            except JourneyError:
                # The image is paid for: say where it is, so it is not bought again.
                print(
                    f"the image was generated (task {result.task_id}, "
                    f"{result.credits_charged} credits) but not stored; it stays at "
                    f"{result.image_url} for 14 days (prefect-journey fetch {result.task_id})",
                    file=sys.stderr,
                )
                raise
    if args.json:
        output: dict[str, object] = {"result": result.model_dump()}
        if stored is not None:
            output["stored"] = stored.model_dump()
        print(json.dumps(output, indent=2))
    else:
        print(_summary(result, stored))
    return 0


async def _generate(request: ImagineRequest, repay: int) -> ImagineResult:
    """The paid generation every path of the package makes (same gate, retry rule and
    ``Retry-After`` handling), without a budget, a concurrency limit or recovery."""
    from prefect_journey.client import AsyncJourneyClient
    from prefect_journey.generation import PaidCalls, generate

    async with AsyncJourneyClient(max_retries=0) as api:
        calls = PaidCalls(api, repay_possibly_billed=repay)
        return await generate(request, calls, key="", logger=_LOGGER)


async def _store(
    image_url: str, task_id: str, destination: Destination, key_template: str
) -> StoredImage:
    from prefect_journey.retrying import store_with_retries

    return await store_with_retries(
        image_url, destination, logger=_LOGGER, task_id=task_id, key_template=key_template
    )


@contextmanager
def _working(console: Console, what: str, shown: bool) -> Iterator[None]:
    """A spinner with the time elapsed while ``what`` runs (a generation takes 30-60 s with
    nothing to show), when ``shown``; else nothing."""
    if not shown:
        yield
        return
    columns = (SpinnerColumn(), TextColumn(f"{what}…"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task(what, total=None)
        yield


def _summary(result: ImagineResult, stored: StoredImage | None) -> str:
    """What a person reads after ``imagine``: where the image is, its size, what it cost."""
    lines = [
        f"image ready in {result.elapsed_seconds:.1f} s: task {result.task_id}, "
        f"{result.credits_charged} credits"
    ]
    if stored is None:
        lines.append(f"at {result.image_url} (the provider keeps it for 14 days)")
    else:
        size = f"{stored.bytes / 1e6:.1f} MB" if stored.bytes >= 100_000 else f"{stored.bytes} B"
        lines.append(
            f"stored at {stored.uri} ({stored.format}, {stored.width}x{stored.height}, {size})"
        )
    return "\n".join(lines)


def _run_account(args: argparse.Namespace) -> int:
    from prefect_journey.client import JourneyClient
    from prefect_journey.models import CREDITS_PER_IMAGE

    with JourneyClient() as client:
        account = client.account()
    print(f"{account.credits} credits ({account.credits // CREDITS_PER_IMAGE} images)")
    print(f"plan: {account.plan or 'not reported'}; images made: {account.total_images}")
    print(f"account: {account.email}")
    return 0


def _run_fetch(args: argparse.Namespace) -> int:
    from prefect_journey.client import JourneyClient
    from prefect_journey.errors import JourneyValidationError

    destination = _checked_destination(args.destination, args.key_template)
    with JourneyClient() as client:
        task = client.fetch(args.task_id)
    if destination is None:
        print(json.dumps(task.model_dump(mode="json"), indent=2))
        return 0
    if task.image_url is None:
        raise JourneyValidationError(
            f"task {task.task_id} is {task.status}, not finished: nothing to store yet"
        )
    console = Console(stderr=True)
    with _working(console, "storing", console.is_terminal):
        stored = asyncio.run(
            _store(task.image_url, task.task_id, destination, args.key_template or _default_key())
        )
    print(f"stored at {stored.uri} ({stored.format}, {stored.width}x{stored.height})")
    return 0


def _default_key() -> str:
    from prefect_journey.storage import DEFAULT_KEY_TEMPLATE

    return DEFAULT_KEY_TEMPLATE


def _checked_destination(url: str | None, key_template: str | None) -> Destination | None:
    """The destination named on the command line, checked writable and with a usable key
    template before anything is fetched or paid for; None when none is named."""
    from prefect_journey.storage import Destination, render_key

    if not url:
        return None
    destination = Destination(url)
    destination.check()  # the folder is writable, the bucket exists
    render_key(key_template or _default_key(), {"task_id": "task", "ext": "png"})
    return destination


def _run_campaign(args: argparse.Namespace) -> int:
    from prefect_journey.flows.campaign import batch_campaign, price_campaign

    options = _flow_options(args)
    if args.dry_run:
        accepted = inspect.signature(price_campaign).parameters
        quote = price_campaign(
            source=args.sheet, **{k: v for k, v in options.items() if k in accepted}
        )
        print(quote.summary())
        print("dry run: no call made, nothing stored (the account's balance is read by the run)")
        return 0
    report = batch_campaign(source=args.sheet, **options)
    print(report.ledger_line())
    return 0


def _run_webhooks(args: argparse.Namespace) -> int:
    import uvicorn

    from prefect_journey import settings
    from prefect_journey.webhooks import WEBHOOK_PATH, create_webhook_app

    app = create_webhook_app(settings.webhook_secret())
    print(
        f"JourneyAPI webhook receiver on http://{args.host}:{args.port}{WEBHOOK_PATH}", flush=True
    )
    # No access log: a delivery's path carries its attempt's token, which is never logged;
    # the receiver logs each delivery itself, naming the task.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


def _run_new_secret(args: argparse.Namespace) -> int:
    from prefect_journey.signing import new_secret

    print(new_secret())
    return 0


def _run_emulator(args: argparse.Namespace) -> int:
    from prefect_journey import settings
    from prefect_journey.emulator import (
        DEFAULT_API_KEY,
        EmulatorConfig,
        FaultPlan,
        LatencyModel,
        serve_forever,
    )

    keys = tuple(args.api_key or [settings.api_key() or DEFAULT_API_KEY])
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


_COMMANDS = {
    "account": _run_account,
    "campaign": _run_campaign,
    "emulator": _run_emulator,
    "fetch": _run_fetch,
    "imagine": _run_imagine,
    "new-secret": _run_new_secret,
    "webhooks": _run_webhooks,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``prefect-journey`` command.

    Args:
        argv: The arguments; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 done, 1 the API or the store failed, 2 bad input or configuration.
    """
    from prefect_journey.errors import JourneyError, failure_text

    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the campaign command needs Prefect to parse its options; the others start fast.
    parser = _parser(flow_options="campaign" in argv)
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except JourneyError as exc:
        # Our messages never carry secrets; the traceback is not needed to act on them.
        print(f"error: {failure_text(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except ValueError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
