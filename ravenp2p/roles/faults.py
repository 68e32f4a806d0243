"""Byzantine workers for devnets and simulations: plausible wrong results.

A byzantine worker computes honestly and then returns something else, signed
with its own key, so the only thing that can catch it is redundancy voting.
The kinds vary from calculation to calculation:

- `random`: noise with each tensor's own scale;
- `scaled`: the true gradient times 1.01;
- `stale`: the gradient this worker computed for an earlier calculation;
- `copy`: another byzantine worker's result for a different calculation;
- `zeros`: all zeros (a worker that skipped the work).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from ravenp2p.wire.job_messages import CalculationOrder

FAULT_KINDS = ("random", "scaled", "stale", "copy", "zeros")
POOL_SIZE = 64
Tensors = dict[str, np.ndarray]


@dataclass
class FaultPool:
    """Results byzantine workers have seen, shared so that they can copy each other."""

    results: dict[int, Tensors] = field(default_factory=dict)


class ByzantineResults:
    """A `ResultTamperer` for `Worker`: replaces every result with a wrong one."""

    def __init__(
        self, seed: int, pool: FaultPool | None = None, kinds: tuple[str, ...] = FAULT_KINDS
    ) -> None:
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be among {FAULT_KINDS}, got {kinds}")
        self.kinds = kinds
        self.pool = pool or FaultPool()
        self.used: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self._rng = random.Random(seed)
        self._previous: Tensors | None = None

    def __call__(self, order: CalculationOrder, gradient: Tensors) -> Tensors:
        kind = self.kinds[self._rng.randrange(len(self.kinds))]
        wrong = self._wrong(kind, order, gradient)
        if wrong is None:  # nothing earlier to reuse yet: fall back to scaling
            kind, wrong = "scaled", {k: v * np.float32(1.01) for k, v in gradient.items()}
        self.used[kind] += 1
        self.pool.results[order.calc] = gradient
        while len(self.pool.results) > POOL_SIZE:
            del self.pool.results[next(iter(self.pool.results))]
        self._previous = gradient
        return wrong

    def _wrong(self, kind: str, order: CalculationOrder, gradient: Tensors) -> Tensors | None:
        if kind == "random":
            noise = np.random.default_rng(self._rng.randrange(2**32))
            return {
                k: (noise.standard_normal(v.shape) * (float(np.std(v)) + 1e-6)).astype(np.float32)
                for k, v in gradient.items()
            }
        if kind == "scaled":
            return {k: v * np.float32(1.01) for k, v in gradient.items()}
        if kind == "stale":
            return self._previous
        if kind == "copy":
            others = [calc for calc in self.pool.results if calc != order.calc]
            return self.pool.results[self._rng.choice(others)] if others else None
        return {k: np.zeros_like(v) for k, v in gradient.items()}
