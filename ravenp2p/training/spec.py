"""Job specs: what a requester asks the network to train, and for how much.

A job spec is written as TOML, loaded into frozen dataclasses, validated with
errors that name the offending field (``optimizer.lr: must be > 0 and <= 10,
got -1``), and shipped to other peers as a plain dict (`JobSpec.to_dict`), which
`JobSpec.from_dict` checks exactly as strictly as the TOML loader does. Nothing
in a spec is ever pickled, imported or evaluated: the model is a list of layers
taken from an allow-list (`ALLOWED_LAYERS`) and built by
`ravenp2p.training.models.build_model`.

Layout::

    name = "digits-mlp"                # 1..64 characters of A-Z a-z 0-9 . _ -
    model = "auto"                     # or a [model] table, see below
    loss = "cross_entropy"             # or "mse"
    samples_per_calculation = 256      # samples (one shard) per calculation, 1..65536
    calculations_per_round = 2         # calculations aggregated per round, 1..256
    calculation = "gradient"           # or "local_steps" (see below)
    batch_size = 64                    # local_steps only: samples per local step
    redundancy = 3                     # workers computing each calculation, 1..9 (default 3)
    seed = 0                           # seeds the initial weights (default 0)

    [dataset]
    source = "digits"                  # scikit-learn's bundled digits, or a path
    format = "auto"                    # auto | digits | mnist | npz | csv | text
    label_column = "label"             # csv only
    holdout = 0.1                      # share kept for evaluation, 0 < h < 0.9
    seq_len = 64                       # text only: tokens per sample, 2..1024
    # max_samples = 10000              # optional cap on the samples used

    [optimizer]
    name = "adam"                      # sgd | adam | adamw
    lr = 0.001                         # 0 < lr <= 10
    weight_decay = 0.0                 # 0 <= wd < 1
    # momentum = 0.9                   # sgd only, 0 <= m < 1
    # betas = [0.9, 0.999]             # adam and adamw only, each 0 <= b < 1

    [stop]
    max_rounds = 300                   # 1..1000000
    target_accuracy = 0.95             # optional, 0 < a <= 1
    # target_loss = 0.1                # optional, > 0
    evaluate_every = 5                 # rounds between evaluations, >= 1

    [payment]
    currency = "RAVEN"                 # or "USD" (default RAVEN)
    price_per_calculation = "0.001"    # per accepted calculation per worker, in `currency`
    budget = "2"                       # in `currency`; must cover max_cost()

An explicit model replaces ``model = "auto"`` with a table whose layers give only
output sizes; input sizes are inferred from the data::

    [model]
    layers = [
        { type = "Flatten" },
        { type = "Linear", out_features = 128 },
        { type = "ReLU" },
        { type = "Linear", out_features = 10 },
    ]

A dataset path that is relative resolves against the folder of the spec file.
The name ``digits`` is reserved for the bundled set: write ``./digits`` for a
file of that name. Amounts are RAVEN, written as a decimal string (exact) or a
number, with at most 18 decimals; internally they are integer base units
(``RAVEN`` base units per token). In `JobSpec.to_dict` amounts are exact decimal
strings of RAVEN, so the dict is also a valid TOML document of the same job.

With ``currency = "USD"`` the amounts are USD, written the same way (at most
18 decimals, kept exactly as integer units of 10**-18 USD). Such a spec holds
no RAVEN amounts until a requester on a chain converts them at its price feed's
rate (`JobSpec.in_raven`, `ravenp2p.chain.pricing`): jobs are paid, and
manifests priced, in RAVEN only.

The worst-case cost of a job is every round running every calculation on
``redundancy`` workers, plus the 10% margin (master 5%, partner 3%, protocol
2%); a budget below it is refused.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from consensus.settlement import MARGIN_PERCENT

RAVEN = 10**18
DECIMALS = 18
MAX_AMOUNT_RAVEN = 10**12
MAX_SPEC_BYTES = 1024 * 1024
MAX_LAYERS = 64
MAX_PATH_CHARS = 4096
MAX_SEED = 2**63 - 1

DIGITS_SOURCE = "digits"
DATASET_FORMATS = ("auto", "digits", "mnist", "npz", "csv", "text")
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "adam", "adamw")
ZOO_MODELS = ("mlp", "cnn", "char-transformer")

CURRENCIES = ("RAVEN", "USD")

_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_AMOUNT_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)?")

ParamValue = int | float | bool


class JobSpecError(ValueError):
    """A job spec is invalid; `field` is the dotted path of the culprit, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class ParamRule:
    """The type, range and default of one scalar setting (a spec field or a layer parameter).

    ``low_open``/``high_open`` make a bound exclusive. ``default`` is None when
    the value is required, or when it is derived from another one (see `note`).
    """

    kind: Literal["int", "float", "bool"]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    required: bool = False
    default: ParamValue | None = None
    note: str = ""

    def describe(self) -> str:
        """The allowed values in words, e.g. ``an integer between 1 and 9``."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "int":
            return f"an integer between {_num(self.low)} and {_num(self.high)}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        return " and ".join(parts)

    def check(self, name: str, value: object) -> ParamValue:
        """`value` converted to this rule's type (ints widen to floats), or `JobSpecError`."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise JobSpecError(name, f"must be true or false, got {value!r}")
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not self._in_range(value):
                raise JobSpecError(name, f"must be {self.describe()}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JobSpecError(name, f"must be a number {self.describe()}, got {value!r}")
        number = float(value)
        if not self._in_range(number):
            raise JobSpecError(name, f"must be {self.describe()}, got {value!r}")
        return number

    def _in_range(self, value: float) -> bool:
        # Written so that NaN fails every comparison and is refused.
        if self.low is not None:
            above = value > self.low if self.low_open else value >= self.low
            if not above:
                return False
        if self.high is not None:
            below = value < self.high if self.high_open else value <= self.high
            if not below:
                return False
        return value == value


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:g}"


