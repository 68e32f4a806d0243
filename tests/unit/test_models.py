"""Declarative models: every layer builds, shapes are checked per layer, weights round-trip,
attention is causal, and the selector's zoo models build and learn."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ravenp2p.training.models import (
    ALLOWED_LAYERS,
    MAX_PARAMETERS,
    build_model,
    check_model,
    initial_weights,
    load_weights,
    model_weights,
    parameter_count,
)
from ravenp2p.training.selector import resolve_model, select_model
from ravenp2p.training.spec import JobSpec, JobSpecError, LayerSpec, ModelSpec, parse_job_spec
from ravenp2p.training.tensors import decode_tensors, encode_tensors

DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"

L = LayerSpec.of


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one thread: two threads on a shared 2-core machine are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def model(*layers: LayerSpec) -> ModelSpec:
    return ModelSpec(layers=layers)


# Each allowed layer inside a small model that is valid around it:
# (layers, per-sample input shape, num_classes, vocab_size).
LAYER_CASES: dict[str, tuple[tuple[LayerSpec, ...], tuple[int, ...], int | None, int | None]] = {
    "Linear": ((L("Linear", out_features=5, bias=False),), (7,), 5, None),
    "Conv2d": (
        (
            L("Conv2d", out_channels=4, kernel_size=3, stride=2, padding=1),
            L("Flatten"),
            L("Linear", out_features=3),
        ),
        (2, 9, 9),
        3,
        None,
    ),
    "MaxPool2d": (
        (L("MaxPool2d", kernel_size=3, stride=2), L("Flatten"), L("Linear", out_features=3)),
        (2, 9, 9),
        3,
        None,
    ),
    "Flatten": ((L("Flatten"), L("Linear", out_features=2)), (3, 4, 5), 2, None),
    "ReLU": ((L("ReLU"), L("Linear", out_features=2)), (6,), 2, None),
    "GELU": ((L("GELU"), L("Linear", out_features=2)), (6,), 2, None),
    "Tanh": ((L("Tanh"), L("Linear", out_features=2)), (6,), 2, None),
    "Dropout": ((L("Dropout", p=0.25), L("Linear", out_features=2)), (6,), 2, None),
    "LayerNorm": ((L("LayerNorm"), L("Linear", out_features=2)), (6,), 2, None),
    "Embedding": ((L("Embedding", embedding_dim=8), L("Linear", out_features=11)), (5,), None, 11),
    "PositionalEmbedding": (
        (
            L("Embedding", embedding_dim=8),
            L("PositionalEmbedding", max_len=9),
            L("Linear", out_features=11),
        ),
        (5,),
        None,
        11,
    ),
    "CausalSelfAttention": (
        (
            L("Embedding", embedding_dim=8),
            L("CausalSelfAttention", heads=2, mlp_ratio=2, dropout=0.1),
            L("Linear", out_features=11),
        ),
        (5,),
        None,
        11,
    ),
}


def _input(shape: tuple[int, ...], vocab: int | None, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    if vocab is not None:
        return torch.randint(0, vocab, (batch, *shape), generator=generator)
    return torch.randn((batch, *shape), generator=generator)


def test_every_allowed_layer_has_a_case() -> None:
    assert set(LAYER_CASES) == set(ALLOWED_LAYERS)


@pytest.mark.parametrize("layer_type", sorted(LAYER_CASES))
def test_every_allowed_layer_builds_and_runs(layer_type: str) -> None:
    layers, shape, classes, vocab = LAYER_CASES[layer_type]
    spec = model(*layers)
    module = build_model(spec, shape, num_classes=classes, vocab_size=vocab)
    assert isinstance(module, nn.Sequential)
    output = module(_input(shape, vocab))
    expected = (3, classes) if classes is not None else (3, shape[0], vocab)
    assert tuple(output.shape) == expected
    assert check_model(spec, shape, num_classes=classes, vocab_size=vocab) == parameter_count(
        module
    )


def test_layer_parameters_reach_torch() -> None:
    conv = build_model(model(*LAYER_CASES["Conv2d"][0]), (2, 9, 9), num_classes=3)[0]
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels) == (2, 4)
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (2, 2), (1, 1))
    pool = build_model(
        model(L("MaxPool2d", kernel_size=2), L("Flatten"), L("Linear", out_features=2)),
        (1, 6, 6),
        num_classes=2,
    )[0]
    assert isinstance(pool, nn.MaxPool2d) and pool.stride == 2
    linear = build_model(model(*LAYER_CASES["Linear"][0]), (7,), num_classes=5)[0]
    assert isinstance(linear, nn.Linear) and linear.bias is None and linear.in_features == 7
    drop = build_model(model(*LAYER_CASES["Dropout"][0]), (6,), num_classes=2)[0]
    assert isinstance(drop, nn.Dropout) and drop.p == 0.25


def test_state_dict_names_follow_layer_positions() -> None:
    module = build_model(
        model(L("Flatten"), L("Linear", out_features=4), L("ReLU"), L("Linear", out_features=2)),
        (1, 3, 3),
        num_classes=2,
    )
    assert list(module.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert module[1].in_features == 9


# ----------------------------------------------------------------- shape errors


SHAPE_ERRORS = [
    (
        model(L("Linear", out_features=8), L("Conv2d", out_channels=2, kernel_size=3)),
        (64,),
        1,
        "Conv2d needs a (C, H, W) input, got (8,)",
    ),
    (
        model(L("Conv2d", out_channels=2, kernel_size=5)),
        (1, 4, 4),
        0,
        "kernel 5 larger than the 4x4 input",
    ),
    (
        model(L("ReLU"), L("MaxPool2d", kernel_size=5)),
        (1, 4, 6),
        1,
        "kernel 5 larger than the 4x6 input",
    ),
    (
        model(L("Embedding", embedding_dim=8), L("PositionalEmbedding", max_len=4)),
        (5,),
        1,
        "sequence length 5 is longer than max_len 4",
    ),
    (
        model(L("Embedding", embedding_dim=10), L("CausalSelfAttention", heads=4)),
        (5,),
        1,
        "embedding size 10 is not divisible by 4 heads",
    ),
    (
        model(L("Embedding", embedding_dim=4), L("Flatten"), L("CausalSelfAttention", heads=2)),
        (6,),
        2,
        "needs a (T, C) sequence input, got (24,)",
    ),
    (model(L("Flatten"), L("Embedding", embedding_dim=4)), (6,), 1, "Embedding needs token ids"),
]


@pytest.mark.parametrize(("spec", "shape", "index", "fragment"), SHAPE_ERRORS)
def test_shape_errors_name_the_layer(
    spec: ModelSpec, shape: tuple[int, ...], index: int, fragment: str
) -> None:
    text = spec.layers[0].type == "Embedding"
    with pytest.raises(JobSpecError) as caught:
        build_model(spec, shape, num_classes=None if text else 2, vocab_size=7 if text else None)
    assert caught.value.field == f"model.layers[{index}]"
    assert fragment in caught.value.reason


def test_token_input_must_start_with_embedding() -> None:
    with pytest.raises(JobSpecError) as caught:
        build_model(model(L("Linear", out_features=4)), (6,), vocab_size=4)
    assert caught.value.field == "model.layers[0]"
    assert "token ids" in caught.value.reason


def test_output_must_match_the_task() -> None:
    with pytest.raises(JobSpecError) as caught:
        build_model(model(L("Flatten"), L("Linear", out_features=64)), (1, 8, 8), num_classes=10)
    assert caught.value.field == "model.layers"
    assert "outputs [N, 64] but the task needs [N, 10]" in caught.value.reason
    with pytest.raises(JobSpecError) as caught:
        build_model(model(L("Embedding", embedding_dim=8)), (5,), vocab_size=11)
    assert "outputs [N, 5, 8] but the task needs [N, 5, 11]" in caught.value.reason


def test_unknown_layer_type_is_refused_listing_the_allowed() -> None:
    with pytest.raises(JobSpecError) as caught:
        build_model(model(L("Flatten"), LayerSpec("Relu")), (4,), num_classes=4)
    assert caught.value.field == "model.layers[1].type"
    assert "'ReLU'" in caught.value.reason
    for allowed in ALLOWED_LAYERS:
        assert allowed in caught.value.reason


def test_invalid_layer_parameters_are_refused_at_build() -> None:
    with pytest.raises(JobSpecError) as caught:
        build_model(model(L("Linear", out_features=0)), (4,), num_classes=4)
    assert caught.value.field == "model.layers[0].out_features"
    with pytest.raises(JobSpecError) as caught:
        build_model(model(L("Linear", out_features=4, init="eval('x')")), (4,), num_classes=4)
    assert caught.value.field == "model.layers[0].init"


def test_parameter_cap_is_enforced_before_allocation() -> None:
    # 65536 x 65536 weights would need 16 GiB: refused from the arithmetic alone.
    huge = model(
        L("Linear", out_features=65536),
        L("Linear", out_features=65536),
        L("Linear", out_features=2),
    )
    with pytest.raises(JobSpecError) as caught:
        build_model(huge, (8,), num_classes=2)
    assert caught.value.field == "model.layers[1]"
    assert f"{MAX_PARAMETERS:,}" in caught.value.reason


def test_auto_model_without_layers_cannot_be_built() -> None:
    with pytest.raises(JobSpecError) as caught:
        build_model(ModelSpec(layers=(), auto=True), (4,), num_classes=2)
    assert caught.value.field == "model"


def test_bad_input_shape_and_task_are_refused() -> None:
    with pytest.raises(JobSpecError):
        build_model(model(L("Linear", out_features=2)), (0,), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        build_model(model(L("Linear", out_features=2)), (4,))


# -------------------------------------------------------------------- weights

MLP = model(L("Flatten"), L("Linear", out_features=16), L("Tanh"), L("Linear", out_features=3))


def test_initial_weights_are_deterministic_per_seed() -> None:
    first = initial_weights(MLP, (5,), num_classes=3, seed=11)
    again = initial_weights(MLP, (5,), num_classes=3, seed=11)
    other = initial_weights(MLP, (5,), num_classes=3, seed=12)
    assert list(first) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert all(array.dtype == np.float32 for array in first.values())
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["1.weight"], other["1.weight"])


def test_initial_weights_leave_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    initial_weights(MLP, (5,), num_classes=3, seed=99)
    assert torch.equal(torch.get_rng_state(), state)


def test_weights_round_trip_through_safetensors() -> None:
    source = build_model(MLP, (5,), num_classes=3)
    load_weights(source, initial_weights(MLP, (5,), num_classes=3, seed=1))
    weights = decode_tensors(encode_tensors(model_weights(source)))
    target = build_model(MLP, (5,), num_classes=3)
    load_weights(target, weights)
    batch = _input((5,), None)
    assert torch.equal(source(batch), target(batch))
    copied = model_weights(target)
    copied["1.bias"][:] = 7.0
    assert not torch.equal(target[1].bias, torch.full((16,), 7.0))


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda w: w.pop("3.bias"), "'3.bias'"),
        (lambda w: w.update({"9.weight": np.zeros(2, np.float32)}), "'9.weight'"),
        (lambda w: w.update({"1.weight": np.zeros((16, 4), np.float32)}), "shape"),
        (lambda w: w.update({"1.bias": w["1.bias"].astype(np.float64)}), "dtype"),
        (lambda w: w.update({"1.bias": [0.0] * 16}), "numpy array"),
    ],
)
def test_load_weights_is_strict(edit: object, fragment: str) -> None:
    module = build_model(MLP, (5,), num_classes=3)
    before = model_weights(module)
    weights = dict(initial_weights(MLP, (5,), num_classes=3, seed=3))
    edit(weights)  # type: ignore[operator]
    with pytest.raises(ValueError, match="tensor") as caught:
        load_weights(module, weights)
    assert fragment in str(caught.value)
    after = model_weights(module)
    assert all(np.array_equal(before[name], after[name]) for name in before)


# ------------------------------------------------------------------ attention


def test_attention_is_causal() -> None:
    spec = select_model("text", (16,), vocab_size=30)
    module = build_model(spec, (16,), vocab_size=30).eval()
    tokens = _input((16,), 30, batch=2)
    changed = tokens.clone()
    position = 9
    changed[:, position] = (changed[:, position] + 1) % 30
    changed[:, position + 3] = (changed[:, position + 3] + 5) % 30
    with torch.no_grad():
        before, after = module(tokens), module(changed)
    assert torch.equal(before[:, :position], after[:, :position])
    assert not torch.allclose(before[:, position], after[:, position])
    assert not torch.allclose(before[:, -1], after[:, -1])


# ------------------------------------------------------------------- selector

ZOO_TASKS = [
    ("image", (1, 8, 8), 10, None, "cnn"),
    ("image", (1, 28, 28), 10, None, "cnn"),
    ("image", (3, 64, 48), 5, None, "cnn"),
    ("image", (1, 3, 3), 2, None, "cnn"),
    ("tabular", (20,), 4, None, "mlp"),
    ("text", (64,), None, 80, "char-transformer"),
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("kind", "shape", "classes", "vocab", "chosen"), ZOO_TASKS)
def test_zoo_model_builds_and_learns(
    kind: str, shape: tuple[int, ...], classes: int | None, vocab: int | None, chosen: str
) -> None:
    spec = select_model(kind, shape, num_classes=classes, vocab_size=vocab)
    assert (spec.auto, spec.chosen) == (True, chosen)
    module = build_model(spec, shape, num_classes=classes, vocab_size=vocab)
    load_weights(
        module, initial_weights(spec, shape, num_classes=classes, vocab_size=vocab, seed=0)
    )
    assert check_model(spec, shape, num_classes=classes, vocab_size=vocab) == parameter_count(
        module
    )
    inputs = _input(shape, vocab, batch=8)
    generator = torch.Generator().manual_seed(2)
    if vocab is not None:
        targets = torch.randint(0, vocab, (8, *shape), generator=generator)
    else:
        assert classes is not None
        targets = torch.randint(0, classes, (8,), generator=generator)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = module(inputs)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_cnn_fits_the_input_size() -> None:
    def pools(shape: tuple[int, ...]) -> int:
        spec = select_model("image", shape, num_classes=10)
        return sum(layer.type == "MaxPool2d" for layer in spec.layers)

    assert pools((1, 8, 8)) == 1
    assert pools((1, 28, 28)) == 2
    assert pools((1, 3, 3)) == 0


def test_text_model_matches_the_brief() -> None:
    spec = select_model("text", (64,), vocab_size=80)
    assert [layer.type for layer in spec.layers] == [
        "Embedding",
        "PositionalEmbedding",
        "CausalSelfAttention",
        "CausalSelfAttention",
        "LayerNorm",
        "Linear",
    ]
    assert spec.layers[1].get("max_len") == 64
    assert spec.layers[-1].get("out_features") == 80


def test_selector_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(JobSpecError, match="kinds: image, tabular, text"):
        select_model("audio", (16,), num_classes=2)
    with pytest.raises(JobSpecError, match="number of classes"):
        select_model("image", (1, 8, 8))
    with pytest.raises(JobSpecError, match=r"\(C, H, W\)"):
        select_model("image", (64,), num_classes=10)
    with pytest.raises(JobSpecError, match="vocabulary"):
        select_model("text", (64,), num_classes=10)


JOB = """
name = "job"
model = "auto"
loss = "cross_entropy"
samples_per_calculation = 64
calculations_per_round = 1
[dataset]
source = "digits"
[optimizer]
name = "adam"
lr = 0.001
[stop]
max_rounds = 10
[payment]
price_per_calculation = "0.01"
budget = "1"
"""


def test_resolve_model_fills_auto_and_records_the_choice() -> None:
    spec = parse_job_spec(JOB)
    resolved = resolve_model(spec, "image", (1, 8, 8), num_classes=10)
    assert resolved.model.auto and resolved.model.chosen == "cnn"
    assert resolved.model == select_model("image", (1, 8, 8), num_classes=10)
    assert resolved.with_model(spec.model) == spec
    assert JobSpec.from_dict(resolved.to_dict()) == resolved
    assert resolve_model(resolved, "image", (1, 8, 8), num_classes=10) is resolved


def test_resolve_model_keeps_given_layers_and_checks_them() -> None:
    spec = parse_job_spec(JOB).with_model(MLP)
    assert resolve_model(spec, "tabular", (5,), num_classes=3) is spec
    with pytest.raises(JobSpecError) as caught:
        resolve_model(spec, "tabular", (5,), num_classes=10)
    assert caught.value.field == "model.layers"


# ------------------------------------------------------------- real training


def _train_and_score(
    module: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    lr: float,
) -> float:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    images, labels = train
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(module(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    module.eval()
    with torch.no_grad():
        predicted = module(test[0]).argmax(dim=1)
    return (predicted == test[1]).float().mean().item()


@pytest.mark.usefixtures("one_thread")
def test_auto_digits_model_reaches_ninety_percent() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    cut = int(0.8 * len(order))
    train, test = order[:cut], order[cut:]
    spec = resolve_model(parse_job_spec(JOB), "image", (1, 8, 8), num_classes=10)
    module = build_model(spec.model, (1, 8, 8), num_classes=10)
    load_weights(module, initial_weights(spec.model, (1, 8, 8), num_classes=10, seed=spec.seed))
    accuracy = _train_and_score(
        module, (images[train], labels[train]), (images[test], labels[test]), epochs=5, lr=3e-3
    )
    assert accuracy >= 0.9


def _read_idx(path: Path, count: int) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        magic = stream.read(4)
        dims = magic[3]
        shape = struct.unpack(f">{dims}I", stream.read(4 * dims))
        size = int(np.prod(shape[1:], dtype=np.int64)) if dims > 1 else 1
        data = np.frombuffer(stream.read(count * size), dtype=np.uint8)
    return data.reshape((count, *shape[1:]))


@pytest.mark.usefixtures("one_thread")
def test_auto_mnist_model_learns_real_digits() -> None:
    folder = DATASETS / "mnist"
    images_file = folder / "train-images.idx3-ubyte.gz"
    labels_file = folder / "train-labels.idx1-ubyte.gz"
    if not images_file.exists() or not labels_file.exists():
        pytest.skip(f"MNIST files not found under {folder}")
    images = torch.tensor(_read_idx(images_file, 3000) / 255.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(_read_idx(labels_file, 3000), dtype=torch.int64)
    spec = select_model("image", (1, 28, 28), num_classes=10)
    module = build_model(spec, (1, 28, 28), num_classes=10)
    load_weights(module, initial_weights(spec, (1, 28, 28), num_classes=10, seed=0))
    accuracy = _train_and_score(
        module, (images[:2500], labels[:2500]), (images[2500:], labels[2500:]), epochs=1, lr=2e-3
    )
    assert accuracy >= 0.8
