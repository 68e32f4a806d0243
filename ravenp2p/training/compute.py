"""The compute kernel: a job's model on one peer, and the master's optimizer.

Workers call `ModelRuntime.gradient` on weights and a shard they fetched by
digest. Redundant workers must return byte-identical gradients, so everything
that can change low bits is pinned by the assignment's `ComputeProfile`
(thread count, compute dtype) and randomness (dropout) is seeded from the
calculation. The master feeds accepted gradients to a `Trainer`, which averages
them and steps a torch optimizer; its state can be exported as plain arrays so
another master can resume the job bit for bit.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ravenp2p.training import models
from ravenp2p.training.datasets import DataInfo, Split

if TYPE_CHECKING:
    from ravenp2p.training.spec import ModelSpec, OptimizerSpec

LOSSES = ("cross_entropy", "mse")
PROFILE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
OPTIMIZERS = ("sgd", "adam", "adamw")
MAX_THREADS = 256
MAX_SEED = 2**63 - 1

_PROFILE_KEYS = ("threads", "dtype")
# Optimizer buffers per parameter, by optimizer kind, once at least one step was taken.
_SGD_MOMENTUM_KEYS = ("momentum_buffer",)
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")

# torch's thread count is process-wide: computations in one process run side by
# side only when they ask for the same count (a devnet's workers all do).
_RNG_LOCK = threading.Lock()
_THREADS = threading.Condition()
_threads_in_use = 0
_threads_users = 0


@dataclass(frozen=True)
class ComputeProfile:
    """How a calculation is computed, pinned per assignment.

    Gradients are bitwise reproducible only between peers that use the same
    thread count and compute dtype; the master names both in the assignment.
    Gradients are always published as float32.
    """

    threads: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        threads = self.threads
        if not isinstance(threads, int) or isinstance(threads, bool):
            raise ValueError(f"compute profile: 'threads' must be an integer, got {threads!r}")
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"compute profile: 'threads' is {threads}, allowed 1..{MAX_THREADS}")
        if self.dtype not in PROFILE_DTYPES:
            raise ValueError(
                f"compute profile: 'dtype' is {self.dtype!r}, allowed: {', '.join(PROFILE_DTYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for an assignment message."""
        return {"threads": self.threads, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: object) -> ComputeProfile:
        """Parse `to_dict` output strictly; errors name the key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"compute profile: must be a mapping, got {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in _PROFILE_KEYS)
        if unknown:
            raise ValueError(
                f"compute profile: unknown keys {', '.join(unknown)} "
                f"(allowed: {', '.join(_PROFILE_KEYS)})"
            )
        missing = [key for key in _PROFILE_KEYS if key not in data]
        if missing:
            raise ValueError(f"compute profile: missing keys {', '.join(missing)}")
        return cls(threads=data["threads"], dtype=data["dtype"])


@dataclass(frozen=True)
class Evaluation:
    """Quality of weights on a split: accuracy (next-token accuracy for language), mean loss."""

    accuracy: float | None
    loss: float
    samples: int


@contextmanager
def _pinned_threads(threads: int) -> Iterator[None]:
    """Run with torch using `threads` threads; waits while others run with another count."""
    global _threads_in_use, _threads_users
    with _THREADS:
        _THREADS.wait_for(lambda: _threads_users == 0 or _threads_in_use == threads)
        # Always set: OpenMP keeps the count per OS thread, and trio's worker
        # threads come and go, so what torch reports may not bind this thread.
        torch.set_num_threads(threads)
        _threads_in_use = threads
        _threads_users += 1
    try:
        yield
    finally:
        with _THREADS:
            _threads_users -= 1
            _THREADS.notify_all()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch copy of `array` (shard arrays may be read-only buffers)."""
    return torch.from_numpy(np.array(array, copy=True, order="C"))