def _int(
    low: int, high: int, *, default: int | None = None, optional: bool = False, note: str = ""
) -> ParamRule:
    required = default is None and not optional
    return ParamRule("int", low, high, required=required, default=default, note=note)


def _float(
    low: float | None,
    high: float | None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    default: float | None = None,
    required: bool = False,
) -> ParamRule:
    return ParamRule("float", low, high, low_open, high_open, required, default)


# Allowed layer types and their parameters. Input sizes (in_features,
# in_channels, normalized size, vocabulary) are inferred, never written.
ALLOWED_LAYERS: dict[str, dict[str, ParamRule]] = {
    "Linear": {"out_features": _int(1, 65536), "bias": ParamRule("bool", default=True)},
    "Conv2d": {
        "out_channels": _int(1, 4096),
        "kernel_size": _int(1, 64),
        "stride": _int(1, 64, default=1),
        "padding": _int(0, 64, default=0),
    },
    "MaxPool2d": {
        "kernel_size": _int(1, 64),
        "stride": _int(1, 64, optional=True, note="defaults to kernel_size"),
    },
    "Flatten": {},
    "ReLU": {},
    "GELU": {},
    "Tanh": {},
    "Dropout": {"p": _float(0, 1, high_open=True, default=0.5)},
    "LayerNorm": {},
    "Embedding": {"embedding_dim": _int(1, 65536)},
    "PositionalEmbedding": {"max_len": _int(1, 4096)},
    "CausalSelfAttention": {
        "heads": _int(1, 64),
        "mlp_ratio": _int(1, 16, default=4),
        "dropout": _float(0, 1, high_open=True, default=0.0),
    },
}


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a declarative model: an allowed type and its given parameters.

    Parameters are kept sorted by name, so equal layers compare and serialise
    equally however they were written; absent ones take the rule's default.
    """

    type: str
    params: tuple[tuple[str, ParamValue], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(sorted(self.params, key=lambda item: item[0])))

    @classmethod
    def of(cls, layer_type: str, **params: ParamValue) -> LayerSpec:
        """A layer from keyword parameters, e.g. ``LayerSpec.of("Linear", out_features=10)``."""
        return cls(layer_type, tuple(params.items()))

    def get(self, name: str, default: ParamValue | None = None) -> ParamValue | None:
        """The value of parameter `name`, or `default` when it was not given."""
        for key, value in self.params:
            if key == name:
                return value
        return default


@dataclass(frozen=True)
class ModelSpec:
    """A model: its layers, and whether the selector chose them (``auto``) and which one."""

    layers: tuple[LayerSpec, ...]
    auto: bool = False
    chosen: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Where the training data comes from and how it is split."""

    source: str
    format: str = "auto"
    label_column: str = "label"
    holdout: float = 0.1
    seq_len: int = 64
    max_samples: int | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer the job's master steps with after each round."""

    name: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class StopSpec:
    """When the job ends: a round limit, optionally an evaluation target reached earlier."""

    max_rounds: int
    target_accuracy: float | None = None
    target_loss: float | None = None
    evaluate_every: int = 1


