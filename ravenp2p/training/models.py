"""Torch models built from declarative, allow-listed layer lists.

A `ModelSpec` names layers from `ALLOWED_LAYERS` with their output sizes only;
`build_model` infers every input size from the per-sample input shape, checks
each layer against the shape it receives, counts the parameters before anything
is allocated, and returns an ``nn.Sequential`` whose state-dict names are
therefore the same on every peer (``0.weight``, ``3.attn_qkv.bias``, ...).

Per-sample input shapes: ``(features,)`` for tabular data, ``(C, H, W)`` for
images, ``(T,)`` token ids for text (when `vocab_size` is given). Classification
models output ``[N, num_classes]``; language models output ``[N, T, vocab_size]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from ravenp2p.training.spec import (
    ALLOWED_LAYERS,
    JobSpecError,
    LayerSpec,
    ModelSpec,
    ParamRule,
    validate_model,
)

MAX_PARAMETERS = 50_000_000
MAX_ACTIVATION_VALUES = 1 << 24

Shape = tuple[int, ...]
Factory = Callable[[], nn.Module]


class PositionalEmbedding(nn.Module):
    """A learned position vector added to each position of a ``[N, T, C]`` input."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the first ``T`` position vectors to `x`."""
        return x + self.weight[: x.shape[1]]


