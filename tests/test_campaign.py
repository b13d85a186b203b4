"""Campaign input and the credit budget, without Prefect."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from prefect_journey.budget import BudgetExceededError, CreditBudget
from prefect_journey.campaigns.plan import CampaignError, plan_items, read_items
from prefect_journey.errors import ServerError, ServiceUnavailableError


def rows(n: int) -> list[dict[str, object]]:
    return [{"prompt": f"product shot {i}", "sku": f"SKU-{i}"} for i in range(1, n + 1)]


def test_csv_and_jsonl_give_the_same_items(tmp_path: Path) -> None:
    csv_file = tmp_path / "c.csv"
    csv_file.write_text(
        "prompt,references,aspect_ratio,resolution,sku\n"
        "a cat,https://a.example/1.png|https://a.example/2.png,16:9,2K,A-1\n"
        '"a dog, running",,,,B/2\n'
    )
    jsonl_file = tmp_path / "c.jsonl"
    jsonl_file.write_text(
        json.dumps(
            {
                "prompt": "a cat",
                "references": ["https://a.example/1.png", "https://a.example/2.png"],
                "aspect_ratio": "16:9",
                "resolution": "2K",
                "sku": "A-1",
            }
        )
        + "\n\n"
        + json.dumps({"prompt": "a dog, running", "sku": "B/2"})
        + "\n"
    )
    plans = [
        plan_items(
            read_items(str(f)),
            campaign="Spring Sale",
            key_template="{campaign}/{sku}-{index:03d}.{ext}",
        )
        for f in (csv_file, jsonl_file)
    ]
    assert plans[0] == plans[1]
    first, second = plans[0]
    assert first.request.image_urls == ("https://a.example/1.png", "https://a.example/2.png")
    assert first.key_fields == {
        "sku": "a-1",
        "campaign": "spring-sale",
        "index": 1,
        "slug": "a-cat",
    }
    assert second.request.aspect_ratio == "1:1" and second.request.resolution is None
    assert second.key_fields["sku"] == "b-2"


def test_missing_prompt_column(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("text,sku\nhello,1\n")
    with pytest.raises(CampaignError, match="no 'prompt' column"):
        read_items(str(f))


def test_every_bad_row_is_reported_with_its_number() -> None:
    items = rows(80)
    items[56]["aspect_ratio"] = "5:4"  # row 57
    items[9]["prompt"] = "   "  # row 10
    items[69]["references"] = ["ftp://x.example/a.png"]  # row 70
    with pytest.raises(CampaignError) as caught:
        plan_items(items, campaign="c")
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["row 10", "row 57", "row 70"]
    assert "aspect_ratio" in problems[1] and "row 57" in str(caught.value)


def test_key_template_escaping_its_prefix_is_refused() -> None:
    with pytest.raises(CampaignError, match=r"row 1: object key '\.\./x"):
        plan_items(rows(3), campaign="c", key_template="../x-{index}.{ext}")


def test_colliding_keys_are_refused() -> None:
    with pytest.raises(CampaignError, match="repeats row 1"):
        plan_items(
            [{"prompt": "same"}, {"prompt": "same"}], campaign="c", key_template="{slug}.{ext}"
        )


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ('{"prompt": "a"}\nnot json\n', "c.jsonl", "line 2: not JSON"),
        ('["a list"]\n', "c.jsonl", "expected an object"),
        ("prompt\na\n", "c.txt", "must end with .csv or .jsonl"),
        ("prompt,sku\na,1,extra\n", "c.csv", "more cells than columns"),
        ("", "c.csv", "no 'prompt' column"),
    ],
)
def test_malformed_campaign_files(tmp_path: Path, content: str, name: str, message: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(CampaignError, match=message):
        plan_items(read_items(str(f)), campaign="c")


def test_reserved_fields_and_empty_campaigns() -> None:
    with pytest.raises(CampaignError, match="reserved"):
        plan_items([{"prompt": "a", "index": 3}], campaign="c")
    with pytest.raises(CampaignError, match="no items"):
        plan_items([], campaign="c")


@pytest.fixture(params=["file", "redis"])
def ledger(request: pytest.FixtureRequest) -> str:
    """Where the campaigns' budgets live: a file per budget (one machine), or with
    ``JOURNEY_REDIS_URL`` the session's Redis (several machines); the same promises."""
    if request.param == "redis":
        request.getfixturevalue("redis_env")
    return str(request.param)


