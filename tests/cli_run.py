"""Running the `ravenp2p` command line inside a test, and reading what it printed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ravenp2p.cli import EXIT_OK, main


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `ravenp2p ARGV...` in this process: exit code, stdout, stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """Run a command with `--json`; it must succeed, and its stdout must be one JSON document."""
    code, out, err = cli(capsys, *argv, "--json")
    assert code == EXIT_OK, err
    return json.loads(out)


def one_line_error(err: str) -> str:
    """The single error line of a failed command, without its prefix (and proof it is one)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ravenp2p: error: ") and "Traceback" not in err
    return lines[0].removeprefix("ravenp2p: error: ")