class CausalSelfAttention(nn.Module):
    """A pre-LayerNorm transformer block with causal self-attention and a GELU MLP.

    ``x + attn(ln(x))`` where position t attends to positions <= t only, then
    ``x + mlp(ln(x))``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, mlp_ratio * dim)
        self.mlp_out = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One transformer block over ``[N, T, C]``."""
        batch, steps, dim = x.shape
        qkv = self.attn_qkv(self.attn_norm(x))
        query, key, value = (
            part.reshape(batch, steps, self.heads, dim // self.heads).transpose(1, 2)
            for part in qkv.split(dim, dim=-1)
        )
        drop = self.dropout if self.training else 0.0
        attended = functional.scaled_dot_product_attention(
            query, key, value, dropout_p=drop, is_causal=True
        )
        attended = attended.transpose(1, 2).reshape(batch, steps, dim)
        x = x + functional.dropout(self.attn_out(attended), drop, self.training)
        hidden = functional.gelu(self.mlp_in(self.mlp_norm(x)))
        return x + functional.dropout(self.mlp_out(hidden), drop, self.training)


@dataclass
class _Flow:
    """What flows between layers during shape inference: per-sample shape, token ids or not."""

    shape: Shape
    tokens: bool


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _batched(shape: Shape) -> str:
    return "[" + ", ".join(["N", *map(str, shape)]) + "]"


class _LayerError(Exception):
    """A shape problem in one layer; `build_model` adds the layer index."""


def _param(layer: LayerSpec, name: str) -> int | float | bool:
    value = layer.get(name)
    if value is None:
        default = ALLOWED_LAYERS[layer.type][name].default
        assert default is not None, f"{layer.type}.{name} has no default"
        return default
    return value


def _int(layer: LayerSpec, name: str) -> int:
    value = _param(layer, name)
    assert isinstance(value, int)
    return value


def _float(layer: LayerSpec, name: str) -> float:
    return float(_param(layer, name))


def _needs_features(layer: LayerSpec, flow: _Flow, rank: int | None = None) -> None:
    if flow.tokens:
        raise _LayerError(
            f"{layer.type} needs float features but the input is token ids {_fmt(flow.shape)}; "
            "a text model starts with Embedding"
        )
    if rank == 3 and len(flow.shape) != 3:
        raise _LayerError(f"{layer.type} needs a (C, H, W) input, got {_fmt(flow.shape)}")
    if rank == 2 and len(flow.shape) != 2:
        raise _LayerError(f"{layer.type} needs a (T, C) sequence input, got {_fmt(flow.shape)}")
    if not flow.shape:
        raise _LayerError(f"{layer.type} needs at least one dimension, got a scalar per sample")


def _linear(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
    _needs_features(layer, flow)
    width, out, bias = flow.shape[-1], _int(layer, "out_features"), bool(_param(layer, "bias"))
    count = width * out + (out if bias else 0)
    return (lambda: nn.Linear(width, out, bias=bias)), _Flow((*flow.shape[:-1], out), False), count


def _conv2d(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
    _needs_features(layer, flow, rank=3)
    channels, height, width = flow.shape
    out = _int(layer, "out_channels")
    kernel, stride, padding = (_int(layer, k) for k in ("kernel_size", "stride", "padding"))
    if kernel > min(height, width) + 2 * padding:
        raise _LayerError(
            f"kernel {kernel} larger than the {height}x{width} input (padding {padding})"
        )
    new_h = (height + 2 * padding - kernel) // stride + 1
    new_w = (width + 2 * padding - kernel) // stride + 1
    count = out * channels * kernel * kernel + out

    def make() -> nn.Module:
        return nn.Conv2d(channels, out, kernel, stride=stride, padding=padding)

    return make, _Flow((out, new_h, new_w), False), count


def _maxpool2d(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
    _needs_features(layer, flow, rank=3)
    channels, height, width = flow.shape
    kernel = _int(layer, "kernel_size")
    given_stride = layer.get("stride")
    stride = kernel if given_stride is None else int(given_stride)
    if kernel > min(height, width):
        raise _LayerError(f"kernel {kernel} larger than the {height}x{width} input")
    shape = (channels, (height - kernel) // stride + 1, (width - kernel) // stride + 1)
    return (lambda: nn.MaxPool2d(kernel, stride=stride)), _Flow(shape, False), 0


def _flatten(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
    _needs_features(layer, flow)
    return nn.Flatten, _Flow((math.prod(flow.shape),), False), 0


def _same_shape(
    factory: Callable[[LayerSpec], nn.Module],
) -> Callable[[LayerSpec, _Flow, int | None], tuple[Factory, _Flow, int]]:
    def infer(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
        _needs_features(layer, flow)
        return (lambda: factory(layer)), flow, 0

    return infer


def _layernorm(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
    _needs_features(layer, flow)
    width = flow.shape[-1]
    return (lambda: nn.LayerNorm(width)), flow, 2 * width


def _embedding(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
    if not flow.tokens or vocab is None:
        raise _LayerError(
            f"Embedding needs token ids (a text task with a vocabulary), got float features "
            f"{_fmt(flow.shape)}"
        )
    dim = _int(layer, "embedding_dim")
    return (lambda: nn.Embedding(vocab, dim)), _Flow((*flow.shape, dim), False), vocab * dim


def _positional(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
    _needs_features(layer, flow, rank=2)
    steps, dim = flow.shape
    max_len = _int(layer, "max_len")
    if steps > max_len:
        raise _LayerError(f"sequence length {steps} is longer than max_len {max_len}")
    return (lambda: PositionalEmbedding(max_len, dim)), flow, max_len * dim


def _attention(layer: LayerSpec, flow: _Flow, vocab: int | None) -> tuple[Factory, _Flow, int]:
    _needs_features(layer, flow, rank=2)
    dim = flow.shape[1]
    heads, ratio, drop = _int(layer, "heads"), _int(layer, "mlp_ratio"), _float(layer, "dropout")
    if dim % heads:
        raise _LayerError(f"embedding size {dim} is not divisible by {heads} heads")
    hidden = ratio * dim
    count = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim
    count += (dim * hidden + hidden) + (hidden * dim + dim)
    return (lambda: CausalSelfAttention(dim, heads, ratio, drop)), flow, count


_INFER: dict[str, Callable[[LayerSpec, _Flow, int | None], tuple[Factory, _Flow, int]]] = {
    "Linear": _linear,
    "Conv2d": _conv2d,
    "MaxPool2d": _maxpool2d,
    "Flatten": _flatten,
    "ReLU": _same_shape(lambda layer: nn.ReLU()),
    "GELU": _same_shape(lambda layer: nn.GELU()),
    "Tanh": _same_shape(lambda layer: nn.Tanh()),
    "Dropout": _same_shape(lambda layer: nn.Dropout(_float(layer, "p"))),
    "LayerNorm": _layernorm,
    "Embedding": _embedding,
    "PositionalEmbedding": _positional,
    "CausalSelfAttention": _attention,
}
assert set(_INFER) == set(ALLOWED_LAYERS), "every allowed layer needs a builder"


def _check_input(input_shape: tuple[int, ...], vocab_size: int | None) -> Shape:
    shape = tuple(input_shape)
    if not 1 <= len(shape) <= 3 or any(
        isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in shape
    ):
        raise JobSpecError(
            "dataset", f"input shape must be 1 to 3 positive sizes per sample, got {shape!r}"
        )
    if vocab_size is not None and len(shape) != 1:
        raise JobSpecError("dataset", f"a text input is (T,) token ids, got {_fmt(shape)}")
    return shape


def _plan(
    model: ModelSpec,
    input_shape: tuple[int, ...],
    num_classes: int | None,
    vocab_size: int | None,
) -> tuple[list[Factory], int]:
    """Check `model` against the input shape and task; its layer factories and parameter count."""
    if not model.layers:
        raise JobSpecError(
            "model", 'is "auto" and has no layers yet; resolve it with the selector first'
        )
    if num_classes is None and vocab_size is None:
        raise ValueError("a model needs num_classes (classification) or vocab_size (text)")
    for name, size in (("num_classes", num_classes), ("vocab_size", vocab_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    model = validate_model(model)
    shape = _check_input(input_shape, vocab_size)
    flow = _Flow(shape, tokens=vocab_size is not None)
    factories: list[Factory] = []
    total = 0
    for index, layer in enumerate(model.layers):
        try:
            factory, flow, count = _INFER[layer.type](layer, flow, vocab_size)
        except _LayerError as exc:
            raise JobSpecError(f"model.layers[{index}]", str(exc)) from None
        total += count
        if total > MAX_PARAMETERS:
            raise JobSpecError(
                f"model.layers[{index}]",
                f"brings the model to {total:,} parameters, more than the limit of "
                f"{MAX_PARAMETERS:,}",
            )
        values = math.prod(flow.shape)
        if values > MAX_ACTIVATION_VALUES:
            raise JobSpecError(
                f"model.layers[{index}]",
                f"outputs {_fmt(flow.shape)} = {values:,} values per sample, more than the "
                f"limit of {MAX_ACTIVATION_VALUES:,}",
            )
        factories.append(factory)
    if flow.tokens:
        raise JobSpecError(
            "model.layers", "the model never turns token ids into features; start it with Embedding"
        )
    expected: Shape
    if num_classes is not None:
        expected, task = (num_classes,), "classification"
    else:
        assert vocab_size is not None
        expected, task = (shape[0], vocab_size), "language modelling"
    if flow.shape != expected:
        raise JobSpecError(
            "model.layers",
            f"the model outputs {_batched(flow.shape)} but the task needs "
            f"{_batched(expected)} ({task})",
        )
    return factories, total


def check_model(
    model: ModelSpec,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None = None,
    vocab_size: int | None = None,
) -> int:
    """The parameter count `build_model` would produce, checked the same way, allocating nothing.

    Lets a peer refuse an oversized or ill-shaped model before building it.
    """
    return _plan(model, input_shape, num_classes, vocab_size)[1]


def build_model(
    model: ModelSpec,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None = None,
    vocab_size: int | None = None,
) -> nn.Module:
    """The torch model for `model`, after checking every layer against its input shape.

    `vocab_size` marks a text task: the input is ``(T,)`` token ids. The output
    must be ``[N, num_classes]`` when `num_classes` is given, else
    ``[N, T, vocab_size]``. Problems raise `JobSpecError` naming the layer;
    more than `MAX_PARAMETERS` parameters are refused before allocation.
    """
    factories, _ = _plan(model, input_shape, num_classes, vocab_size)
    return nn.Sequential(*(factory() for factory in factories))


def parameter_count(module: nn.Module) -> int:
    """The number of trainable and frozen parameter values in `module`."""
    return sum(parameter.numel() for parameter in module.parameters())


def model_weights(module: nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copies of `module`'s state dict (parameters and buffers), same names."""
    return {
        name: tensor.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
        for name, tensor in module.state_dict().items()
    }


def initial_weights(
    model: ModelSpec,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None = None,
    vocab_size: int | None = None,
    seed: int,
) -> dict[str, np.ndarray]:
    """The initial weights of `model` for `seed`, leaving the global torch RNG untouched.

    Deterministic on one machine; other CPUs may differ in low bits, so peers
    must receive these weights as bytes rather than regenerate them.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_model(model, input_shape, num_classes=num_classes, vocab_size=vocab_size)
        return model_weights(module)


def load_weights(module: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy `weights` into `module`; names, shapes and dtypes must match exactly.

    Raises `ValueError` naming the first tensor that is missing, unexpected or
    of the wrong shape or dtype; on error the module is left unchanged.
    """
    state = module.state_dict()
    missing = sorted(set(state) - set(weights))
    if missing:
        raise ValueError(f"weights lack tensor {missing[0]!r} ({len(missing)} missing)")
    unexpected = sorted(set(weights) - set(state))
    if unexpected:
        raise ValueError(
            f"weights hold unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, target in state.items():
        array = weights[name]
        if not isinstance(array, np.ndarray):
            raise ValueError(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
        expected_dtype = torch.empty(0, dtype=target.dtype).numpy().dtype
        if array.dtype != expected_dtype:
            raise ValueError(
                f"tensor {name!r}: dtype {array.dtype} does not match {expected_dtype}"
            )
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(
                f"tensor {name!r}: shape {tuple(array.shape)} does not match {tuple(target.shape)}"
            )
        tensors[name] = torch.from_numpy(np.array(array, copy=True))
    module.load_state_dict(tensors, strict=True)


__all__ = [
    "ALLOWED_LAYERS",
    "MAX_PARAMETERS",
    "CausalSelfAttention",
    "ParamRule",
    "PositionalEmbedding",
    "build_model",
    "check_model",
    "initial_weights",
    "load_weights",
    "model_weights",
    "parameter_count",
]