@dataclass(frozen=True)
class JobSpec:
    """A complete, validated training job. Amounts are integer base units."""

    name: str
    model: ModelSpec
    dataset: DatasetSpec
    loss: str
    optimizer: OptimizerSpec
    samples_per_calculation: int
    calculations_per_round: int
    price_per_calculation: int
    budget: int
    stop: StopSpec
    redundancy: int = 3
    seed: int = 0
    calculation: str = "gradient"
    """`gradient`: a worker returns the mean-loss gradient over its shard and the master
    steps the optimizer. `local_steps`: a worker runs the optimizer (fresh state) over its
    shard in batches of `batch_size` and returns the change of the weights; the master
    adds the average change. Fewer, larger rounds: far less traffic per sample."""
    batch_size: int = 64
    currency: str = "RAVEN"
    """What the [payment] amounts were written in. For "USD", `price_per_calculation`
    and `budget` are 0 (not priced in RAVEN yet) and the USD amounts below hold the job's
    price; `in_raven` gives the RAVEN-priced spec a paid job runs with."""
    price_per_calculation_usd: int = 0
    """USD per accepted calculation per worker in units of 10**-18 USD (currency "USD")."""
    budget_usd: int = 0
    """The budget in units of 10**-18 USD (currency "USD")."""

    def to_dict(self) -> dict[str, Any]:
        """Plain, deterministic data (str/int/float/bool/list/dict) that `from_dict` reads back.

        The layout is the TOML layout; amounts are exact decimal strings of
        RAVEN, so no integer exceeds what msgpack carries.
        """
        data: dict[str, Any] = {
            "name": self.name,
            "model": _model_to_dict(self.model),
            "loss": self.loss,
            "samples_per_calculation": self.samples_per_calculation,
            "calculations_per_round": self.calculations_per_round,
            "redundancy": self.redundancy,
            "seed": self.seed,
            "calculation": self.calculation,
            "batch_size": self.batch_size,
            "dataset": _dataset_to_dict(self.dataset),
            "optimizer": _optimizer_to_dict(self.optimizer),
            "stop": _stop_to_dict(self.stop),
            "payment": _payment_to_dict(self),
        }
        return data

    @classmethod
    def from_dict(cls, data: object) -> JobSpec:
        """A validated spec from plain data (a parsed TOML document or a received dict).

        Raises `JobSpecError` naming the first invalid field; unknown keys are errors.
        """
        return _parse_job(data)

    def max_cost(self, price: int | None = None) -> int:
        """Worst-case payment in base units: every calculation on every worker, plus margin.

        At `price` per calculation when given (in the same units the result is in),
        else at the spec's RAVEN price.
        """
        if price is None:
            price = self.price_per_calculation
        operational = (
            self.stop.max_rounds * self.calculations_per_round * self.redundancy * price
        )
        return operational * (100 + MARGIN_PERCENT) // 100

    def in_raven(self, price_per_calculation: int, budget: int) -> JobSpec:
        """This USD-priced spec with its payment converted to RAVEN base units, validated.

        The result is an ordinary RAVEN spec (what a paid job's manifest carries);
        `JobSpecError` when the budget does not cover `max_cost` at the new price.
        """
        if self.currency != "USD":
            raise ValueError(f"the spec is priced in {self.currency}, not USD: nothing to convert")
        priced = replace(
            self, currency="RAVEN", price_per_calculation=price_per_calculation, budget=budget,
            price_per_calculation_usd=0, budget_usd=0,
        )
        return JobSpec.from_dict(priced.to_dict())

    def with_model(self, model: ModelSpec) -> JobSpec:
        """This spec with another model, validated like any other spec."""
        return JobSpec.from_dict(replace(self, model=model).to_dict())


