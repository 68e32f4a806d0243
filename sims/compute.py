"""Compute in virtual time: the workers' calculator and the cost model behind it.

A worker in the simulator runs the daemon's `Worker` role unchanged; only its
`Calculator` differs. The daemon computes in a thread and measures wall time;
here the calculation is computed inline and charged in virtual time:

    seconds = job reference_seconds / device speed * lognormal(jitter)

`real` mode computes every worker's result with torch. `modeled` mode
computes one honest result per distinct calculation (same weights, shard,
seed and kind) and hands each worker a copy whose low bits differ the way
results of different CPUs do (relative L2 `honest_noise`, measured between
1e-8 and 4e-7 for CPU gradients): the master's vote then takes the tolerance
path, as it does across real machines, at the cost of one torch calculation
instead of R.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import trio

from ravenp2p.roles.worker import Computation, Tensors
from ravenp2p.training.manifest import JobManifest
from ravenp2p.wire.job_messages import CalculationOrder

SHARED_RESULTS = 512
"""Honest results kept for reuse in modeled mode (a round's calculations, many times over)."""


@dataclass
class ComputeLedger:
    """What all the simulated workers computed: busy time and the calculations in progress."""

    busy: int = 0
    """Calculations being computed right now (for utilisation)."""
    busy_seconds: float = 0.0
    calculations: int = 0
    torch_calculations: int = 0
    """Calculations actually run with torch (fewer than `calculations` in modeled mode)."""
    reference_seconds: dict[str, float] = field(default_factory=dict)
    """Job id -> virtual seconds of one calculation on a device of speed 1."""
    shared: OrderedDict[tuple[str, str, int, str], tuple[Tensors, float]] = field(
        default_factory=OrderedDict
    )


def _stable_seed(*parts: object) -> int:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def perturb(result: Tensors, relative_l2: float, seed: int) -> Tensors:
    """`result` with Gaussian noise of the given relative L2 norm (an honest peer's low bits)."""
    if relative_l2 <= 0:
        return result
    rng = np.random.default_rng(seed)
    total = math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in result.values()))
    size = sum(t.size for t in result.values())
    scale = relative_l2 * total / math.sqrt(max(size, 1))
    return {name: (t + rng.standard_normal(t.shape) * scale).astype(t.dtype)
            for name, t in result.items()}


class SimCalculator:
    """One simulated worker's `Calculator`: computes inline, charges virtual seconds.

    `withhold` makes it a worker that takes orders and never answers (it waits
    until the worker's own timeout gives up).
    """

    def __init__(
        self,
        ledger: ComputeLedger,
        *,
        speed: float,
        jitter: float,
        mode: str,
        honest_noise: float,
        seed: int,
        withhold: bool = False,
    ) -> None:
        self.ledger = ledger
        self.speed = speed
        self.jitter = jitter
        self.mode = mode
        self.honest_noise = honest_noise
        self.seed = seed
        self.withhold = withhold
        self._rng = random.Random(seed)

    def seconds(self, manifest: JobManifest) -> float:
        """Virtual seconds of the next calculation of `manifest`'s job on this device."""
        reference = self.ledger.reference_seconds.get(manifest.job_id, 1.0)
        factor = math.exp(self.jitter * self._rng.gauss(0.0, 1.0)) if self.jitter else 1.0
        return reference / self.speed * factor

    async def __call__(
        self, manifest: JobManifest, order: CalculationOrder, computation: Computation
    ) -> tuple[Tensors, float, float]:
        seconds = self.seconds(manifest)
        ledger = self.ledger
        ledger.busy += 1
        try:
            if self.withhold:
                await trio.sleep_forever()
            await trio.sleep(seconds)
        finally:
            ledger.busy -= 1
        ledger.busy_seconds += seconds
        ledger.calculations += 1
        if self.mode == "real":
            ledger.torch_calculations += 1
            result, loss = computation()
        else:
            result, loss = self._shared(order, computation)
            result = perturb(result, self.honest_noise,
                             _stable_seed(self.seed, order.weights, order.calc))
        return result, loss, seconds

    def _shared(self, order: CalculationOrder, computation: Computation) -> tuple[Tensors, float]:
        key = (order.weights, order.shard, order.seed, order.kind)
        shared = self.ledger.shared
        hit = shared.get(key)
        if hit is None:
            self.ledger.torch_calculations += 1
            hit = shared[key] = computation()
            while len(shared) > SHARED_RESULTS:
                shared.popitem(last=False)
        else:
            shared.move_to_end(key)
        return hit