def test_budget_counts_spent_in_flight_and_refunds(ledger: str) -> None:
    budget = CreditBudget.for_campaign("b", limit=12)
    assert budget.path.startswith("redis:") == (ledger == "redis")
    with budget.attempt():
        pass
    with pytest.raises(ServiceUnavailableError), budget.attempt():
        raise ServiceUnavailableError("503")  # not billed: given back
    with pytest.raises(ServerError), budget.attempt():
        raise ServerError("500")  # possibly billed: counted
    held = budget.reserve()
    with pytest.raises(BudgetExceededError, match="max_credits=12"):
        budget.reserve()
    budget.settle(held, None)
    expected = {"spent": 12, "calls": 4, "possibly_billed": 1, "refused": 1}
    assert budget.snapshot() == {**expected, "in_flight": 0, "limit": 12, "left": 0}
    assert budget.this_run == expected
    budget.recovered(billed=False)  # the 500's delivery: the provider refused the image
    assert budget.snapshot()["left"] == 4 and budget.snapshot()["possibly_billed"] == 0


def test_a_campaign_budget_outlives_its_runs_and_a_killed_reservation_counts_after_its_lease(
    ledger: str,
) -> None:
    first = CreditBudget.for_campaign("Spring 2027", limit=12)
    with first.attempt():
        pass
    first.reserve(lease=0.0)  # its process was killed with the call in flight
    again = CreditBudget.for_campaign("Spring 2027", limit=12)
    assert again.path == first.path and again.this_run["calls"] == 0
    # The lease has passed: spent and possibly billed, unless a delivery proves otherwise.
    assert again.snapshot() == {
        "spent": 8,
        "calls": 2,
        "possibly_billed": 1,
        "refused": 0,
        "in_flight": 0,
        "limit": 12,
        "left": 4,
    }
    with again.attempt():
        pass
    with pytest.raises(BudgetExceededError, match="12"), again.attempt():
        pass
    assert CreditBudget.for_campaign("other", limit=12).snapshot()["left"] == 12


def test_the_budget_file_stays_whole_as_its_state_shrinks(tmp_path: Path) -> None:
    # Updates overwrite the file in place: a shorter state must not leave old bytes behind.
    path = tmp_path / "b.json"
    budget = CreditBudget.create(path)
    held = [budget.reserve() for _ in range(3)]  # 12 credits in flight
    for reservation in held:
        budget.settle(reservation, ServiceUnavailableError("503"))  # given back
    assert json.loads(path.read_text()) == {
        "spent": 0,
        "calls": 3,
        "possibly_billed": 0,
        "refused": 0,
        "reservations": {},
    }


def _hammer(path: str) -> int:
    budget = CreditBudget(path, limit=200)
    started = 0
    for _ in range(40):
        try:
            with budget.attempt():
                started += 1
        except BudgetExceededError:
            pass
    return started


def test_budget_is_exact_across_processes_and_threads(ledger: str) -> None:
    """Four spawned processes (each its own machine, as far as a Redis budget can tell) and
    four threads take 320 attempts at a 50-attempt budget: exactly 50 start. Over 5 s on a
    busy machine: each process imports the package."""
    budget = CreditBudget.for_campaign("shared", limit=200)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        in_processes = pool.map_async(_hammer, [budget.path] * 4)
        in_threads: list[int] = []
        threads = [
            threading.Thread(target=lambda: in_threads.append(_hammer(budget.path)))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        started = sum(in_processes.get(timeout=120)) + sum(in_threads)
    snapshot = budget.snapshot()
    assert started == 50 and snapshot["spent"] == 200 and snapshot["calls"] == 50
    assert snapshot["refused"] == 320 - 50