def parse_amount(field: str, value: object, unit: str = "RAVEN") -> int:
    """RAVEN written as ``"0.001"``, ``0.001`` or ``1``, as integer base units.

    Floats go through their shortest decimal form (``str``), so ``0.001`` means
    exactly 0.001. Negative values, more than 18 decimals, non-numbers and more
    than `MAX_AMOUNT_RAVEN` are refused with `JobSpecError(field, ...)`. USD
    amounts (``unit="USD"``) follow the same rules, in units of 10**-18 USD.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise JobSpecError(
            field, f"must be an amount of {unit} (a decimal string or a number), got {value!r}"
        )
    if isinstance(value, int):
        if value < 0:
            raise JobSpecError(field, f"must not be negative, got {value!r}")
        if value > MAX_AMOUNT_RAVEN:
            raise JobSpecError(field, f"must be at most {MAX_AMOUNT_RAVEN} {unit}, got {value!r}")
        return value * RAVEN
    text = value.strip() if isinstance(value, str) else str(value)
    if isinstance(value, str):
        if text.startswith("-") and _AMOUNT_PATTERN.fullmatch(text[1:]):
            raise JobSpecError(field, f"must not be negative, got {value!r}")
        if not _AMOUNT_PATTERN.fullmatch(text):
            raise JobSpecError(
                field, f'must be a decimal number of {unit} such as "0.001", got {value!r}'
            )
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise JobSpecError(field, f"is not a number: {value!r}") from None
    if not number.is_finite():
        raise JobSpecError(field, f"must be a finite number, got {value!r}")
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite numbers have an integer exponent
    if not any(digits):
        return 0
    if sign:
        raise JobSpecError(field, f"must not be negative, got {value!r}")
    digit_list = list(digits)
    while exponent < 0 and len(digit_list) > 1 and digit_list[-1] == 0:
        digit_list.pop()
        exponent += 1
    if exponent < -DECIMALS:
        raise JobSpecError(field, f"has more than {DECIMALS} decimals: {value!r}")
    if len(digit_list) + exponent > len(str(MAX_AMOUNT_RAVEN)):
        raise JobSpecError(field, f"must be at most {MAX_AMOUNT_RAVEN} {unit}, got {value!r}")
    units: int = int("".join(map(str, digit_list))) * 10 ** (DECIMALS + exponent)
    if units > MAX_AMOUNT_RAVEN * RAVEN:
        raise JobSpecError(field, f"must be at most {MAX_AMOUNT_RAVEN} {unit}, got {value!r}")
    return units


def format_amount(units: int) -> str:
    """Base units as an exact decimal string of RAVEN without trailing zeros (``"0.001"``)."""
    if units < 0:
        return "-" + format_amount(-units)
    whole, fraction = divmod(units, RAVEN)
    if not fraction:
        return str(whole)
    return f"{whole}.{fraction:0{DECIMALS}d}".rstrip("0")


def parse_job_spec(text: str, *, source: str = "<string>") -> JobSpec:
    """A validated spec from TOML text; syntax errors are `JobSpecError("toml", ...)`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError("toml", f"{source} is not valid TOML: {exc}") from None
    return JobSpec.from_dict(data)


