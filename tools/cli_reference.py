"""docs/cli.md, written from the command line's own parser: ``python -m tools.cli_reference``.

``tests/test_cli.py`` checks the page is what the parser says, so the reference cannot drift
from the commands.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect_journey.cli import _parser

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
# Help is wrapped to the terminal's width; the page is written at a fixed one.
WIDTH = "88"


def render() -> str:
    """The page: what the top-level help says, then each command's help."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = _parser()
        [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        lines = [
            "# Command line",
            "",
            "<!-- written by `python -m tools.cli_reference` from the parser; do not edit -->",
            "",
            "`prefect-journey` comes with the package (`pip install prefect-journey`).",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
        ]
        for name, command in commands.choices.items():
            lines += ["", f"## {name}", "", "```text", command.format_help().rstrip(), "```"]
        return "\n".join(lines) + "\n"
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


if __name__ == "__main__":
    PAGE.write_text(render())
