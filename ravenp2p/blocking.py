"""Blocking work (torch, hashing, disk) off the event loop, or inline in a simulation.

The daemon runs such work in a worker thread so the node keeps answering its
peers. The simulator runs thousands of nodes in virtual time: a thread would
let trio's MockClock jump while it computes, so results would depend on how
fast this machine happens to be. Inside `inline_blocking_calls()` the same
calls run in the calling task instead and take no virtual time; the simulator
charges compute time from its cost model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import trio

T = TypeVar("T")

_INLINE: ContextVar[bool] = ContextVar("ravenp2p_inline_blocking_calls", default=False)


async def run_blocking(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a worker thread (`trio.to_thread`), or inline in a simulation."""
    if _INLINE.get():
        await trio.lowlevel.checkpoint()
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


def runs_inline() -> bool:
    """Whether blocking calls run inline here (inside a simulation)."""
    return _INLINE.get()


@contextmanager
def inline_blocking_calls() -> Iterator[None]:
    """Run blocking calls inline in this task and every task it starts from now on."""
    token = _INLINE.set(True)
    try:
        yield
    finally:
        _INLINE.reset(token)