def load_job_spec(path: str | Path) -> JobSpec:
    """A validated spec from a TOML file; a relative dataset path resolves against its folder."""
    spec_path = Path(path)
    try:
        raw = spec_path.read_bytes()
    except FileNotFoundError:
        raise JobSpecError("path", f"{spec_path}: no such file") from None
    except IsADirectoryError:
        raise JobSpecError("path", f"{spec_path}: is a folder, not a spec file") from None
    except OSError as exc:
        raise JobSpecError("path", f"{spec_path}: cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise JobSpecError(
            "path", f"{spec_path}: {len(raw)} bytes, more than the limit of {MAX_SPEC_BYTES}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobSpecError("toml", f"{spec_path} is not UTF-8: {exc}") from None
    spec = parse_job_spec(text, source=str(spec_path))
    source = spec.dataset.source
    if source != DIGITS_SOURCE and not Path(source).is_absolute():
        resolved = str((spec_path.parent / source).resolve())
        spec = replace(spec, dataset=replace(spec.dataset, source=resolved))
    return spec


def validate_model(model: ModelSpec) -> ModelSpec:
    """`model` checked against the layer allow-list (types, parameters, ranges), normalised.

    Shapes are not checked here; `ravenp2p.training.models.build_model` does that.
    """
    return _parse_model(_model_to_dict(model))


# ---------------------------------------------------------------- serialising


def _model_to_dict(model: ModelSpec) -> str | dict[str, Any]:
    if model.auto and not model.layers:
        return "auto"
    data: dict[str, Any] = {
        "layers": [{"type": layer.type, **dict(layer.params)} for layer in model.layers]
    }
    if model.auto:
        data["auto"] = True
    if model.chosen is not None:
        data["chosen"] = model.chosen
    return data


def _payment_to_dict(spec: JobSpec) -> dict[str, str]:
    if spec.currency == "USD":
        return {
            "currency": "USD",
            "price_per_calculation": format_amount(spec.price_per_calculation_usd),
            "budget": format_amount(spec.budget_usd),
        }
    return {  # RAVEN, the default: no currency key, so RAVEN specs read as before
        "price_per_calculation": format_amount(spec.price_per_calculation),
        "budget": format_amount(spec.budget),
    }


def _dataset_to_dict(dataset: DatasetSpec) -> dict[str, Any]:
    data: dict[str, Any] = {
        "source": dataset.source,
        "format": dataset.format,
        "label_column": dataset.label_column,
        "holdout": dataset.holdout,
        "seq_len": dataset.seq_len,
    }
    if dataset.max_samples is not None:
        data["max_samples"] = dataset.max_samples
    return data


def _optimizer_to_dict(optimizer: OptimizerSpec) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": optimizer.name,
        "lr": optimizer.lr,
        "weight_decay": optimizer.weight_decay,
    }
    if optimizer.name == "sgd":
        data["momentum"] = optimizer.momentum
    else:
        data["betas"] = list(optimizer.betas)
    return data


def _stop_to_dict(stop: StopSpec) -> dict[str, Any]:
    data: dict[str, Any] = {"max_rounds": stop.max_rounds}
    if stop.target_accuracy is not None:
        data["target_accuracy"] = stop.target_accuracy
    if stop.target_loss is not None:
        data["target_loss"] = stop.target_loss
    data["evaluate_every"] = stop.evaluate_every
    return data


# ------------------------------------------------------------------- parsing

_TOP_KEYS = (
    "name",
    "model",
    "loss",
    "samples_per_calculation",
    "calculations_per_round",
    "redundancy",
    "seed",
    "calculation",
    "batch_size",
    "dataset",
    "optimizer",
    "stop",
    "payment",
)
_JOB_RULES = {
    "samples_per_calculation": _int(1, 65536),
    "calculations_per_round": _int(1, 256),
    "redundancy": _int(1, 9, default=3),
    "seed": _int(0, MAX_SEED, default=0),
    "batch_size": _int(1, 65536, default=64),
}
CALCULATION_KINDS = ("gradient", "local_steps")
_DATASET_RULES = {
    "holdout": _float(0, 0.9, low_open=True, high_open=True, default=0.1),
    "seq_len": _int(2, 1024, default=64),
    "max_samples": _int(1, 1_000_000_000, optional=True),
}
_OPTIMIZER_RULES = {
    "lr": _float(0, 10, low_open=True, required=True),
    "weight_decay": _float(0, 1, high_open=True, default=0.0),
    "momentum": _float(0, 1, high_open=True, default=0.0),
}
_BETA_RULE = _float(0, 1, high_open=True)
_STOP_RULES = {
    "max_rounds": _int(1, 1_000_000),
    "target_accuracy": _float(0, 1, low_open=True),
    "target_loss": _float(0, None, low_open=True),
    "evaluate_every": _int(1, 1_000_000, default=1),
}


