"""A live progress line for a training job, drawn from its status (client, CLI and devnet).

It refreshes only when told to (no drawing thread), so it fits trio code and
plain loops alike; on a terminal it redraws in place, elsewhere it stays quiet
and the caller prints a summary at the end.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def describe(status: dict[str, Any]) -> str:
    """One line of what matters while a job trains: round, holdout score, work, money."""
    parts = [f"round {status['round']}/{status['max_rounds']}"]
    if status.get("accuracy") is not None:
        parts.append(f"accuracy {status['accuracy']:.3f}")
    elif status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.4f}")
    parts.append(f"{status['calculations_accepted']} verified")
    parts.append(f"{status['verified_per_s']:.2f}/s")
    if status.get("spent") is not None:
        parts.append(f"{status['spent']} RAVEN spent")
    if status.get("state") not in (None, "running"):
        parts.append(str(status["state"]))
    return " · ".join(parts)


class JobProgress:
    """`with JobProgress(name) as bar: bar.update(status)` while a job runs."""

    def __init__(self, title: str, console: Console | None = None) -> None:
        # Off a terminal (a log), one full line at the end rather than one cut at 80 columns.
        self._console = console or Console(file=sys.stderr,
                                           width=None if sys.stderr.isatty() else 200)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self._console,
            auto_refresh=False,
            transient=False,
        )
        self._task = self._progress.add_task(title, total=None, detail="starting")

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._progress.refresh()
        self._progress.stop()

    def note(self, detail: str) -> None:
        """Show a phase (preparing, settling, ...) before rounds start."""
        self._progress.update(self._task, detail=detail)
        self._progress.refresh()

    def update(self, status: dict[str, Any]) -> None:
        """Redraw from a job status (`JobHandle.status()` or `ravenp2p status --json`)."""
        ended = status.get("state") not in ("running", "cancelling")
        done = status["max_rounds"] if ended else status["round"]
        self._progress.update(self._task, total=status["max_rounds"], completed=done,
                              detail=describe(status))
        self._progress.refresh()
