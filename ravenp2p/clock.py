"""The `Clock` interface: wall time for signatures and records, and sleeping.

Roles take a `Clock` instead of calling `time.time()` so the simulator can run
them in virtual time under trio's MockClock.
"""

from __future__ import annotations

import time
from typing import Protocol

import trio


class Clock(Protocol):
    """Seconds since the Unix epoch, and a way to wait."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The machine's clock; what the daemon uses."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class TrioClock:
    """Unix time derived from trio's clock, so it follows a MockClock in simulations."""

    def __init__(self, epoch: float = 1_700_000_000.0) -> None:
        self._offset = epoch - trio.current_time()

    def now(self) -> float:
        return self._offset + trio.current_time()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)