def _table(name: str, value: object, allowed: Sequence[str]) -> Mapping[str, object]:
    """`value` as a mapping whose keys are all in `allowed`; `name` prefixes field names."""
    where = name or "job spec"
    if not isinstance(value, Mapping):
        raise JobSpecError(where, f"must be a table, got {_kind(value)}")
    prefix = f"{name}." if name else ""
    for key in value:
        if not isinstance(key, str):
            raise JobSpecError(where, f"keys must be strings, got {key!r}")
        if key not in allowed:
            raise JobSpecError(prefix + key, _unknown("key", key, allowed))
    return value


def _unknown(what: str, key: str, allowed: Sequence[str]) -> str:
    reason = f"unknown {what} {key!r}"
    by_lower = {name.lower(): name for name in allowed}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1)
    if close:
        reason += f" (did you mean {by_lower[close[0]]!r}?)"
    if allowed:
        reason += "; allowed: " + ", ".join(sorted(allowed))
    return reason


def _kind(value: object) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    for kind, text in names.items():
        if type(value) is kind:
            return f"{text} ({value!r})"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _required(table: Mapping[str, object], prefix: str, key: str) -> object:
    if key not in table:
        raise JobSpecError(prefix + key, "is required")
    return table[key]


def _rule_value(table: Mapping[str, object], prefix: str, key: str, rule: ParamRule) -> Any:
    if key not in table:
        if rule.required:
            raise JobSpecError(prefix + key, f"is required ({rule.describe()})")
        return rule.default
    return rule.check(prefix + key, table[key])


def _choice(
    table: Mapping[str, object],
    prefix: str,
    key: str,
    choices: Sequence[str],
    default: str | None = None,
) -> str:
    if key not in table and default is not None:
        return default
    allowed = ", ".join(repr(choice) for choice in choices)
    if key not in table:
        raise JobSpecError(prefix + key, f"is required: one of {allowed}")
    value = table[key]
    if not isinstance(value, str) or value not in choices:
        raise JobSpecError(prefix + key, f"must be one of {allowed}, got {value!r}")
    return value


def _text(
    table: Mapping[str, object], prefix: str, key: str, max_chars: int, default: str | None = None
) -> str:
    if key not in table and default is not None:
        return default
    value = _required(table, prefix, key)
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        got = f"{len(value)} characters" if isinstance(value, str) else _kind(value)
        raise JobSpecError(
            prefix + key, f"must be a string of 1 to {max_chars} characters, got {got}"
        )
    if "\x00" in value:
        raise JobSpecError(prefix + key, "must not contain NUL characters")
    return value


