"""Bad input everywhere: a typed error a user can act on, and not one paid call.

Each case returns (what failed, its message); the emulator's ledger must show no API call
afterwards. The last group, malformed server answers, are errors too, never a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefect_journey import ImageDestination, JourneyCredentials
from prefect_journey.client import JourneyClient
from prefect_journey.emulator import EmulatorServer
from prefect_journey.errors import JourneyError, MalformedResponseError, TaskFailedError
from prefect_journey.flows.campaign import batch_campaign
from prefect_journey.flows.character_series import character_series
from prefect_journey.flows.generate_and_store import generate_and_store
from prefect_journey.models import ImagineResult
from prefect_journey.storage import Destination, store_image
from prefect_journey.tasks import imagine, presign_references
from prefect_journey.tasks import store_image as store_task

ROOT = Path(__file__).resolve().parent.parent
Outcome = tuple[str, str]


def raises(action: Callable[[], Any]) -> Outcome:
    try:
        action()
    except Exception as error:
        return type(error).__name__, str(error)
    raise AssertionError("no error raised")


def flow_fails(flow: Any, *args: Any, **kwargs: Any) -> Outcome:
    state = flow(*args, return_state=True, **kwargs)
    assert state.is_failed()
    return "Failed", str(state.message)


def cli(*args: str, **env: str) -> Outcome:
    done = subprocess.run(
        [sys.executable, "-m", "prefect_journey.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    return f"exit {done.returncode}", done.stderr


def client(emulator: EmulatorServer, **options: Any) -> JourneyClient:
    return JourneyClient(emulator.api_key, base_url=emulator.url, **options)


# A presigned-looking reference on the cloud metadata address: refused, its signature unsaid.
METADATA_REF = "https://169.254.169.254/latest/a.png?X-Amz-Signature=sig"


def refs(n: int) -> list[str]:
    return [f"https://a.example/{i}.png" for i in range(n)]


def csv(tmp: Path, text: str) -> str:
    path = tmp / "campaign.csv"
    path.write_text(text)
    return str(path)


def campaign_row_57(n: int = 60) -> list[dict[str, str]]:
    rows = [{"prompt": f"item {i}"} for i in range(n)]
    rows[56]["aspect_ratio"] = "5:4"
    return rows


def imagine_directly(**fields: Any) -> Outcome:
    with JourneyClient("k", base_url="http://127.0.0.1:9") as c:
        return raises(lambda: c.imagine(**fields))


E = EmulatorServer
A_RESULT = ImagineResult(
    task_id="t",
    status="finished",
    image_url="https://c.example/t.png",
    elapsed_seconds=1,
    credits_charged=4,
)
CASES: list[tuple[str, Callable[[E, Path], Outcome], str, str]] = [
    # client: request fields
    (
        "client blank prompt",
        lambda e, t: raises(lambda: client(e).imagine(prompt=" ")),
        "JourneyValidationError",
        "prompt",
    ),
    (
        "client NUL prompt",
        lambda e, t: raises(lambda: client(e).imagine(prompt="\x00")),
        "JourneyValidationError",
        "control characters",
    ),
    (
        "client terminal-escape prompt",
        lambda e, t: raises(lambda: client(e).imagine(prompt="\x1b[2J\x07")),
        "JourneyValidationError",
        "control characters",
    ),
    (
        "client carriage return in prompt",
        lambda e, t: raises(lambda: client(e).imagine(prompt="a cat\rrm -rf")),
        "JourneyValidationError",
        "control characters",
    ),
    (
        "task control characters in prompt",
        lambda e, t: flow_fails(generate_and_store, "a \x1b[31mred\x1b[0m cat", destination=str(t)),
        "Failed",
        "control characters",
    ),
    (
        "campaign private reference, a task run per image",
        lambda e, t: flow_fails(
            batch_campaign,
            items=[{"prompt": "p", "references": ["https://10.1.2.3/a.png"]}],
            destination=str(t),
        ),
        "Failed",
        "ReferenceRefusedError",
    ),
    (
        "campaign private reference, many images per task run",
        lambda e, t: flow_fails(
            batch_campaign,
            items=[{"prompt": "p", "references": ["https://[::1]/a.png"]}],
            destination=str(t),
            images_per_task_run=10,
        ),
        "Failed",
        "ReferenceRefusedError",
    ),
    (
        "campaign control characters in row 2",
        lambda e, t: flow_fails(
            batch_campaign,
            items=[{"prompt": "fine"}, {"prompt": "bell\x07"}],
            destination=str(t),
        ),
        "Failed",
        "row 2: prompt: must not contain control characters",
    ),
    (
        "client 15 references",
        lambda e, t: raises(lambda: client(e).imagine(prompt="p", image_urls=refs(15))),
        "JourneyValidationError",
        "at most 14",
    ),
    (
        "client ftp reference",
        lambda e, t: raises(lambda: client(e).imagine(prompt="p", image_urls=["ftp://h/a.png"])),
        "JourneyValidationError",
        "http or https",
    ),
    (
        "client reference on the metadata address",
        lambda e, t: raises(lambda: client(e).imagine(prompt="p", image_urls=[METADATA_REF])),
        "ReferenceRefusedError",
        "169.254.169.254:443 resolves to 169.254.169.254, which is not a public address",
    ),
    (
        "client ratio 5:4",
        lambda e, t: raises(lambda: client(e).imagine(prompt="p", aspect_ratio="5:4")),
        "JourneyValidationError",
        "aspect_ratio",
    ),
    (
        "client resolution 8K",
        lambda e, t: raises(lambda: client(e).imagine(prompt="p", resolution="8K")),
        "JourneyValidationError",
        "resolution",
    ),
    (
        "client secret without url",
        lambda e, t: raises(lambda: client(e).imagine(prompt="p", webhook_secret="s")),
        "JourneyValidationError",
        "webhook_url",
    ),
    (
        "client http webhook",
        lambda e, t: raises(
            lambda: client(e).imagine(prompt="p", webhook_url="http://h.example/x")
        ),
        "JourneyValidationError",
        "https",
    ),
    (
        "client other model",
        lambda e, t: raises(lambda: client(e).imagine(prompt="p", model="midjourney")),
        "JourneyValidationError",
        "model",
    ),
    (
        "client request and fields",
        lambda e, t: raises(
            lambda: client(e).imagine(
                __import__("prefect_journey").ImagineRequest(prompt="p"), prompt="q"
            )
        ),
        "JourneyValidationError",
        "not both",
    ),
    (
        "client blank task id",
        lambda e, t: raises(lambda: client(e).fetch(" ")),
        "JourneyValidationError",
        "task_id",
    ),
    # client: configuration
    (
        "client no key",
        lambda e, t: raises(lambda: JourneyClient(api_key="")),
        "ConfigurationError",
        "JOURNEY_API_KEY",
    ),
    (
        "client key with newline",
        lambda e, t: raises(lambda: JourneyClient(api_key="k\n")),
        "ConfigurationError",
        "newline",
    ),
    (
        "client http remote base url",
        lambda e, t: raises(lambda: JourneyClient("k", base_url="http://api.example.com")),
        "ConfigurationError",
        "https",
    ),
    (
        "client negative retries",
        lambda e, t: raises(lambda: JourneyClient("k", max_retries=-1)),
        "ConfigurationError",
        "max_retries",
    ),
    (
        "client zero read timeout",
        lambda e, t: raises(lambda: JourneyClient("k", read_timeout=0)),
        "ConfigurationError",
        "read_timeout",
    ),
    # blocks
    (
        "block blank key",
        lambda e, t: raises(lambda: JourneyCredentials(api_key=" ").get_client()),
        "ConfigurationError",
        "key",
    ),
    (
        "block http base url",
        lambda e, t: raises(
            lambda: JourneyCredentials(api_key="k", base_url="http://x.example").get_client()
        ),
        "ConfigurationError",
        "https",
    ),
    (
        "block blank destination",
        lambda e, t: raises(lambda: ImageDestination(url=" ").as_destination()),
        "JourneyValidationError",
        "destination",
    ),
    # tasks (their plain functions)
    (
        "task request of wrong type",
        lambda e, t: raises(lambda: imagine.fn(42)),
        "JourneyValidationError",
        "ImagineRequest or a mapping",
    ),
    (
        "task request mapping 5:4",
        lambda e, t: raises(lambda: imagine.fn({"prompt": "p", "aspect_ratio": "5:4"})),
        "JourneyValidationError",
        "aspect_ratio",
    ),
    (
        "task variant too long",
        lambda e, t: raises(lambda: imagine.fn({"prompt": "p"}, variant="v" * 201)),
        "JourneyValidationError",
        "variant",
    ),
    (
        "task repays past the ladder",
        lambda e, t: raises(lambda: imagine.fn({"prompt": "p"}, repay_possibly_billed=6)),
        "JourneyValidationError",
        "repay_possibly_billed must be a whole number from 0 to 5",
    ),
    (
        "client repays of a bool",
        lambda e, t: raises(lambda: client(e, repay_possibly_billed=True)),
        "JourneyValidationError",
        "repay_possibly_billed",
    ),
    (
        "flow negative repays",
        lambda e, t: flow_fails(
            generate_and_store, "p", destination=str(t), repay_possibly_billed=-1
        ),
        "Failed",
        "repay_possibly_billed",
    ),
    (
        "series repays past the ladder",
        lambda e, t: flow_fails(
            character_series, [], ["a scene"], destination=str(t), repay_possibly_billed=9
        ),
        "Failed",
        "repay_possibly_billed",
    ),
    (
        "campaign repays past the ladder",
        lambda e, t: flow_fails(
            batch_campaign, items=[{"prompt": "p"}], destination=str(t), repay_possibly_billed=6
        ),
        "Failed",
        "repay_possibly_billed",
    ),
    (
        "task 15 references to presign",
        lambda e, t: raises(lambda: presign_references.fn(refs(15))),
        "JourneyValidationError",
        "at most 14",
    ),
    # storage: destinations, keys, options
    (
        "store unsafe key",
        lambda e, t: raises(
            lambda: store_image(
                "https://c.example/a.png", str(t), task_id="t", key_template="../{task_id}.{ext}"
            )
        ),
        "JourneyValidationError",
        "'..'",
    ),
    (
        "store key without ext",
        lambda e, t: raises(
            lambda: store_image(
                "https://c.example/a.png", str(t), task_id="t", key_template="{task_id}"
            )
        ),
        "JourneyValidationError",
        "{ext}",
    ),
    (
        "store zero size cap",
        lambda e, t: raises(
            lambda: store_image("https://c.example/a.png", str(t), task_id="t", max_bytes=0)
        ),
        "JourneyValidationError",
        "max_bytes",
    ),
    (
        "store http image url",
        lambda e, t: raises(lambda: store_image("http://c.example/a.png", str(t), task_id="t")),
        "DownloadRefusedError",
        "https",
    ),
    (
        "store image url on the metadata address",
        lambda e, t: raises(
            lambda: store_image("https://169.254.169.254/a.png", str(t), task_id="t")
        ),
        "DownloadRefusedError",
        "not a public address",
    ),
    (
        "store unknown protocol",
        lambda e, t: raises(
            lambda: store_image("https://c.example/a.png", "nosuchfs://b/p", task_id="t")
        ),
        "StorageError",
        "not usable",
    ),
    (
        "store options not a mapping",
        lambda e, t: raises(lambda: Destination("s3://b", storage_options="key=x")),
        "JourneyValidationError",
        "storage_options",
    ),
    (
        "store bad s3 option",
        lambda e, t: raises(lambda: Destination("s3://b", {"no_such_option": 1}).check()),
        "StorageError",
        "not reachable",
    ),
    (
        "store unreachable s3 endpoint",
        lambda e, t: raises(
            # One attempt in all: botocore's retries of a refused connection take 13-18 s
            # and end in the same error.
            lambda: Destination(
                "s3://b",
                {
                    "endpoint_url": "http://127.0.0.1:9",
                    "key": "k",
                    "secret": "s",
                    "config_kwargs": {"retries": {"total_max_attempts": 1}},
                },
            ).check()
        ),
        "StorageError",
        "not reachable",
    ),
    (
        "flow unreachable destination",
        lambda e, t: flow_fails(generate_and_store, "p", destination="s3://no-such-bucket-xyz"),
        "Failed",
        "not reachable",
    ),
    (
        "store unsupported destination",
        lambda e, t: raises(lambda: store_task.fn(A_RESULT, 42)),
        "JourneyValidationError",
        "unsupported destination",
    ),
    # flows
    (
        "flow ratio 5:4",
        lambda e, t: flow_fails(generate_and_store, "p", destination=str(t), aspect_ratio="5:4"),
        "Failed",
        "aspect_ratio",
    ),
    (
        "flow blank prompt",
        lambda e, t: flow_fails(generate_and_store, "  ", destination=str(t)),
        "Failed",
        "prompt",
    ),
    (
        "flow 15 references",
        lambda e, t: flow_fails(generate_and_store, "p", destination=str(t), references=refs(15)),
        "Failed",
        "at most 14",
    ),
    (
        "flow resolution 8K",
        lambda e, t: flow_fails(generate_and_store, "p", destination=str(t), resolution="8K"),
        "Failed",
        "resolution",
    ),
    (
        "flow unknown credentials block",
        lambda e, t: flow_fails(
            generate_and_store, "p", destination=str(t), credentials_block="no-such-block"
        ),
        "Failed",
        "no-such-block",
    ),
    (
        "series without scenes",
        lambda e, t: flow_fails(
            character_series, ["https://a.example/a.png"], [], destination=str(t)
        ),
        "Failed",
        "at least one scene",
    ),
    (
        "campaign row 57",
        lambda e, t: flow_fails(batch_campaign, items=campaign_row_57(), destination=str(t)),
        "Failed",
        "row 57: aspect_ratio",
    ),
    (
        "campaign missing prompt column",
        lambda e, t: flow_fails(batch_campaign, source=csv(t, "text\nhi\n"), destination=str(t)),
        "Failed",
        "no 'prompt' column",
    ),
    (
        "campaign key escapes prefix",
        lambda e, t: flow_fails(
            batch_campaign,
            items=[{"prompt": "a"}],
            key_template="../{slug}.{ext}",
            destination=str(t),
        ),
        "Failed",
        "'..'",
    ),
    (
        "campaign items and source",
        lambda e, t: flow_fails(batch_campaign, items=[{"prompt": "a"}], source="x.csv"),
        "Failed",
        "either items or source",
    ),
    (
        "campaign zero concurrency",
        lambda e, t: flow_fails(
            batch_campaign, items=[{"prompt": "a"}], max_concurrency=0, destination=str(t)
        ),
        "Failed",
        "max_concurrency",
    ),
    (
        "campaign negative pause",
        lambda e, t: flow_fails(
            batch_campaign, items=[{"prompt": "a"}], max_pause=-1, destination=str(t)
        ),
        "Failed",
        "max_pause",
    ),
    (
        "campaign file is not a campaign",
        lambda e, t: flow_fails(batch_campaign, source=str(t / "notes.txt")),
        "Failed",
        ".csv or .jsonl",
    ),
    # the command line
    ("cli blank prompt", lambda e, t: cli("imagine", " "), "exit 2", "prompt"),
    (
        "cli repays past the ladder",
        lambda e, t: cli("imagine", "p", "--repay-possibly-billed", "6"),
        "exit 2",
        "repay_possibly_billed",
    ),
    (
        "cli ratio 5:4",
        lambda e, t: cli("imagine", "p", "--aspect-ratio", "5:4"),
        "exit 2",
        "--aspect-ratio: invalid choice",
    ),
    (
        "cli ftp reference",
        lambda e, t: cli("imagine", "p", "--reference", "ftp://h/a.png"),
        "exit 2",
        "http or https",
    ),
    (
        "cli private reference",
        lambda e, t: cli("imagine", "p", "--reference", "https://10.1.2.3/a.png"),
        "exit 2",
        "10.1.2.3, which is not a public address",
    ),
    (
        "cli unsafe key template",
        lambda e, t: cli(
            "imagine",
            "p",
            "--destination",
            str(t),
            "--key-template",
            "../{task_id}.{ext}",
        ),
        "exit 2",
        "'..'",
    ),
    (
        "cli no api key",
        lambda e, t: cli("imagine", "p", JOURNEY_API_KEY=""),
        "exit 2",
        "JOURNEY_API_KEY",
    ),
    (
        "cli unknown fault",
        lambda e, t: cli("emulator", "--fault", "teapot=0.1"),
        "exit 2",
        "unknown fault",
    ),
    (
        "cli fault without rate",
        lambda e, t: cli("emulator", "--fault", "429"),
        "exit 2",
        "KIND=RATE",
    ),
]


def test_the_matrix_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(("name", "case", "kind", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_before_any_call(
    journey_env: EmulatorServer,
    tmp_path: Path,
    name: str,
    case: Callable[[E, Path], Outcome],
    kind: str,
    fragment: str,
) -> None:
    """The flow and task cases each run a flow, with Prefect's per-run start-up, until it
    fails."""
    what, message = case(journey_env, tmp_path)
    assert what == kind, message
    assert fragment in message
    assert journey_env.ledger()["calls"].get("imagine", 0) == 0


MALFORMED = [
    ("not json", httpx.Response(200, text="<html>oops</html>"), MalformedResponseError),
    ("json array", httpx.Response(200, json=[1, 2]), MalformedResponseError),
    (
        "missing image_url",
        httpx.Response(200, json={"task_id": "t", "status": "finished"}),
        MalformedResponseError,
    ),
    (
        "ftp image_url",
        httpx.Response(
            200, json={"task_id": "t", "status": "finished", "image_url": "ftp://x/a.png"}
        ),
        MalformedResponseError,
    ),
    (
        "unknown status",
        httpx.Response(200, json={"task_id": "t", "status": "exploded"}),
        MalformedResponseError,
    ),
    (
        "failed task",
        httpx.Response(
            200, json={"task_id": "t", "status": "failed", "error": "Content policy violation"}
        ),
        TaskFailedError,
    ),
]


@pytest.mark.parametrize(("name", "answer", "error"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_answers_are_typed_errors(
    name: str, answer: httpx.Response, error: type[JourneyError]
) -> None:
    with JourneyClient("k", transport=httpx.MockTransport(lambda request: answer)) as c:
        with pytest.raises(error):
            c.imagine(prompt="p")


def test_tab_and_newline_are_kept_and_what_reaches_the_ui_prints() -> None:
    from prefect_journey.models import ImagineRequest, display_text

    request = ImagineRequest(prompt="line one\n\tline two")
    assert request.prompt == "line one\n\tline two"  # sent as written
    shown = display_text("a\u202eb\x7f\x85 c\n\td", 80)
    assert shown == "a\\u202eb\\x7f c d" and shown.isprintable()
