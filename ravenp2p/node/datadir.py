"""A node's data dir: one daemon at a time holds it, and where its parts live.

Kept apart from the daemon so that commands which only need these names (the
CLI's error handling, the devnet) do not import the node's roles and torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class DataDirBusy(RuntimeError):
    """Another node is already running on this data dir."""


DEFAULT_DATA_DIR = Path.home() / ".ravenp2p"
"""Where the daemon, the CLI and the Python client keep a node's key and data by default."""
LOCK_FILE_NAME = "node.lock"
RESULTS_FOLDER = "results"
"""Where a node saves the results of the jobs it submitted (`<job id>/model.safetensors`)."""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the data dir so two daemons never share one key and socket."""
    Path(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(Path(data_dir) / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirBusy(f"another node is already running with data dir {data_dir}") from None
        yield
    finally:
        os.close(fd)