def _parse_job(data: object) -> JobSpec:
    top = _table("", data, _TOP_KEYS)
    name = _required(top, "", "name")
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise JobSpecError(
            "name", f"must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-', got {name!r}"
        )
    model = _parse_model(_required(top, "", "model"))
    loss = _choice(top, "", "loss", LOSSES)
    calculation = _choice(top, "", "calculation", CALCULATION_KINDS, default="gradient")
    numbers = {key: _rule_value(top, "", key, rule) for key, rule in _JOB_RULES.items()}
    dataset = _parse_dataset(_required(top, "", "dataset"))
    optimizer = _parse_optimizer(_required(top, "", "optimizer"))
    stop = _parse_stop(_required(top, "", "stop"))
    payment = _table(
        "payment", _required(top, "", "payment"), ("currency", "price_per_calculation", "budget")
    )
    currency = _choice(payment, "payment.", "currency", CURRENCIES, default="RAVEN")
    price = parse_amount(
        "payment.price_per_calculation",
        _required(payment, "payment.", "price_per_calculation"),
        currency,
    )
    if price <= 0:
        raise JobSpecError(
            "payment.price_per_calculation", f"must be more than 0 {currency}, got 0"
        )
    budget = parse_amount("payment.budget", _required(payment, "payment.", "budget"), currency)
    amounts = (
        {"price_per_calculation": price, "budget": budget}
        if currency == "RAVEN"
        else {"price_per_calculation": 0, "budget": 0, "price_per_calculation_usd": price,
              "budget_usd": budget}
    )
    spec = JobSpec(
        name=name,
        model=model,
        dataset=dataset,
        loss=loss,
        optimizer=optimizer,
        stop=stop,
        calculation=calculation,
        currency=currency,
        **amounts,
        **numbers,
    )
    if calculation == "local_steps" and spec.batch_size > spec.samples_per_calculation:
        raise JobSpecError(
            "batch_size",
            f"{spec.batch_size} is more than samples_per_calculation "
            f"({spec.samples_per_calculation}): a calculation needs at least one local step",
        )
    cost = spec.max_cost(price)
    if budget < cost:
        raise JobSpecError(
            "payment.budget",
            f"{format_amount(budget)} {currency} does not cover the worst case of "
            f"{format_amount(cost)} {currency} ({stop.max_rounds} rounds x "
            f"{spec.calculations_per_round} calculations x {spec.redundancy} workers x "
            f"{format_amount(price)} {currency} + {MARGIN_PERCENT}% margin)",
        )
    return spec


def _parse_model(value: object) -> ModelSpec:
    if value == "auto":
        return ModelSpec(layers=(), auto=True)
    if isinstance(value, str):
        raise JobSpecError("model", f'must be "auto" or a table with layers, got {value!r}')
    table = _table("model", value, ("layers", "auto", "chosen"))
    auto = table.get("auto", False)
    if not isinstance(auto, bool):
        raise JobSpecError("model.auto", f"must be true or false, got {auto!r}")
    chosen: str | None = None
    if "chosen" in table:
        chosen = _choice(table, "model.", "chosen", ZOO_MODELS)
        if not auto:
            raise JobSpecError("model.chosen", "is only allowed with auto = true")
    elif auto:
        raise JobSpecError(
            "model.chosen",
            "is required when auto = true with explicit layers "
            '(write model = "auto" to let the selector choose)',
        )
    raw_layers = _required(table, "model.", "layers")
    if not isinstance(raw_layers, list | tuple):
        raise JobSpecError(
            "model.layers", f"must be a list of layer tables, got {_kind(raw_layers)}"
        )
    if not 1 <= len(raw_layers) <= MAX_LAYERS:
        raise JobSpecError(
            "model.layers", f"must hold 1 to {MAX_LAYERS} layers, got {len(raw_layers)}"
        )
    layers = tuple(_parse_layer(index, raw) for index, raw in enumerate(raw_layers))
    return ModelSpec(layers=layers, auto=auto, chosen=chosen)


def _parse_layer(index: int, value: object) -> LayerSpec:
    where = f"model.layers[{index}]"
    if not isinstance(value, Mapping):
        raise JobSpecError(
            where, f'must be a table such as {{ type = "ReLU" }}, got {_kind(value)}'
        )
    layer_type = value.get("type")
    if not isinstance(layer_type, str):
        raise JobSpecError(f"{where}.type", f"is required: one of {', '.join(ALLOWED_LAYERS)}")
    rules = ALLOWED_LAYERS.get(layer_type)
    if rules is None:
        raise JobSpecError(
            f"{where}.type", _unknown("layer type", layer_type, list(ALLOWED_LAYERS))
        )
    params: list[tuple[str, ParamValue]] = []
    for key, raw in value.items():
        if key == "type":
            continue
        if not isinstance(key, str):
            raise JobSpecError(where, f"parameter names must be strings, got {key!r}")
        rule = rules.get(key)
        if rule is None:
            reason = _unknown(f"parameter for {layer_type}:", key, list(rules))
            if not rules:
                reason += f"; {layer_type} takes no parameters"
            raise JobSpecError(f"{where}.{key}", reason)
        params.append((key, rule.check(f"{where}.{key}", raw)))
    given = {key for key, _ in params}
    for key, rule in rules.items():
        if rule.required and key not in given:
            raise JobSpecError(
                f"{where}.{key}", f"is required for {layer_type} ({rule.describe()})"
            )
    return LayerSpec(layer_type, tuple(params))


