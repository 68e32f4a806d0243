"""Job specs: the examples load, every rule refuses bad input naming the field, dicts round-trip."""

from __future__ import annotations

import copy
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ravenp2p.training import spec as spec_module
from ravenp2p.training.spec import (
    ALLOWED_LAYERS,
    MAX_AMOUNT_RAVEN,
    RAVEN,
    ZOO_MODELS,
    DatasetSpec,
    JobSpec,
    JobSpecError,
    LayerSpec,
    ModelSpec,
    OptimizerSpec,
    ParamRule,
    StopSpec,
    format_amount,
    load_job_spec,
    parse_amount,
    parse_job_spec,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "jobs"

BASE_TOML = """
name = "digits-mlp"
loss = "cross_entropy"
samples_per_calculation = 256
calculations_per_round = 2
redundancy = 3
seed = 0

[model]
layers = [
    { type = "Flatten" },
    { type = "Linear", out_features = 128 },
    { type = "ReLU" },
    { type = "Linear", out_features = 10 },
]

[dataset]
source = "digits"
holdout = 0.1

[optimizer]
name = "adam"
lr = 0.001

[stop]
max_rounds = 300
target_accuracy = 0.95
evaluate_every = 5

[payment]
price_per_calculation = "0.001"
budget = "2"
"""

BASE = JobSpec.from_dict(parse_job_spec(BASE_TOML).to_dict()).to_dict()


def edited(path: str, value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    """A copy of the base spec dict with the dotted `path` set to `value` (or deleted)."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node["layers"][int(part[7:-1])] if part.startswith("layers[") else node[part]
    if last.startswith("layers[") and not delete:
        node["layers"][int(last[7:-1])] = value
    elif delete:
        del node[last]
    else:
        node[last] = value
    return data


def refused(data: object) -> JobSpecError:
    with pytest.raises(JobSpecError) as caught:
        JobSpec.from_dict(data)
    return caught.value


# ------------------------------------------------------------------ examples


def test_all_examples_are_present() -> None:
    names = sorted(path.name for path in EXAMPLES.glob("*.toml"))
    assert names == ["digits-auto.toml", "digits-quick.toml", "digits-usd.toml", "digits.toml",
                     "mnist-mlp.toml",
                     "shakespeare-char.toml"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda path: path.stem)
def test_example_loads_and_round_trips(path: Path) -> None:
    spec = load_job_spec(path)
    assert spec.budget >= spec.max_cost()
    assert JobSpec.from_dict(msgpack.unpackb(msgpack.packb(spec.to_dict()))) == spec


def test_example_details() -> None:
    digits = load_job_spec(EXAMPLES / "digits.toml")
    assert [layer.type for layer in digits.model.layers] == ["Flatten", "Linear", "ReLU", "Linear"]
    assert digits.model.layers[-1].get("out_features") == 10
    assert digits.dataset.source == "digits"
    auto = load_job_spec(EXAMPLES / "digits-auto.toml")
    assert auto.model == ModelSpec(layers=(), auto=True)
    mnist = load_job_spec(EXAMPLES / "mnist-mlp.toml")
    assert Path(mnist.dataset.source) == (REPO / "data" / "mnist").resolve()
    assert mnist.optimizer.momentum == 0.9
    text = load_job_spec(EXAMPLES / "shakespeare-char.toml")
    assert text.dataset.format == "text"
    assert text.stop.target_loss == 1.8


# ------------------------------------------------------------------- parsing


def test_documented_layout_is_a_valid_spec() -> None:
    doc = spec_module.__doc__ or ""
    block = doc.split("Layout::", 1)[1].split("An explicit model", 1)[0]
    layout = parse_job_spec("\n".join(line.removeprefix("    ") for line in block.splitlines()))
    assert layout.dataset.source == "digits"
    assert layout.budget >= layout.max_cost()
    layers_block = doc.split("An explicit model", 1)[1].split("::", 1)[1].split("\n\n")[1]
    table = "\n".join(line.removeprefix("    ") for line in layers_block.splitlines())
    with_layers = parse_job_spec(
        BASE_TOML.split("[model]")[0] + table + "\n[dataset]" + BASE_TOML.split("[dataset]")[1]
    )
    assert len(with_layers.model.layers) == 4


def test_base_spec_fields_and_defaults() -> None:
    spec = parse_job_spec(BASE_TOML)
    assert spec.name == "digits-mlp"
    assert spec.price_per_calculation == RAVEN // 1000
    assert spec.budget == 2 * RAVEN
    assert spec.dataset == DatasetSpec(source="digits", holdout=0.1)
    assert spec.optimizer == OptimizerSpec(name="adam", lr=0.001)
    assert spec.stop == StopSpec(max_rounds=300, target_accuracy=0.95, evaluate_every=5)
    assert spec.model.layers[1] == LayerSpec.of("Linear", out_features=128)
    assert not spec.model.auto and spec.model.chosen is None


def test_defaults_apply_when_keys_are_left_out() -> None:
    data = edited("redundancy", delete=True)
    del data["seed"]
    data["dataset"] = {"source": "digits"}
    data["optimizer"] = {"name": "sgd", "lr": 1}
    data["stop"] = {"max_rounds": 300}
    spec = JobSpec.from_dict(data)
    assert (spec.redundancy, spec.seed) == (3, 0)
    assert spec.dataset == DatasetSpec(source="digits")
    assert spec.optimizer.lr == 1.0 and isinstance(spec.optimizer.lr, float)
    assert spec.stop == StopSpec(max_rounds=300)


def test_model_auto() -> None:
    spec = JobSpec.from_dict(edited("model", "auto"))
    assert spec.model == ModelSpec(layers=(), auto=True, chosen=None)
    assert spec.to_dict()["model"] == "auto"


def test_layer_params_are_sorted_and_readable() -> None:
    layer = LayerSpec("Conv2d", (("stride", 2), ("kernel_size", 3), ("out_channels", 8)))
    assert [name for name, _ in layer.params] == ["kernel_size", "out_channels", "stride"]
    assert layer == LayerSpec.of("Conv2d", out_channels=8, stride=2, kernel_size=3)
    assert layer.get("stride") == 2
    assert layer.get("padding") is None
    assert layer.get("padding", 0) == 0


def test_error_carries_field_and_reason() -> None:
    error = JobSpecError("optimizer.lr", "must be positive")
    assert (error.field, error.reason, str(error)) == (
        "optimizer.lr",
        "must be positive",
        "optimizer.lr: must be positive",
    )
    assert isinstance(error, ValueError)


# ---------------------------------------------------------------- validation

RULE_CASES = [
    ("name", "", "name"),
    ("name", "has space", "name"),
    ("name", "x" * 65, "name"),
    ("name", 7, "name"),
    ("loss", "hinge", "loss"),
    ("redundancy", 0, "redundancy"),
    ("redundancy", 10, "redundancy"),
    ("redundancy", True, "redundancy"),
    ("redundancy", 3.0, "redundancy"),
    ("samples_per_calculation", 0, "samples_per_calculation"),
    ("samples_per_calculation", 65537, "samples_per_calculation"),
    ("calculations_per_round", 0, "calculations_per_round"),
    ("calculations_per_round", 257, "calculations_per_round"),
    ("seed", -1, "seed"),
    ("stop.max_rounds", 0, "stop.max_rounds"),
    ("stop.max_rounds", 1_000_001, "stop.max_rounds"),
    ("stop.target_accuracy", 0, "stop.target_accuracy"),
    ("stop.target_accuracy", 1.01, "stop.target_accuracy"),
    ("stop.target_loss", 0, "stop.target_loss"),
    ("stop.evaluate_every", 0, "stop.evaluate_every"),
    ("dataset.holdout", 0, "dataset.holdout"),
    ("dataset.holdout", 0.9, "dataset.holdout"),
    ("dataset.holdout", float("nan"), "dataset.holdout"),
    ("dataset.seq_len", 1, "dataset.seq_len"),
    ("dataset.seq_len", 1025, "dataset.seq_len"),
    ("dataset.max_samples", 0, "dataset.max_samples"),
    ("dataset.format", "xml", "dataset.format"),
    ("dataset.format", "csv", "dataset.format"),
    ("dataset.source", "", "dataset.source"),
    ("dataset.label_column", "", "dataset.label_column"),
    ("optimizer.name", "rmsprop", "optimizer.name"),
    ("optimizer.lr", 0, "optimizer.lr"),
    ("optimizer.lr", 10.5, "optimizer.lr"),
    ("optimizer.lr", "0.1", "optimizer.lr"),
    ("optimizer.weight_decay", 1, "optimizer.weight_decay"),
    ("optimizer.weight_decay", -0.1, "optimizer.weight_decay"),
    ("optimizer.betas", [0.9], "optimizer.betas"),
    ("optimizer.betas", [0.9, 1.0], "optimizer.betas[1]"),
    ("optimizer.momentum", 0.9, "optimizer.momentum"),
    ("payment.price_per_calculation", "0", "payment.price_per_calculation"),
    ("payment.price_per_calculation", "-0.001", "payment.price_per_calculation"),
    ("payment.budget", "abc", "payment.budget"),
    ("payment.budget", True, "payment.budget"),
    ("model", "mlp", "model"),
    ("model.layers", [], "model.layers"),
    ("model.layers", [{"type": "ReLU"}] * 65, "model.layers"),
    ("model.layers", "Linear", "model.layers"),
    ("model.layers[1]", "Linear", "model.layers[1]"),
    ("model.layers[1]", {"out_features": 3}, "model.layers[1].type"),
    ("model.layers[1]", {"type": "Linear"}, "model.layers[1].out_features"),
    ("model.layers[1]", {"type": "Linear", "out_features": 8.0}, "model.layers[1].out_features"),
    ("model.layers[1]", {"type": "Linear", "out_features": 10, "bias": 1}, "model.layers[1].bias"),
    ("model.layers[2]", {"type": "Dropout", "p": 1.0}, "model.layers[2].p"),
    ("model.chosen", "mlp", "model.chosen"),
    ("model.auto", True, "model.chosen"),
    ("model.auto", "yes", "model.auto"),
]


@pytest.mark.parametrize(("path", "value", "field"), RULE_CASES)
def test_rule_refuses_and_names_the_field(path: str, value: Any, field: str) -> None:
    error = refused(edited(path, value))
    assert error.field == field
    assert str(error).startswith(f"{field}: ")


def test_range_message_names_bounds_and_value() -> None:
    assert str(refused(edited("optimizer.lr", -1))) == "optimizer.lr: must be > 0 and <= 10, got -1"
    error = refused(edited("model.layers[3]", {"type": "Linear", "out_features": 0}))
    assert str(error) == (
        "model.layers[3].out_features: must be an integer between 1 and 65536, got 0"
    )
    assert "between 1 and 9" in refused(edited("redundancy", 12)).reason


@pytest.mark.parametrize(
    "path",
    ["loss", "name", "model", "dataset", "optimizer.lr", "stop.max_rounds", "payment.budget"],
)
def test_missing_required_key_is_named(path: str) -> None:
    error = refused(edited(path, delete=True))
    assert error.field == path
    assert "required" in error.reason


def test_momentum_only_for_sgd_and_betas_only_for_adam() -> None:
    error = refused(edited("optimizer.momentum", 0.9))
    assert "sgd only" in error.reason
    sgd = edited("optimizer", {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    assert JobSpec.from_dict(sgd).optimizer.momentum == 0.9
    sgd["optimizer"]["momentum"] = 1.0
    assert refused(sgd).field == "optimizer.momentum"
    sgd["optimizer"]["momentum"] = 0.5
    sgd["optimizer"]["betas"] = [0.9, 0.99]
    assert refused(sgd).field == "optimizer.betas"


def test_digits_format_needs_digits_source() -> None:
    data = edited("dataset.source", "data/x.csv")
    data["dataset"]["format"] = "digits"
    assert refused(data).field == "dataset.format"
    data["dataset"]["format"] = "csv"
    assert JobSpec.from_dict(data).dataset.format == "csv"


def test_unknown_top_level_key_suggests_the_right_one() -> None:
    data = copy.deepcopy(BASE)
    data["redundnacy"] = 3
    error = refused(data)
    assert error.field == "redundnacy"
    assert "unknown key 'redundnacy'" in error.reason
    assert "'redundancy'" in error.reason


@pytest.mark.parametrize("table", ["dataset", "optimizer", "stop", "payment"])
def test_unknown_nested_key_is_refused(table: str) -> None:
    data = copy.deepcopy(BASE)
    data[table]["colour"] = "blue"
    error = refused(data)
    assert error.field == f"{table}.colour"
    assert "unknown key 'colour'" in error.reason


def test_unknown_layer_type_lists_the_allowed_ones() -> None:
    error = refused(edited("model.layers[1]", {"type": "Conv3d", "out_channels": 4}))
    assert error.field == "model.layers[1].type"
    assert "'Conv3d'" in error.reason
    for allowed in ALLOWED_LAYERS:
        assert allowed in error.reason


def test_unknown_layer_parameter_is_refused() -> None:
    error = refused(edited("model.layers[2]", {"type": "ReLU", "inplace": True}))
    assert error.field == "model.layers[2].inplace"
    assert "ReLU" in error.reason
    error = refused(edited("model.layers[1]", {"type": "Linear", "out_feature": 5}))
    assert error.field == "model.layers[1].out_feature"
    assert "'out_features'" in error.reason


def test_non_table_and_non_string_keys_are_refused() -> None:
    assert refused([1, 2]).field == "job spec"
    assert refused("name = 'x'").field == "job spec"
    data: dict[Any, Any] = copy.deepcopy(BASE)
    data[1] = "x"
    assert "keys must be strings" in refused(data).reason
    assert refused(edited("stop", 5)).field == "stop"


def test_malformed_toml_is_refused() -> None:
    with pytest.raises(JobSpecError) as caught:
        parse_job_spec('name = "x"\n[dataset\nsource = 1', source="job.toml")
    assert caught.value.field == "toml"
    assert "job.toml" in caught.value.reason


# ------------------------------------------------------------------- budget


def test_max_cost_is_worst_case_plus_ten_percent() -> None:
    spec = JobSpec.from_dict(BASE)
    worst = (
        Fraction(spec.stop.max_rounds * spec.calculations_per_round * spec.redundancy)
        * spec.price_per_calculation
    )
    assert spec.max_cost() == int(worst * Fraction(110, 100))


def test_over_budget_job_is_refused() -> None:
    error = refused(edited("payment.budget", "1.5"))
    assert error.field == "payment.budget"
    assert error.reason == (
        "1.5 RAVEN does not cover the worst case of 1.98 RAVEN (300 rounds x 2 calculations "
        "x 3 workers x 0.001 RAVEN + 10% margin)"
    )


def test_budget_exactly_at_max_cost_is_accepted() -> None:
    cost = JobSpec.from_dict(BASE).max_cost()
    assert JobSpec.from_dict(edited("payment.budget", format_amount(cost))).budget == cost
    assert refused(edited("payment.budget", format_amount(cost - 1))).field == "payment.budget"


# ------------------------------------------------------------------ amounts


@pytest.mark.parametrize(
    ("value", "units"),
    [
        ("0.001", RAVEN // 1000),
        (0.001, RAVEN // 1000),
        (1, RAVEN),
        ("2", 2 * RAVEN),
        (1.5, 3 * RAVEN // 2),
        ("1.000000000000000001", RAVEN + 1),
        ("0.100000000000000000000", RAVEN // 10),
        ("0", 0),
        (1e-18, 1),
    ],
)
def test_parse_amount(value: object, units: int) -> None:
    assert parse_amount("x", value) == units


@pytest.mark.parametrize(
    "value",
    [
        "-1",
        -1,
        -0.5,
        "0.0000000000000000001",
        1e-19,
        "abc",
        "1e3",
        "",
        True,
        None,
        [1],
        float("nan"),
        float("inf"),
        MAX_AMOUNT_RAVEN + 1,
        str(10**40),
    ],
)
def test_parse_amount_refuses(value: object) -> None:
    with pytest.raises(JobSpecError) as caught:
        parse_amount("payment.budget", value)
    assert caught.value.field == "payment.budget"


@given(st.integers(min_value=0, max_value=MAX_AMOUNT_RAVEN * RAVEN))
def test_format_amount_round_trips(units: int) -> None:
    assert parse_amount("x", format_amount(units)) == units


# ---------------------------------------------------------------- round trip


def _rule_values(rule: ParamRule) -> st.SearchStrategy[Any]:
    if rule.kind == "bool":
        return st.booleans()
    if rule.kind == "int":
        return st.integers(min_value=int(rule.low or 0), max_value=int(rule.high or 0))
    return st.floats(
        min_value=rule.low,
        max_value=rule.high,
        exclude_min=rule.low_open,
        exclude_max=rule.high_open,
        allow_nan=False,
    )


@st.composite
def layers(draw: st.DrawFn) -> LayerSpec:
    layer_type = draw(st.sampled_from(sorted(ALLOWED_LAYERS)))
    params: dict[str, Any] = {}
    for name, rule in ALLOWED_LAYERS[layer_type].items():
        if rule.required or draw(st.booleans()):
            params[name] = draw(_rule_values(rule))
    return LayerSpec.of(layer_type, **params)


@st.composite
def models(draw: st.DrawFn) -> ModelSpec:
    choice = draw(st.sampled_from(["auto", "explicit", "chosen"]))
    if choice == "auto":
        return ModelSpec(layers=(), auto=True)
    drawn = tuple(draw(st.lists(layers(), min_size=1, max_size=6)))
    if choice == "chosen":
        return ModelSpec(layers=drawn, auto=True, chosen=draw(st.sampled_from(ZOO_MODELS)))
    return ModelSpec(layers=drawn)


def _unit(low: float, high: float, **kwargs: bool) -> st.SearchStrategy[float]:
    return st.floats(min_value=low, max_value=high, allow_nan=False, **kwargs)


@st.composite
def job_specs(draw: st.DrawFn) -> JobSpec:
    optimizer_name = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    sgd = optimizer_name == "sgd"
    optimizer = OptimizerSpec(
        name=optimizer_name,
        lr=draw(_unit(0, 10, exclude_min=True)),
        weight_decay=draw(_unit(0, 1, exclude_max=True)),
        momentum=draw(_unit(0, 1, exclude_max=True)) if sgd else 0.0,
        betas=(0.9, 0.999)
        if sgd
        else (
            draw(_unit(0, 1, exclude_max=True)),
            draw(_unit(0, 1, exclude_max=True)),
        ),
    )
    source = draw(st.sampled_from(["digits", "data/mnist", "/srv/x.csv", "naïve dir/t.txt.gz"]))
    formats = ["auto", "digits"] if source == "digits" else ["auto", "mnist", "npz", "csv", "text"]
    dataset = DatasetSpec(
        source=source,
        format=draw(st.sampled_from(formats)),
        label_column=draw(st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s)),
        holdout=draw(_unit(0, 0.9, exclude_min=True, exclude_max=True)),
        seq_len=draw(st.integers(2, 1024)),
        max_samples=draw(st.none() | st.integers(1, 10**9)),
    )
    stop = StopSpec(
        max_rounds=draw(st.integers(1, 1_000_000)),
        target_accuracy=draw(st.none() | _unit(0, 1, exclude_min=True)),
        target_loss=draw(st.none() | _unit(0, 1e6, exclude_min=True)),
        evaluate_every=draw(st.integers(1, 1_000_000)),
    )
    spec = JobSpec(
        name=draw(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)),
        model=draw(models()),
        dataset=dataset,
        loss=draw(st.sampled_from(["cross_entropy", "mse"])),
        optimizer=optimizer,
        samples_per_calculation=draw(st.integers(1, 65536)),
        calculations_per_round=draw(st.integers(1, 256)),
        price_per_calculation=draw(st.integers(1, 10**16)),
        budget=0,
        stop=stop,
        redundancy=draw(st.integers(1, 9)),
        seed=draw(st.integers(0, 2**63 - 1)),
    )
    budget = spec.max_cost() + draw(st.integers(0, 10**18))
    return replace(spec, budget=budget)


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    return isinstance(value, str | int | float | bool)


@settings(max_examples=150, deadline=None)
@given(job_specs())
def test_to_dict_from_dict_round_trips_through_msgpack(spec: JobSpec) -> None:
    data = spec.to_dict()
    assert _plain(data)
    packed = msgpack.packb(data)
    assert msgpack.packb(spec.to_dict()) == packed
    assert JobSpec.from_dict(msgpack.unpackb(packed)) == spec


def test_with_model_validates() -> None:
    spec = JobSpec.from_dict(BASE)
    smaller = ModelSpec(layers=(LayerSpec.of("Flatten"), LayerSpec.of("Linear", out_features=10)))
    assert spec.with_model(smaller).model == smaller
    with pytest.raises(JobSpecError) as caught:
        spec.with_model(ModelSpec(layers=(LayerSpec.of("Linear", out_features=0),)))
    assert caught.value.field == "model.layers[0].out_features"


# ------------------------------------------------------------------ loading


def test_load_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError) as caught:
        load_job_spec(tmp_path / "nope.toml")
    assert caught.value.field == "path"
    with pytest.raises(JobSpecError) as caught:
        load_job_spec(tmp_path)
    assert caught.value.field == "path"


def test_load_resolves_relative_dataset_paths(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    spec_file = folder / "job.toml"
    spec_file.write_text(BASE_TOML.replace('source = "digits"', 'source = "../data/train.csv"'))
    assert load_job_spec(spec_file).dataset.source == str(
        (tmp_path / "data" / "train.csv").resolve()
    )
    absolute = tmp_path / "elsewhere.npz"
    spec_file.write_text(BASE_TOML.replace('source = "digits"', f'source = "{absolute}"'))
    assert load_job_spec(str(spec_file)).dataset.source == str(absolute)
    spec_file.write_text(BASE_TOML)
    assert load_job_spec(spec_file).dataset.source == "digits"


def test_load_refuses_bad_toml_and_non_utf8(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.toml"
    spec_file.write_bytes(b"name = \xff\xfe")
    with pytest.raises(JobSpecError) as caught:
        load_job_spec(spec_file)
    assert caught.value.field == "toml"
    spec_file.write_text("name = = 1")
    with pytest.raises(JobSpecError) as caught:
        load_job_spec(spec_file)
    assert caught.value.field == "toml"
