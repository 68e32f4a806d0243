"""The compute kernel is deterministic, computes the right gradient, and the master's
optimizer averages, steps and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from ravenp2p.training.compute import ComputeProfile, Evaluation, ModelRuntime, Trainer
from ravenp2p.training.datasets import DataInfo, Split, cut_shards, load_dataset, read_shard
from ravenp2p.training.models import build_model, load_weights
from ravenp2p.training.spec import DatasetSpec, LayerSpec, ModelSpec, OptimizerSpec
from ravenp2p.training.tensors import decode_tensors, digest_of, encode_tensors

PROFILE = ComputeProfile()
MLP = ModelSpec(
    layers=(
        LayerSpec.of("Flatten"),
        LayerSpec.of("Linear", out_features=32),
        LayerSpec.of("ReLU"),
        LayerSpec.of("Linear", out_features=10),
    )
)
DROPOUT_MLP = ModelSpec(
    layers=(
        LayerSpec.of("Flatten"),
        LayerSpec.of("Linear", out_features=32),
        LayerSpec.of("ReLU"),
        LayerSpec.of("Dropout", p=0.5),
        LayerSpec.of("Linear", out_features=10),
    )
)
SOFTMAX = ModelSpec(layers=(LayerSpec.of("Flatten"), LayerSpec.of("Linear", out_features=10)))
OPTIMIZERS = [
    OptimizerSpec("sgd", lr=0.05),
    OptimizerSpec("sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    OptimizerSpec("adam", lr=0.01, betas=(0.8, 0.99)),
    OptimizerSpec("adamw", lr=0.01, weight_decay=0.1),
]


@pytest.fixture(scope="module")
def digits() -> tuple[DataInfo, list[Split], Split]:
    info, train, holdout = load_dataset(DatasetSpec("digits"))
    shards = [read_shard(data, info) for data in cut_shards(train, 64)]
    return info, shards, holdout


@pytest.fixture(scope="module")
def runtime(digits: tuple[DataInfo, list[Split], Split]) -> ModelRuntime:
    return ModelRuntime(MLP, digits[0], "cross_entropy")


def blob(tensors: Mapping[str, np.ndarray]) -> bytes:
    return encode_tensors(dict(sorted(tensors.items())))


def rel_l2(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    diff = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
    norm = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return (diff / norm) ** 0.5


# gradients ------------------------------------------------------------------


def test_gradient_is_bitwise_reproducible_across_calls_and_runtimes(
    digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    info, shards, _ = digits
    weights = runtime.initial_weights(3)
    first = runtime.gradient(weights, shards[0], seed=1, profile=PROFILE)
    assert set(first) == set(runtime.parameter_shapes)
    assert all(g.dtype == np.float32 for g in first.values())
    runtime.gradient(weights, shards[1], seed=1, profile=PROFILE)  # other work in between
    second = runtime.gradient(weights, shards[0], seed=1, profile=PROFILE)
    other = ModelRuntime(MLP, DataInfo.from_dict(info.to_dict()), "cross_entropy")
    third = other.gradient(weights, shards[0], seed=1, profile=PROFILE)
    assert digest_of(blob(first)) == digest_of(blob(second)) == digest_of(blob(third))
    # Without dropout, train and eval mode agree, so the reported loss is the shard's loss.
    assert other.last_loss == pytest.approx(other.evaluate(weights, shards[0]).loss, rel=1e-5)
    two = ComputeProfile(threads=2)
    assert blob(runtime.gradient(weights, shards[0], seed=1, profile=two)) == blob(
        runtime.gradient(weights, shards[0], seed=1, profile=two)
    )
    assert blob(runtime.gradient(weights, shards[1], seed=1, profile=PROFILE)) != blob(first)


def test_gradient_matches_the_closed_form_of_softmax_regression(
    digits: tuple[DataInfo, list[Split], Split],
) -> None:
    info, shards, _ = digits
    runtime = ModelRuntime(SOFTMAX, info, "cross_entropy")
    weights = runtime.initial_weights(0)
    grads = runtime.gradient(weights, shards[2], seed=0, profile=PROFILE)
    x = shards[2].inputs.reshape(64, -1).astype(np.float64) / 16.0
    w, b = weights["1.weight"].astype(np.float64), weights["1.bias"].astype(np.float64)
    logits = x @ w.T + b
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    delta = probs - np.eye(10)[shards[2].targets]
    np.testing.assert_allclose(grads["1.weight"], delta.T @ x / 64, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["1.bias"], delta.mean(axis=0), rtol=1e-4, atol=1e-6)


def test_gradient_is_the_mean_over_the_shard(
    digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    _, shards, _ = digits
    weights = runtime.initial_weights(4)
    shard = shards[5]
    whole = runtime.gradient(weights, shard, seed=0, profile=PROFILE)
    halves = [
        runtime.gradient(weights, Split(shard.inputs[s], shard.targets[s]), seed=0, profile=PROFILE)
        for s in (slice(0, 32), slice(32, 64))
    ]
    mean = {k: (halves[0][k].astype(np.float64) + halves[1][k]) / 2 for k in whole}
    assert rel_l2(whole, mean) < 1e-6


def test_float64_profile_agrees_closely_and_publishes_float32(
    digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    _, shards, _ = digits
    weights = runtime.initial_weights(5)
    single = runtime.gradient(weights, shards[0], seed=0, profile=PROFILE)
    double = runtime.gradient(weights, shards[0], seed=0, profile=ComputeProfile(dtype="float64"))
    assert all(g.dtype == np.float32 for g in double.values())
    assert 0 < rel_l2(single, double) < 1e-5 or blob(single) == blob(double)


def test_dropout_is_seeded_and_leaves_the_global_rng_alone(
    digits: tuple[DataInfo, list[Split], Split],
) -> None:
    info, shards, holdout = digits
    runtime = ModelRuntime(DROPOUT_MLP, info, "cross_entropy")
    other = ModelRuntime(DROPOUT_MLP, info, "cross_entropy")
    weights = runtime.initial_weights(6)
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = runtime.gradient(weights, shards[0], seed=77, profile=PROFILE)
    assert torch.equal(torch.rand(3), expected_next)
    b = other.gradient(weights, shards[0], seed=77, profile=PROFILE)
    c = runtime.gradient(weights, shards[0], seed=78, profile=PROFILE)
    assert blob(a) == blob(b)
    assert blob(a) != blob(c)  # the seed reaches the dropout masks
    # Evaluation runs without dropout, hence equal on repeat.
    assert runtime.evaluate(weights, holdout) == runtime.evaluate(weights, holdout)


def test_gradient_refuses_misfits(
    digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    _, shards, _ = digits
    weights = runtime.initial_weights(0)
    shard = shards[0]
    with pytest.raises(ValueError, match="dtype float32, expected uint8"):
        runtime.gradient(
            weights, Split(shard.inputs.astype(np.float32), shard.targets), seed=0, profile=PROFILE
        )
    with pytest.raises(ValueError, match="shape"):
        runtime.gradient(
            weights, Split(shard.inputs[:, :, :4], shard.targets), seed=0, profile=PROFILE
        )
    with pytest.raises(ValueError, match="seed"):
        runtime.gradient(weights, shard, seed=-1, profile=PROFILE)
    broken = dict(weights)
    del broken["1.bias"]
    with pytest.raises(ValueError, match=r"weights: missing tensors '1\.bias'"):
        runtime.gradient(broken, shard, seed=0, profile=PROFILE)
    with pytest.raises(ValueError, match="mse"):
        ModelRuntime(MLP, DataInfo("text", "language", (8,), vocab="ab"), "mse")
    with pytest.raises(ValueError, match="hinge"):
        ModelRuntime(MLP, digits[0], "hinge")


def test_mse_loss_trains_towards_one_hot(digits: tuple[DataInfo, list[Split], Split]) -> None:
    info, shards, holdout = digits
    runtime = ModelRuntime(MLP, info, "mse")
    weights = runtime.initial_weights(0)
    trainer = Trainer(runtime, weights, OptimizerSpec("adam", lr=0.01))
    before = runtime.evaluate(weights, holdout)
    for shard in shards[:10]:
        weights = trainer.step([runtime.gradient(weights, shard, seed=0, profile=PROFILE)])
    after = runtime.evaluate(weights, holdout)
    assert after.loss < before.loss


def test_language_model_gradient_and_next_char_accuracy(tmp_path: Path) -> None:
    text = "abcab cabca bcabc " * 40
    (tmp_path / "t.txt").write_text(text)
    info, train, holdout = load_dataset(DatasetSpec(str(tmp_path / "t.txt"), seq_len=12))
    assert info.vocab_size is not None
    model = ModelSpec(
        layers=(
            LayerSpec.of("Embedding", embedding_dim=16),
            LayerSpec.of("PositionalEmbedding", max_len=12),
            LayerSpec.of("CausalSelfAttention", heads=2, dropout=0.1),
            LayerSpec.of("LayerNorm"),
            LayerSpec.of("Linear", out_features=info.vocab_size),
        )
    )
    runtime = ModelRuntime(model, info, "cross_entropy")
    weights = runtime.initial_weights(0)
    shard = read_shard(cut_shards(train, 8)[0], info)
    first = runtime.gradient(weights, shard, seed=9, profile=PROFILE)
    assert blob(first) == blob(runtime.gradient(weights, shard, seed=9, profile=PROFILE))
    trainer = Trainer(runtime, weights, OptimizerSpec("adam", lr=0.01))
    for step in range(60):
        part = Split(train.inputs[step % 6 :: 6][:8], train.targets[step % 6 :: 6][:8])
        weights = trainer.step([runtime.gradient(weights, part, seed=step, profile=PROFILE)])
    result = runtime.evaluate(weights, holdout)
    assert result.samples == len(holdout)
    assert result.accuracy is not None and result.accuracy > 0.7  # the text is periodic


# evaluation -------------------------------------------------------------------


def test_evaluate_counts_and_matches_an_independent_forward(
    digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    info, _, holdout = digits
    weights = runtime.initial_weights(8)
    result = runtime.evaluate(weights, holdout)
    assert isinstance(result, Evaluation) and result.samples == len(holdout)
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0
    module = build_model(MLP, info.input_shape, num_classes=10)
    load_weights(module, weights)
    module.eval()
    with torch.no_grad():
        x = torch.from_numpy(holdout.inputs.astype(np.float32) / 16.0)
        assert torch.equal(runtime.prepare_inputs(holdout.inputs), x)
        logits = module(x)
    targets = torch.from_numpy(holdout.targets)
    assert result.accuracy == float((logits.argmax(1) == targets).double().mean())
    expected_loss = float(torch.nn.functional.cross_entropy(logits, targets))
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    batched = runtime.evaluate(weights, holdout, batch_size=7)
    assert batched.accuracy == result.accuracy
    assert batched.loss == pytest.approx(result.loss, rel=1e-5)


# the master's optimizer --------------------------------------------------------


def test_training_on_digits_reaches_ninety_percent(
    digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    _, shards, holdout = digits
    weights = runtime.initial_weights(0)
    trainer = Trainer(runtime, weights, OptimizerSpec("adam", lr=0.01))
    assert runtime.evaluate(weights, holdout).accuracy < 0.5  # type: ignore[operator]
    for epoch in range(4):
        for index in range(0, len(shards), 2):
            pair = shards[index : index + 2]
            grads = [runtime.gradient(weights, s, seed=epoch, profile=PROFILE) for s in pair]
            weights = trainer.step(grads)
    assert trainer.steps == 4 * ((len(shards) + 1) // 2)
    accuracy = runtime.evaluate(weights, holdout).accuracy
    assert accuracy is not None and accuracy >= 0.9


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: f"{s.name}-{s.momentum}")
def test_averaging_equal_gradients_equals_one(
    spec: OptimizerSpec, digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    weights = runtime.initial_weights(1)
    grad = runtime.gradient(weights, digits[1][0], seed=0, profile=PROFILE)
    once = Trainer(runtime, weights, spec)
    twice = Trainer(runtime, weights, spec)
    assert blob(once.step([grad])) == blob(twice.step([grad, dict(grad)]))
    assert blob(once.weights()) != blob(weights)


def test_sgd_steps_with_the_mean_gradient(
    digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    weights = runtime.initial_weights(2)
    g1 = runtime.gradient(weights, digits[1][0], seed=0, profile=PROFILE)
    g2 = runtime.gradient(weights, digits[1][1], seed=0, profile=PROFILE)
    new = Trainer(runtime, weights, OptimizerSpec("sgd", lr=0.5)).step([g1, g2])
    for name, value in weights.items():
        expected = value - 0.5 * (g1[name].astype(np.float64) + g2[name]) / 2
        np.testing.assert_allclose(new[name], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: f"{s.name}-{s.momentum}")
def test_optimizer_state_resumes_bitwise(
    spec: OptimizerSpec, digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    _, shards, _ = digits
    start = runtime.initial_weights(3)
    straight = Trainer(runtime, start, spec)
    grads = []
    weights = start
    for shard in shards[:3]:
        grads.append(runtime.gradient(weights, shard, seed=0, profile=PROFILE))
        weights = straight.step([grads[-1]])
    resumed = Trainer(runtime, start, spec)
    after_one = resumed.step([grads[0]])
    # Ship weights and state as canonical bytes, as a checkpoint would.
    state = decode_tensors(encode_tensors(resumed.optimizer_state()))
    assert int(state["step"][0]) == 1
    fresh = Trainer(runtime, decode_tensors(encode_tensors(after_one)), spec)
    fresh.load_optimizer_state(state)
    assert fresh.steps == 1
    fresh.step([grads[1]])
    final = fresh.step([grads[2]])
    assert blob(final) == blob(weights)
    assert blob(fresh.optimizer_state()) == blob(straight.optimizer_state())


def test_load_optimizer_state_is_strict(runtime: ModelRuntime) -> None:
    weights = runtime.initial_weights(0)
    trainer = Trainer(runtime, weights, OptimizerSpec("adam", lr=0.01))
    grad = {
        name: np.ones(shape, dtype=np.float32) for name, shape in runtime.parameter_shapes.items()
    }
    trainer.step([grad])
    state = trainer.optimizer_state()
    assert set(state) == {"step"} | {
        f"{key}/{name}" for key in ("exp_avg", "exp_avg_sq") for name in runtime.parameter_shapes
    }
    target = Trainer(runtime, weights, OptimizerSpec("adam", lr=0.01))
    cases: list[tuple[dict[str, np.ndarray], str]] = [
        (
            {k: v for k, v in state.items() if k != "exp_avg/1.bias"},
            "missing tensors 'exp_avg/1.bias'",
        ),
        ({**state, "momentum_buffer/1.bias": state["exp_avg/1.bias"]}, "unexpected tensors"),
        ({**state, "exp_avg/1.bias": np.zeros(3, dtype=np.float32)}, "'exp_avg/1.bias' has shape"),
        ({**state, "exp_avg/1.bias": state["exp_avg/1.bias"].astype(np.float64)}, "float32"),
        ({**state, "step": np.array([1], dtype=np.int32)}, "'step'"),
        ({**state, "step": np.array([0], dtype=np.int64)}, "unexpected tensors"),
    ]
    for broken, message in cases:
        with pytest.raises(ValueError, match=message):
            target.load_optimizer_state(broken)
    assert target.steps == 0
    target.load_optimizer_state(state)
    assert target.steps == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("nan", "gradient 1: tensor '1.weight' contains NaN"),
        ("shape", "gradient 1: tensor '1.weight' has shape"),
        ("missing", "gradient 1: missing tensors '1.weight'"),
        ("extra", "gradient 1: unexpected tensors 'bogus'"),
        ("dtype", "gradient 1: tensor '1.weight' has dtype float64"),
    ],
)
def test_bad_gradients_are_refused(
    damage: str, message: str, digits: tuple[DataInfo, list[Split], Split], runtime: ModelRuntime
) -> None:
    weights = runtime.initial_weights(0)
    good = runtime.gradient(weights, digits[1][0], seed=0, profile=PROFILE)
    bad = dict(good)
    if damage == "nan":
        bad["1.weight"] = good["1.weight"].copy()
        bad["1.weight"][0, 0] = np.nan
    elif damage == "shape":
        bad["1.weight"] = good["1.weight"][:, :-1].copy()
    elif damage == "missing":
        del bad["1.weight"]
    elif damage == "extra":
        bad["bogus"] = np.zeros(1, dtype=np.float32)
    else:
        bad["1.weight"] = good["1.weight"].astype(np.float64)
    trainer = Trainer(runtime, weights, OptimizerSpec("sgd", lr=0.1))
    with pytest.raises(ValueError, match=message):
        trainer.step([good, bad])
    with pytest.raises(ValueError, match="at least one"):
        trainer.step([])
    assert blob(trainer.weights()) == blob(weights) and trainer.steps == 0


def test_compute_profile_round_trip_and_refusals() -> None:
    profile = ComputeProfile(threads=4, dtype="float64")
    assert ComputeProfile.from_dict(profile.to_dict()) == profile
    for data, message in [
        ({"threads": 0, "dtype": "float32"}, "'threads' is 0"),
        ({"threads": True, "dtype": "float32"}, "'threads' must be an integer"),
        ({"threads": 1, "dtype": "float16"}, "'dtype' is 'float16'"),
        ({"threads": 1}, "missing keys dtype"),
        ({"threads": 1, "dtype": "float32", "isa": "avx"}, "unknown keys isa"),
        ([1, "float32"], "must be a mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            ComputeProfile.from_dict(data)