def _parse_dataset(value: object) -> DatasetSpec:
    keys = ("source", "format", "label_column", "holdout", "seq_len", "max_samples")
    table = _table("dataset", value, keys)
    source = _text(table, "dataset.", "source", MAX_PATH_CHARS)
    data_format = _choice(table, "dataset.", "format", DATASET_FORMATS, default="auto")
    if source == DIGITS_SOURCE and data_format not in ("auto", "digits"):
        raise JobSpecError(
            "dataset.format",
            f'source "digits" is the bundled digits set; '
            f'format must be "auto" or "digits", got '
            f"{data_format!r}",
        )
    if data_format == "digits" and source != DIGITS_SOURCE:
        raise JobSpecError(
            "dataset.format", f'"digits" needs source = "digits", got source {source!r}'
        )
    return DatasetSpec(
        source=source,
        format=data_format,
        label_column=_text(table, "dataset.", "label_column", 256, default="label"),
        holdout=_rule_value(table, "dataset.", "holdout", _DATASET_RULES["holdout"]),
        seq_len=_rule_value(table, "dataset.", "seq_len", _DATASET_RULES["seq_len"]),
        max_samples=_rule_value(table, "dataset.", "max_samples", _DATASET_RULES["max_samples"]),
    )


def _parse_optimizer(value: object) -> OptimizerSpec:
    table = _table("optimizer", value, ("name", "lr", "weight_decay", "momentum", "betas"))
    name = _choice(table, "optimizer.", "name", OPTIMIZERS)
    if name != "sgd" and "momentum" in table:
        raise JobSpecError("optimizer.momentum", f"applies to sgd only, not {name} (use betas)")
    if name == "sgd" and "betas" in table:
        raise JobSpecError(
            "optimizer.betas", "applies to adam and adamw only, not sgd (use momentum)"
        )
    betas: tuple[float, float] = (0.9, 0.999)
    if "betas" in table:
        raw = table["betas"]
        if not isinstance(raw, list | tuple) or len(raw) != 2:
            got = f"{len(raw)} values" if isinstance(raw, list | tuple) else _kind(raw)
            raise JobSpecError("optimizer.betas", f"must be a list of two numbers, got {got}")
        betas = (
            float(_BETA_RULE.check("optimizer.betas[0]", raw[0])),
            float(_BETA_RULE.check("optimizer.betas[1]", raw[1])),
        )
    return OptimizerSpec(
        name=name,
        lr=_rule_value(table, "optimizer.", "lr", _OPTIMIZER_RULES["lr"]),
        weight_decay=_rule_value(
            table, "optimizer.", "weight_decay", _OPTIMIZER_RULES["weight_decay"]
        ),
        momentum=_rule_value(table, "optimizer.", "momentum", _OPTIMIZER_RULES["momentum"]),
        betas=betas,
    )


def _parse_stop(value: object) -> StopSpec:
    table = _table("stop", value, tuple(_STOP_RULES))
    values = {key: _rule_value(table, "stop.", key, rule) for key, rule in _STOP_RULES.items()}
    return StopSpec(**values)


__all__ = [
    "ALLOWED_LAYERS",
    "CURRENCIES",
    "DATASET_FORMATS",
    "LOSSES",
    "OPTIMIZERS",
    "RAVEN",
    "ZOO_MODELS",
    "DatasetSpec",
    "JobSpec",
    "JobSpecError",
    "LayerSpec",
    "ModelSpec",
    "OptimizerSpec",
    "ParamRule",
    "StopSpec",
    "format_amount",
    "load_job_spec",
    "parse_amount",
    "parse_job_spec",
    "validate_model",
]
