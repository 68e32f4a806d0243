"""Running a model file on inputs: each model loaded once, every call in a worker thread.

Building a module from a model file and running it are torch compute, so
both happen in `trio.to_thread.run_sync`; the event loop only waits. Calls
run one at a time per node (a node that serves models is not a compute
farm), and a call cancelled by its deadline abandons its thread rather than
holding up the node.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio

from ravenp2p.training.model_file import ModelFileError, TrainedModel, load_model

MAX_LOADED_MODELS = 4
"""Modules kept in memory; the least recently used is dropped beyond this."""


class ModelFailed(RuntimeError):
    """The model could not be loaded, or failed on the inputs; the message says why."""


@dataclass
class InferenceStats:
    """What this node's models did: calls answered, refused, and RAVEN received for them."""

    served: int = 0
    refused: int = 0
    paid_units: int = 0
    local: int = 0
    loads: int = 0


@dataclass
class _Slot:
    lock: trio.Lock = field(default_factory=trio.Lock)
    model: TrainedModel | None = None


class ModelCache:
    """Torch modules of model files by digest: loaded once each, run one call at a time."""

    def __init__(self, max_models: int = MAX_LOADED_MODELS) -> None:
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self.loads = 0
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._compute = trio.CapacityLimiter(1)

    def __contains__(self, digest: str) -> bool:
        slot = self._slots.get(digest)
        return slot is not None and slot.model is not None

    async def module(self, digest: str, path: Path) -> TrainedModel:
        """The module of the model file at `path` (whose bytes have `digest`), loading it once."""
        slot = self._slots.get(digest)
        if slot is None:
            slot = self._slots[digest] = _Slot()
        self._slots.move_to_end(digest)
        async with slot.lock:
            model = slot.model
            if model is None:
                try:
                    model = await self._load(path)
                except ModelFileError as exc:
                    self._slots.pop(digest, None)
                    raise ModelFailed(str(exc)) from None
                slot.model = model
                self.loads += 1
        while len(self._slots) > self.max_models:
            oldest = next(iter(self._slots))
            if self._slots[oldest].lock.locked():
                break
            del self._slots[oldest]
        return model

    async def _load(self, path: Path) -> TrainedModel:
        model: TrainedModel = await trio.to_thread.run_sync(
            load_model, path, limiter=self._compute, abandon_on_cancel=True
        )
        return model

    async def run(self, digest: str, path: Path, inputs: np.ndarray) -> tuple[np.ndarray, float]:
        """The model's float32 outputs for a checked batch, and the milliseconds it computed."""
        model = await self.module(digest, path)
        try:
            return await trio.to_thread.run_sync(
                forward, model, inputs, limiter=self._compute, abandon_on_cancel=True
            )
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ModelFailed(f"the model failed on these inputs: {exc}") from None


def forward(model: TrainedModel, inputs: np.ndarray) -> tuple[np.ndarray, float]:
    """Run `model` on a batch (blocking: call it in a worker thread); outputs and milliseconds."""
    import torch

    started = time.perf_counter()
    tensor = torch.from_numpy(np.array(inputs, copy=True, order="C"))
    with torch.no_grad():
        outputs = model(tensor)
    result = np.ascontiguousarray(outputs.detach().cpu().numpy(), dtype=np.float32)
    return result, (time.perf_counter() - started) * 1000.0