class ModelRuntime:
    """A job's model on one peer: builds the torch module once from (ModelSpec, DataInfo),
    then computes on weight and shard tensors.

    `last_loss` is the mean loss over the shard of the latest `gradient` call
    (NaN before the first), for progress reports.
    """

    def __init__(self, model: ModelSpec, info: DataInfo, loss: str) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")
        if info.task == "language" and loss != "cross_entropy":
            raise ValueError(f"loss: {loss!r} does not apply to language modelling")
        self.model = model
        self.info = info
        self.loss = loss
        # Building initialises random weights; keep the caller's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            module = models.build_model(
                model,
                info.input_shape,
                num_classes=info.num_classes,
                vocab_size=info.vocab_size,
            )
        self._modules: dict[str, torch.nn.Module] = {"float32": module.float()}
        self.last_loss = math.nan
        self._lock = threading.Lock()
        self._uses_global_rng = any(
            layer.type == "Dropout"
            or (layer.type == "CausalSelfAttention" and (layer.get("dropout", 0.0) or 0.0) > 0)
            for layer in model.layers
        )
        """The modules hold the weights of the call in progress: one call at a time."""
        self.weight_shapes: dict[str, tuple[int, ...]] = {
            name: tuple(tensor.shape) for name, tensor in module.state_dict().items()
        }
        self.parameter_shapes: dict[str, tuple[int, ...]] = {
            name: tuple(param.shape)
            for name, param in module.named_parameters()
            if param.requires_grad
        }

    def initial_weights(self, seed: int) -> dict[str, np.ndarray]:
        """Fresh weights for the job, made once by the requester and shipped as bytes."""
        return models.initial_weights(
            self.model,
            self.info.input_shape,
            num_classes=self.info.num_classes,
            vocab_size=self.info.vocab_size,
            seed=seed,
        )

    @property
    def module(self) -> torch.nn.Module:
        """The runtime's float32 module; `gradient` and `evaluate` load weights into it."""
        return self._modules["float32"]

    def prepare_inputs(
        self, inputs: np.ndarray, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Stored inputs as the model takes them: token ids as they are, images transformed
        with the data's scale/mean/std, float features cast to `dtype`.
        """
        tensor = _as_tensor(inputs)
        if self.info.kind == "text":
            return tensor
        if inputs.dtype == np.uint8:
            info = self.info
            return (tensor.to(dtype) * info.scale - info.mean) / info.std
        return tensor.to(dtype)

    def new_module(self) -> torch.nn.Module:
        """An independent float32 copy of the module (for holders of their own weights)."""
        return copy.deepcopy(self._modules["float32"])

    def load_into(self, module: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
        """Copy `weights` into `module` after checking names and shapes exactly."""
        check_tensors(weights, self.weight_shapes, "weights")
        state = module.state_dict()
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(_as_tensor(np.asarray(weights[name])))

    def gradient(
        self,
        weights: Mapping[str, np.ndarray],
        shard: Split,
        *,
        seed: int,
        profile: ComputeProfile,
    ) -> dict[str, np.ndarray]:
        """Gradients of the mean loss over the whole shard, one float32 array per parameter.

        Deterministic: equal weights, shard, seed and profile give bitwise-equal
        results, in this process or any other on the same kind of machine.
        """
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed: must be an integer 0..{MAX_SEED}, got {seed!r}")
        self._check_split(shard, "shard")
        dtype = PROFILE_DTYPES[profile.dtype]
        with self._lock, _pinned_threads(profile.threads):
            module = self._module_for(profile.dtype)
            self.load_into(module, weights)
            inputs = self.prepare_inputs(shard.inputs, dtype)
            targets = _as_tensor(shard.targets)
            module.train()
            module.zero_grad(set_to_none=True)
            with self._randomness(), torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(seed)
                outputs = module(inputs)
                loss = self._loss(outputs, targets, "mean")
                loss.backward()
            self.last_loss = float(loss.detach())
            grads: dict[str, np.ndarray] = {}
            for name, param in module.named_parameters():
                if not param.requires_grad:
                    continue
                if param.grad is None:
                    grads[name] = np.zeros(tuple(param.shape), dtype=np.float32)
                else:
                    grads[name] = param.grad.detach().to(torch.float32).numpy().copy()
            module.zero_grad(set_to_none=True)
        return grads

    def _randomness(self) -> AbstractContextManager[object]:
        """Hold the process-wide RNG lock while a model with dropout computes.

        Dropout draws from torch's global generator, which every thread shares:
        two calculations seeding and drawing at once would interleave.
        """
        return _RNG_LOCK if self._uses_global_rng else nullcontext()

    def local_steps(
        self,
        weights: Mapping[str, np.ndarray],
        shard: Split,
        *,
        optimizer: OptimizerSpec,
        batch_size: int,
        seed: int,
        profile: ComputeProfile,
    ) -> dict[str, np.ndarray]:
        """Run `optimizer` (fresh state) over the shard; return new weights minus `weights`.

        The shard is visited once in an order drawn from `seed`, in batches of
        `batch_size` (a final partial batch is dropped unless it is the only
        one). Deterministic like `gradient`: equal inputs and profile give
        bitwise-equal changes. `last_loss` is the mean of the batch losses.
        """
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed: must be an integer 0..{MAX_SEED}, got {seed!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
        self._check_split(shard, "shard")
        dtype = PROFILE_DTYPES[profile.dtype]
        with self._lock, _pinned_threads(profile.threads):
            module = self._module_for(profile.dtype)
            self.load_into(module, weights)
            start = {name: p.detach().clone() for name, p in module.named_parameters()}
            inputs = self.prepare_inputs(shard.inputs, dtype)
            targets = _as_tensor(shard.targets)
            steps = max(1, len(shard) // batch_size)
            module.train()
            losses = []
            with self._randomness(), torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(seed)
                order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed))
                opt = _make_optimizer(optimizer, list(module.parameters()), foreach=True)
                for step in range(steps):
                    index = order[step * batch_size : (step + 1) * batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = self._loss(module(inputs[index]), targets[index], "mean")
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
            self.last_loss = float(np.mean(losses))
            delta = {
                name: (p.detach() - start[name]).to(torch.float32).numpy().copy()
                for name, p in module.named_parameters()
                if p.requires_grad
            }
            module.zero_grad(set_to_none=True)
        return delta

    def evaluate(
        self, weights: Mapping[str, np.ndarray], split: Split, *, batch_size: int = 2048
    ) -> Evaluation:
        """Accuracy and mean loss of `weights` on `split` (eval mode, no gradients)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
        self._check_split(split, "split")
        total_loss = 0.0
        correct = 0
        with self._lock, _pinned_threads(1), torch.no_grad():
            module = self._modules["float32"]
            self.load_into(module, weights)
            module.eval()
            for start in range(0, len(split), batch_size):
                inputs = self.prepare_inputs(
                    split.inputs[start : start + batch_size], torch.float32
                )
                targets = _as_tensor(split.targets[start : start + batch_size])
                outputs = module(inputs)
                total_loss += float(self._loss(outputs, targets, "sum"))
                correct += int((outputs.argmax(dim=-1) == targets).sum())
        targets_count = split.targets.size
        loss_terms = targets_count
        if self.loss == "mse":
            loss_terms *= self.info.num_classes or 1
        return Evaluation(
            accuracy=correct / targets_count,
            loss=total_loss / loss_terms,
            samples=len(split),
        )

    def _module_for(self, dtype: str) -> torch.nn.Module:
        module = self._modules.get(dtype)
        if module is None:
            module = copy.deepcopy(self._modules["float32"]).to(PROFILE_DTYPES[dtype])
            self._modules[dtype] = module
        return module

    def _check_split(self, split: Split, what: str) -> None:
        info = self.info
        if len(split) == 0:
            raise ValueError(f"{what}: holds no samples")
        if split.inputs.shape[1:] != info.input_shape:
            raise ValueError(
                f"{what}: inputs have shape {split.inputs.shape}, expected [N, "
                f"{', '.join(str(d) for d in info.input_shape)}]"
            )
        if split.inputs.dtype != info.input_dtype:
            raise ValueError(
                f"{what}: inputs have dtype {split.inputs.dtype}, expected {info.input_dtype}"
            )
        expected = (len(split),) if info.task == "classification" else split.inputs.shape
        if split.targets.dtype != np.int64 or split.targets.shape != expected:
            raise ValueError(
                f"{what}: targets are {split.targets.dtype} {split.targets.shape}, expected "
                f"int64 {expected}"
            )

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        if self.info.task == "language":
            logits = outputs.reshape(-1, outputs.shape[-1])
            return F.cross_entropy(logits, targets.reshape(-1), reduction=reduction)
        if self.loss == "cross_entropy":
            return F.cross_entropy(outputs, targets, reduction=reduction)
        onehot = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        return F.mse_loss(outputs, onehot, reduction=reduction)


def check_tensors(
    tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Refuse a float32 tensor map whose names, shapes or values do not fit; errors name the
    tensor.
    """
    if not isinstance(tensors, Mapping):
        raise ValueError(f"{what}: must be a mapping of tensors, got {type(tensors).__name__}")
    missing = sorted(name for name in shapes if name not in tensors)
    if missing:
        raise ValueError(f"{what}: missing tensors {', '.join(map(repr, missing))}")
    unexpected = sorted(str(name) for name in tensors if name not in shapes)
    if unexpected:
        raise ValueError(f"{what}: unexpected tensors {', '.join(map(repr, unexpected))}")
    for name, shape in shapes.items():
        array = tensors[name]
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{what}: tensor {name!r} is {type(array).__name__}, not an array")
        if array.dtype != np.float32:
            raise ValueError(f"{what}: tensor {name!r} has dtype {array.dtype}, expected float32")
        if tuple(array.shape) != shape:
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(array.shape)}, expected {shape}"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{what}: tensor {name!r} contains NaN or infinite values")


def _make_optimizer(
    spec: OptimizerSpec, params: list[torch.nn.Parameter], *, foreach: bool = False
) -> torch.optim.Optimizer:
    name = spec.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: name {name!r} is not one of {', '.join(OPTIMIZERS)}")
    for field in ("lr", "weight_decay", "momentum"):
        value = getattr(spec, field)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"optimizer: {field!r} must be a finite number, got {value!r}")
    if spec.lr <= 0:
        raise ValueError(f"optimizer: 'lr' must be positive, got {spec.lr}")
    # One code path per use, so every peer doing the same thing steps identically:
    # the master's step is per tensor, workers' local steps use multi-tensor kernels.
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            foreach=foreach,
        )
    betas = (float(spec.betas[0]), float(spec.betas[1]))
    optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer_class(
        params, lr=spec.lr, betas=betas, weight_decay=spec.weight_decay, foreach=foreach
    )


class Trainer:
    """The master's side: holds the current weights and the optimizer, steps with an
    averaged gradient.
    """

    def __init__(
        self, runtime: ModelRuntime, weights: Mapping[str, np.ndarray], optimizer: OptimizerSpec
    ) -> None:
        self.runtime = runtime
        self.spec = optimizer
        self._module = runtime.new_module()
        runtime.load_into(self._module, weights)
        self._params = {
            name: param for name, param in self._module.named_parameters() if param.requires_grad
        }
        self._optimizer = _make_optimizer(optimizer, list(self._params.values()))
        self._steps = 0

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (restored by `load_optimizer_state`)."""
        return self._steps

    def step(self, gradients: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Average the accepted gradients (equal-size shards), step once, return new weights."""
        if isinstance(gradients, Mapping) or not isinstance(gradients, Sequence):
            raise ValueError("gradients: must be a sequence of tensor maps")
        if not gradients:
            raise ValueError("gradients: at least one gradient is needed")
        shapes = self.runtime.parameter_shapes
        for index, gradient in enumerate(gradients):
            check_tensors(gradient, shapes, f"gradient {index}")
        for name, param in self._params.items():
            total = np.zeros(shapes[name], dtype=np.float64)
            for gradient in gradients:
                total += gradient[name]
            param.grad = torch.from_numpy((total / len(gradients)).astype(np.float32))
        with _pinned_threads(1):
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._steps += 1
        return self.weights()

    def apply_changes(self, changes: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Add the average of accepted `local_steps` changes to the weights; return them."""
        if isinstance(changes, Mapping) or not isinstance(changes, Sequence) or not changes:
            raise ValueError("changes: must be a non-empty sequence of tensor maps")
        shapes = self.runtime.parameter_shapes
        for index, change in enumerate(changes):
            check_tensors(change, shapes, f"change {index}")
        with _pinned_threads(1), torch.no_grad():
            for name, param in self._params.items():
                total = np.zeros(shapes[name], dtype=np.float64)
                for change in changes:
                    total += change[name]
                param.add_(torch.from_numpy((total / len(changes)).astype(np.float32)))
        return self.weights()

    def weights(self) -> dict[str, np.ndarray]:
        """The current weights as float32 arrays (copies)."""
        return models.model_weights(self._module)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume bitwise: "step" plus "<buffer>/<parameter>" arrays."""
        state: dict[str, np.ndarray] = {"step": np.array([self._steps], dtype=np.int64)}
        for name, param in self._params.items():
            for key, value in self._optimizer.state.get(param, {}).items():
                if key == "step" or value is None:
                    continue
                state[f"{key}/{name}"] = value.detach().numpy().copy()
        return state

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `optimizer_state` output; refuses anything that does not fit exactly."""
        if not isinstance(state, Mapping):
            raise ValueError(f"optimizer state: must be a mapping, got {type(state).__name__}")
        step = state.get("step")
        if (
            not isinstance(step, np.ndarray)
            or step.dtype != np.int64
            or step.shape != (1,)
            or int(step[0]) < 0
        ):
            raise ValueError("optimizer state: 'step' must be an int64 array [1] holding >= 0")
        steps = int(step[0])
        buffer_keys = self._buffer_keys() if steps > 0 else ()
        shapes = {
            f"{key}/{name}": tuple(param.shape)
            for key in buffer_keys
            for name, param in self._params.items()
        }
        buffers = {name: value for name, value in state.items() if name != "step"}
        check_tensors(buffers, shapes, "optimizer state")
        saved = self._optimizer.state_dict()
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for index, (name, _param) in enumerate(self._params.items()):
            if steps == 0 or not buffer_keys:
                continue
            entry = {key: _as_tensor(buffers[f"{key}/{name}"]) for key in buffer_keys}
            if buffer_keys == _ADAM_KEYS:
                entry["step"] = torch.tensor(float(steps), dtype=torch.float32)
            per_param[index] = entry
        self._optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
        self._steps = steps

    def _buffer_keys(self) -> tuple[str, ...]:
        if self.spec.name == "sgd":
            return _SGD_MOMENTUM_KEYS if self.spec.momentum != 0 else ()
        return _ADAM_KEYS
