"""How commands print: JSON for machines, rich tables and progress for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def print_json(value: Any) -> None:
    """One JSON document on stdout (what `--json` promises)."""
    print(json.dumps(value, indent=2))


def console() -> Console:
    """stdout for people; plain text when it is not a terminal (a pipe, a log file), with
    lines as long as they need to be there rather than cut at 80 columns."""
    width = None if sys.stdout.isatty() else 400
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width)


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
    right: Iterable[str] = (),
) -> None:
    """A table with one header row; the `right` columns are right-aligned (numbers)."""
    aligned = set(right)
    table = Table(title=title, title_justify="left", box=None, header_style="bold",
                  pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in aligned else "left",
                         no_wrap=True)
    for row in rows:
        table.add_row(*("-" if value is None else str(value) for value in row))
    console().print(table)
