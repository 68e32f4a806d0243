"""The algorithm selector: a model for a job that asks for ``model = "auto"``.

The zoo holds one small, dependable architecture per kind of task, sized from
the input shape:

- ``tabular`` -> ``mlp``: Linear 128, ReLU, Linear 64, ReLU, Linear to the classes.
- ``image`` -> ``cnn``: stages of 3x3 conv + ReLU + 2x2 max-pool with 16, then
  32 channels (two stages for inputs of at least 16x16, one for smaller ones
  such as 8x8 digits, one conv without pooling below 4x4), extra pooling down
  to at most 8x8 for large images, then Linear 128, ReLU, Linear to the classes.
- ``text`` -> ``char-transformer``: Embedding 128, PositionalEmbedding(T), two
  4-head CausalSelfAttention blocks, LayerNorm, Linear to the vocabulary.

The result is an ordinary declarative `ModelSpec`, marked ``auto`` with the
chosen name recorded, so every peer builds the same model from it.
"""

from __future__ import annotations

import math

from ravenp2p.training.models import check_model
from ravenp2p.training.spec import JobSpec, JobSpecError, LayerSpec, ModelSpec

TASK_KINDS = ("image", "tabular", "text")
ZOO_FOR_KIND = {"tabular": "mlp", "image": "cnn", "text": "char-transformer"}

_EMBEDDING_DIM = 128
_HEADS = 4
_BLOCKS = 2


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> list[LayerSpec]:
    return [
        LayerSpec.of("Flatten"),
        LayerSpec.of("Linear", out_features=128),
        LayerSpec.of("ReLU"),
        LayerSpec.of("Linear", out_features=64),
        LayerSpec.of("ReLU"),
        LayerSpec.of("Linear", out_features=num_classes),
    ]


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> list[LayerSpec]:
    _, height, width = input_shape
    side = min(height, width)
    stages = 2 if side >= 16 else 1 if side >= 4 else 0
    layers: list[LayerSpec] = []
    channels = 16
    for _stage in range(max(stages, 1)):
        layers += [
            LayerSpec.of("Conv2d", out_channels=channels, kernel_size=3, padding=1),
            LayerSpec.of("ReLU"),
        ]
        if stages:
            layers.append(LayerSpec.of("MaxPool2d", kernel_size=2))
            height, width = height // 2, width // 2
        channels *= 2
    if max(height, width) > 8:
        kernel = min(math.ceil(max(height, width) / 8), min(height, width))
        layers.append(LayerSpec.of("MaxPool2d", kernel_size=kernel))
    layers += [
        LayerSpec.of("Flatten"),
        LayerSpec.of("Linear", out_features=128),
        LayerSpec.of("ReLU"),
        LayerSpec.of("Linear", out_features=num_classes),
    ]
    return layers


def _char_transformer(input_shape: tuple[int, ...], vocab_size: int) -> list[LayerSpec]:
    (steps,) = input_shape
    blocks = [LayerSpec.of("CausalSelfAttention", heads=_HEADS) for _ in range(_BLOCKS)]
    return [
        LayerSpec.of("Embedding", embedding_dim=_EMBEDDING_DIM),
        LayerSpec.of("PositionalEmbedding", max_len=steps),
        *blocks,
        LayerSpec.of("LayerNorm"),
        LayerSpec.of("Linear", out_features=vocab_size),
    ]


def select_model(
    kind: str,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None = None,
    vocab_size: int | None = None,
) -> ModelSpec:
    """The zoo model for a task `kind` (``tabular``, ``image`` or ``text``) and input shape.

    Tabular and image tasks need `num_classes`; text tasks need `vocab_size`.
    Raises `JobSpecError` when the kind or the shape does not fit the zoo.
    """
    shape = tuple(input_shape)
    if kind not in ZOO_FOR_KIND:
        raise JobSpecError(
            "model", f"no zoo model for task kind {kind!r}; kinds: {', '.join(TASK_KINDS)}"
        )
    if kind == "text":
        if vocab_size is None:
            raise JobSpecError("model", "a text task needs its vocabulary size")
        if len(shape) != 1:
            raise JobSpecError("model", f"a text task needs a (T,) input, got {shape!r}")
        layers = _char_transformer(shape, vocab_size)
    else:
        if num_classes is None:
            raise JobSpecError("model", f"a {kind} task needs its number of classes")
        if kind == "tabular":
            layers = _mlp(shape, num_classes)
        elif len(shape) != 3:
            raise JobSpecError("model", f"an image task needs a (C, H, W) input, got {shape!r}")
        else:
            layers = _cnn(shape, num_classes)
    return ModelSpec(layers=tuple(layers), auto=True, chosen=ZOO_FOR_KIND[kind])


def resolve_model(
    spec: JobSpec,
    kind: str,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None = None,
    vocab_size: int | None = None,
) -> JobSpec:
    """`spec` with a buildable model: the zoo's choice when it asks for ``auto``.

    A spec that already has layers is returned unchanged. Either way the model
    is checked exactly as `build_model` checks it (without allocating it), and
    `JobSpecError` says why it does not fit the data.
    """
    resolved = spec
    if not spec.model.layers:
        chosen = select_model(kind, input_shape, num_classes=num_classes, vocab_size=vocab_size)
        resolved = spec.with_model(chosen)
    check_model(resolved.model, input_shape, num_classes=num_classes, vocab_size=vocab_size)
    return resolved


__all__ = ["TASK_KINDS", "ZOO_FOR_KIND", "resolve_model", "select_model"]
