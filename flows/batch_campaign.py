"""Run a campaign sheet from the command line, with the package's campaign flow.

    python flows/batch_campaign.py campaign.csv --campaign spring --max-credits 400

Copy it and change what you need: everything it uses comes from ``prefect_journey``.
"""

from __future__ import annotations

import argparse

from prefect_journey.flows import batch_campaign


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate and store a campaign sheet.")
    parser.add_argument("source", help="a .csv or .jsonl file (local path or fsspec URL)")
    parser.add_argument("--campaign", default="campaign")
    parser.add_argument("--destination", help="fsspec URL or folder (default ./outputs)")
    parser.add_argument("--max-credits", type=int)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument(
        "--images-per-task-run",
        type=int,
        help="images per task run (default: chosen from --max-concurrency)",
    )
    parser.add_argument(
        "--repay-possibly-billed",
        type=int,
        metavar="N",
        help="times an image's possibly-billed failure is paid again, 0-5 (default: the flow's, 1)",
    )
    args = parser.parse_args()
    repay = args.repay_possibly_billed
    report = batch_campaign(
        source=args.source,
        campaign=args.campaign,
        destination=args.destination,
        max_credits=args.max_credits,
        max_concurrency=args.max_concurrency,
        images_per_task_run=args.images_per_task_run,
        **({} if repay is None else {"repay_possibly_billed": repay}),
    )
    print(report.ledger_line())


if __name__ == "__main__":
    main()
