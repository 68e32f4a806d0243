"""`run(scenario) -> Result`: one simulation, in virtual time, reproducible from its seed.

The whole world runs in one `trio.run` under a `MockClock` that jumps to the
next timer whenever every task waits, so an hour of virtual time costs only
the CPU the peers actually use. Blocking calls run inline
(`ravenp2p.blocking`), so the clock never jumps while torch computes.

Reproducibility: identities, links, stakes, shares, churn and attackers come
from the scenario's seed; the network orders its deliveries by arrival time
and message number; each node's randomness is seeded. What remains is trio's
scheduler, which shuffles the order of tasks that wake at the same instant
and breaks ties between equal deadlines by object address: `run` seeds the
first and makes the second follow creation order, for the run only.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio
import trio.testing

from ravenp2p.blocking import inline_blocking_calls
from sims.metrics import Recorder, Result
from sims.scenario import Scenario
from sims.world import World

log = logging.getLogger("ravenp2p.sims")

SETTLE_GRACE_S = 60.0
"""Virtual seconds given to payouts being claimed once every job has ended."""


@dataclass(frozen=True)
class Progress:
    """Where a running simulation is: for progress bars."""

    virtual_s: float
    duration_s: float
    wall_s: float
    accepted: int
    jobs_done: int
    jobs: int


ProgressCallback = Callable[[Progress], None]


def run(
    scenario: Scenario,
    *,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
    data_dir: Path | None = None,
) -> Result:
    """Simulate `scenario` (with `seed` instead of its own, if given) and return what it measured.

    `progress` is called after every sample. Peers keep their data (blobs,
    checkpoints) under `data_dir`, a temporary folder by default.
    """
    if seed is not None:
        scenario = scenario.with_seed(seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    with _seeded(scenario.seed), inline_blocking_calls(), _folder(data_dir) as folder:
        return trio.run(_simulate, scenario, folder, progress, clock=clock)


async def _simulate(
    scenario: Scenario, folder: Path, progress: ProgressCallback | None
) -> Result:
    _deterministic_deadlines()
    world = World(scenario, folder)
    recorder = Recorder(world)
    async with trio.open_nursery() as nursery:
        await world.populate(nursery)
        nursery.start_soon(world.churn)
        nursery.start_soon(world.crash_masters)
        nursery.start_soon(world.submit_jobs)
        nursery.start_soon(_report, recorder, progress)
        await _until_done(world, scenario)
        result = await recorder.finish()
        nursery.cancel_scope.cancel()
    return result


async def _until_done(world: World, scenario: Scenario) -> None:
    """Run until the scenario's duration, or until every job ended and payouts were claimed."""
    total_jobs = sum(entry.count for entry in scenario.jobs)
    with trio.move_on_at(scenario.duration_s):
        while True:
            await trio.sleep(scenario.sample_every_s)
            ended = [h for h in world.jobs if h.result is not None]
            if len(ended) + len(world.submit_errors) >= total_jobs and len(ended) == len(
                world.jobs
            ):
                break
        await trio.sleep(SETTLE_GRACE_S)


async def _report(recorder: Recorder, progress: ProgressCallback | None) -> None:
    every = recorder.world.scenario.sample_every_s
    while True:
        recorder.sample()
        if progress is not None:
            row = recorder.series[-1]
            progress(Progress(
                virtual_s=row["t"], duration_s=recorder.world.scenario.duration_s,
                wall_s=row["wall_s"], accepted=row["accepted"], jobs_done=row["jobs_done"],
                jobs=len(recorder.world.jobs),
            ))
        await trio.sleep(every)


@contextmanager
def _folder(data_dir: Path | None) -> Iterator[Path]:
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        yield data_dir
        return
    with tempfile.TemporaryDirectory(prefix="ravenp2p-sim-") as tmp:
        yield Path(tmp)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed every generator a library might draw from (and trio's scheduler) for the run."""
    trio_rng = _trio_scheduler_rng()
    saved: list[Any] = [random.getstate(), np.random.get_state(), torch.random.get_rng_state()]
    if trio_rng is not None:
        saved.append(trio_rng.getstate())
        trio_rng.seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])
        if trio_rng is not None:
            trio_rng.setstate(saved[3])


def _trio_scheduler_rng() -> random.Random | None:
    """The generator trio's scheduler shuffles with (private: None if this trio moved it)."""
    rng = getattr(getattr(trio, "_core", None), "_run", None)
    found = getattr(rng, "_r", None)
    return found if isinstance(found, random.Random) else None


def _deterministic_deadlines() -> None:
    """Break ties between equal deadlines by creation order instead of object address.

    trio keeps deadlines in a heap of (deadline, id(scope), scope); with a
    virtual clock many timers expire at the same instant, and addresses
    differ from run to run. This swaps the run's heap for one whose
    tie-breaker is a counter. Private API: if this trio differs, the run
    still works, only less reproducibly, and says so.
    """
    runner = getattr(trio._core._run.GLOBAL_RUN_CONTEXT, "runner", None)
    base = getattr(trio._core._run, "Deadlines", None)
    old = getattr(runner, "deadlines", None)
    if base is None or not isinstance(old, base) or not hasattr(old, "_heap"):
        log.warning("This trio version hides its deadline heap: runs may not repeat exactly")
        return
    counter = itertools.count()

    class OrderedDeadlines(base):  # type: ignore[misc, valid-type]
        def add(self, deadline: float, cancel_scope: Any) -> None:
            heapq.heappush(self._heap, (deadline, next(counter), cancel_scope))
            self._active += 1

    ordered = OrderedDeadlines()
    ordered._heap = [(d, next(counter), scope) for d, _, scope in sorted(
        old._heap, key=lambda entry: (entry[0], entry[1]))]
    ordered._active = old._active
    runner.deadlines = ordered
