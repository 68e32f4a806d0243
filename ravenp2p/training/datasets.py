"""The data repository's input side: load a requester's dataset, cut it into shards, read shards.

A job's dataset is loaded once, on the requester, into two `Split`s (train and
holdout) plus a `DataInfo` that every peer needs to interpret the data. The
training split is cut into equal-size shards of canonical safetensors bytes, so
each shard has one digest that workers can verify. Workers never see the source
files: they receive shard bytes and check them against the `DataInfo` with
`read_shard` before computing.

Supported sources: scikit-learn's bundled digits, an MNIST folder (IDX files,
gzipped or not), `.npz` arrays, `.csv` tables and plain `.txt`/`.txt.gz` text
for character-level language modelling.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ravenp2p.training.tensors import decode_tensors, encode_tensors

if TYPE_CHECKING:
    from ravenp2p.training.spec import DatasetSpec

KINDS = ("tabular", "image", "text")
TASKS = ("classification", "language")
FORMATS = ("auto", "digits", "mnist", "npz", "csv", "text")

MAX_VOCAB = 256
MAX_CLASSES = 100_000
MAX_DIM = 1 << 20
MAX_SAMPLE_VALUES = 1 << 24
MAX_FILE_BYTES = 1 << 31
DEFAULT_SHARD_BYTES = 256 * 2**20

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_CLASSES = 10

# Seed of the one permutation that splits and orders every shuffled dataset.
SPLIT_SEED = 0

_INFO_KEYS = ("kind", "task", "input_shape", "num_classes", "vocab", "scale", "mean", "std")
_REQUIRED_INFO_KEYS = ("kind", "task", "input_shape")
_INT_LABEL = re.compile(r"[+-]?\d+")


class DatasetError(ValueError):
    """A dataset, a shard or a data description was refused; the message names what and why."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataInfo:
    """What every peer must know about a job's data to build the model and read shards.

    `scale`, `mean` and `std` describe the input transform applied at compute
    time to integer-stored images: x = (x * scale - mean) / std. Float data is
    stored already transformed, so its transform is the identity.
    """

    kind: str
    task: str
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    vocab: str | None = None
    scale: float = 1.0
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        def fail(key: str, reason: str) -> DatasetError:
            return DatasetError(f"data info: {key!r} {reason}")

        if self.kind not in KINDS:
            raise fail("kind", f"is {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.task not in TASKS:
            raise fail("task", f"is {self.task!r}; allowed: {', '.join(TASKS)}")
        if (self.kind == "text") != (self.task == "language"):
            raise fail("task", f"{self.task!r} does not go with kind {self.kind!r}")
        if isinstance(self.input_shape, list):
            object.__setattr__(self, "input_shape", tuple(self.input_shape))
        shape = self.input_shape
        if not isinstance(shape, tuple) or not all(_is_int(d) for d in shape):
            raise fail("input_shape", f"must be a sequence of integers, got {shape!r}")
        rank = 3 if self.kind == "image" else 1
        if len(shape) != rank:
            raise fail(
                "input_shape", f"has {len(shape)} dimensions, kind {self.kind!r} needs {rank}"
            )
        if not all(1 <= d <= MAX_DIM for d in shape):
            raise fail("input_shape", f"dimensions must be 1..{MAX_DIM}, got {shape}")
        if math.prod(shape) > MAX_SAMPLE_VALUES:
            raise fail("input_shape", f"{shape} holds more than {MAX_SAMPLE_VALUES} values")
        if self.task == "classification":
            if not _is_int(self.num_classes) or not 2 <= self.num_classes <= MAX_CLASSES:
                raise fail("num_classes", f"must be an integer 2..{MAX_CLASSES} for classification")
            if self.vocab is not None:
                raise fail("vocab", "must be null for classification")
        else:
            if self.num_classes is not None:
                raise fail("num_classes", "must be null for language modelling")
            if not isinstance(self.vocab, str) or not 2 <= len(self.vocab) <= MAX_VOCAB:
                raise fail("vocab", f"must be a string of 2..{MAX_VOCAB} characters")
            if len(set(self.vocab)) != len(self.vocab):
                raise fail("vocab", "has repeated characters")
        for key in ("scale", "mean", "std"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value):
                raise fail(key, f"must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.scale <= 0 or self.std <= 0:
            raise fail("scale" if self.scale <= 0 else "std", "must be positive")
        if self.kind != "image" and not self.identity_transform:
            raise fail("scale", f"kind {self.kind!r} takes the identity transform only")

    @property
    def vocab_size(self) -> int | None:
        """Number of tokens for language data, None otherwise."""
        return None if self.vocab is None else len(self.vocab)

    @property
    def identity_transform(self) -> bool:
        """True when inputs are used as stored (scale 1, mean 0, std 1)."""
        return self.scale == 1.0 and self.mean == 0.0 and self.std == 1.0

    @property
    def input_dtype(self) -> np.dtype[Any]:
        """The dtype shards store inputs in: token ids, raw image bytes, or float32."""
        if self.kind == "text":
            return np.dtype(np.int64)
        if self.kind == "image" and not self.identity_transform:
            return np.dtype(np.uint8)
        return np.dtype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the job manifest (msgpack/JSON friendly)."""
        return {
            "kind": self.kind,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "vocab": self.vocab,
            "scale": self.scale,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, data: object) -> DataInfo:
        """Parse `to_dict` output strictly; `DatasetError` names the offending key."""
        if not isinstance(data, Mapping):
            raise DatasetError(f"data info: must be a mapping, got {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in _INFO_KEYS)
        if unknown:
            raise DatasetError(
                f"data info: unknown keys {', '.join(unknown)} (allowed: {', '.join(_INFO_KEYS)})"
            )
        missing = [key for key in _REQUIRED_INFO_KEYS if key not in data]
        if missing:
            raise DatasetError(f"data info: missing keys {', '.join(missing)}")
        shape = data["input_shape"]
        if not isinstance(shape, list | tuple):
            raise DatasetError(f"data info: 'input_shape' must be a list, got {shape!r}")
        values = {key: data[key] for key in _INFO_KEYS if key in data}
        values["input_shape"] = tuple(shape)
        return cls(**values)


@dataclass(frozen=True, eq=False)
class Split:
    """Samples of one part of a dataset.

    `inputs` has one row per sample; `targets` holds int64 class ids `[N]` or
    next-token ids `[N, T]`.
    """

    inputs: np.ndarray
    targets: np.ndarray

    def __post_init__(self) -> None:
        if self.inputs.ndim < 1 or self.targets.ndim < 1:
            raise DatasetError("split: inputs and targets need a sample axis")
        if len(self.inputs) != len(self.targets):
            raise DatasetError(f"split: {len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.inputs)


# ---------------------------------------------------------------------------
# Loading


def load_dataset(spec: DatasetSpec) -> tuple[DataInfo, Split, Split]:
    """Load the dataset a job spec names; returns (info, train, holdout).

    Splits are deterministic: the same source and spec give the same arrays
    on every machine, so the shards (and their digests) are reproducible.
    """
    _check_spec(spec)
    fmt = _resolve_format(spec.source, spec.format)
    if fmt == "digits":
        return _load_digits(spec)
    if fmt == "mnist":
        return _load_mnist(spec)
    if fmt == "npz":
        return _load_npz(spec)
    if fmt == "csv":
        return _load_csv(spec)
    return _load_text(spec)


def _check_spec(spec: DatasetSpec) -> None:
    holdout = spec.holdout
    if not _is_number(holdout) or not 0.0 <= holdout < 1.0:
        raise DatasetError(f"dataset: holdout must be a fraction in [0, 1), got {holdout!r}")
    if not _is_int(spec.seq_len) or spec.seq_len < 1:
        raise DatasetError(f"dataset: seq_len must be a positive integer, got {spec.seq_len!r}")
    if spec.max_samples is not None and (not _is_int(spec.max_samples) or spec.max_samples < 1):
        raise DatasetError(
            f"dataset: max_samples must be a positive integer or null, got {spec.max_samples!r}"
        )
    if spec.format not in FORMATS:
        raise DatasetError(f"dataset: format {spec.format!r} is not one of {', '.join(FORMATS)}")


def _resolve_format(source: str, fmt: str) -> str:
    if fmt == "digits" or (fmt == "auto" and source == "digits"):
        if source != "digits":
            raise DatasetError(f"dataset: format 'digits' takes source 'digits', got {source!r}")
        return "digits"
    if fmt != "auto":
        return fmt
    name = source.lower()
    if Path(source).is_dir():
        return "mnist"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".txt", ".txt.gz")):
        return "text"
    raise DatasetError(
        f"{source}: cannot tell the format from the name (expected 'digits', a folder of MNIST "
        "files, or a .npz, .csv, .txt or .txt.gz file); set the format explicitly"
    )


def _holdout_count(total: int, fraction: float, source: str) -> int:
    count = 0 if fraction == 0 else max(1, int(total * fraction))
    if total - count < 1:
        raise DatasetError(
            f"{source}: {total} samples leave none for training with holdout {fraction}"
        )
    return count


def _shuffled_split(
    inputs: np.ndarray, targets: np.ndarray, spec: DatasetSpec
) -> tuple[Split, Split]:
    """Permute once with the fixed seed; the tail is the holdout, the head (capped) trains."""
    total = len(inputs)
    count = _holdout_count(total, spec.holdout, spec.source)
    order = np.random.default_rng(SPLIT_SEED).permutation(total)
    train_idx = order[: total - count][: spec.max_samples]
    hold_idx = order[total - count :]
    return (
        Split(inputs[train_idx], targets[train_idx]),
        Split(inputs[hold_idx], targets[hold_idx]),
    )


def _shuffled_train(split: Split, max_samples: int | None) -> Split:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(split))[:max_samples]
    return Split(split.inputs[order], split.targets[order])


def _read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped when the name ends in .gz."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                data = stream.read(MAX_FILE_BYTES + 1)
        else:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise DatasetError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, expected a file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: broken or truncated gzip data ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise DatasetError(f"{path}: more than {MAX_FILE_BYTES} bytes of data")
    return data


def _load_digits(spec: DatasetSpec) -> tuple[DataInfo, Split, Split]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    inputs = np.asarray(bunch.images).astype(np.uint8)[:, None, :, :]
    targets = np.asarray(bunch.target).astype(np.int64)
    info = DataInfo(
        kind="image",
        task="classification",
        input_shape=(1, 8, 8),
        num_classes=10,
        scale=1.0 / 16.0,
    )
    train, holdout = _shuffled_split(inputs, targets, spec)
    return info, train, holdout


# MNIST ---------------------------------------------------------------------


def _find_idx(folder: Path, stem: str, ndim: int) -> Path | None:
    for separator in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = folder / f"{stem}{separator}idx{ndim}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _parse_idx(data: bytes, ndim: int, name: str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with `ndim` dimensions; errors name `name`."""
    if len(data) < 4:
        raise DatasetError(f"{name}: {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{name}: bad IDX magic {data[:4].hex()} (expected 0000 then type and rank)"
        )
    if data[2] != 0x08:
        raise DatasetError(
            f"{name}: IDX element type 0x{data[2]:02x} is not supported (only 0x08, unsigned byte)"
        )
    if data[3] != ndim:
        raise DatasetError(f"{name}: IDX rank {data[3]}, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated IDX header ({len(data)} bytes, needs {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if 0 in shape:
        raise DatasetError(f"{name}: IDX shape {shape} is empty")
    expected = header + math.prod(shape)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise DatasetError(
            f"{name}: {what}: {len(data)} bytes, the IDX shape {shape} needs {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_mnist_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images_path = _find_idx(folder, f"{prefix}-images", 3)
    labels_path = _find_idx(folder, f"{prefix}-labels", 1)
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = f"{prefix}-images" if images_path is None else f"{prefix}-labels"
        raise DatasetError(
            f"{folder}: {missing} IDX file not found (tried '-idx' and '.idx' names, .gz or not)"
        )
    images = _parse_idx(_read_bytes(images_path), 3, str(images_path))
    labels = _parse_idx(_read_bytes(labels_path), 1, str(labels_path))
    if len(images) != len(labels):
        raise DatasetError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}"
        )
    if int(labels.max()) >= MNIST_CLASSES:
        raise DatasetError(
            f"{labels_path}: label {int(labels.max())} is out of range 0..{MNIST_CLASSES - 1}"
        )
    return images[:, None, :, :].copy(), labels.astype(np.int64)


def _load_mnist(spec: DatasetSpec) -> tuple[DataInfo, Split, Split]:
    folder = Path(spec.source)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder (MNIST needs a folder of IDX files)")
    train_pair = _load_mnist_pair(folder, "train")
    if train_pair is None:
        raise DatasetError(
            f"{folder}: no train-images/train-labels IDX files (tried '-idx' and '.idx' names)"
        )
    test_pair = _load_mnist_pair(folder, "t10k")
    inputs, targets = train_pair
    info = DataInfo(
        kind="image",
        task="classification",
        input_shape=tuple(int(d) for d in inputs.shape[1:]),
        num_classes=MNIST_CLASSES,
        scale=1.0 / 255.0,
        mean=MNIST_MEAN,
        std=MNIST_STD,
    )
    if test_pair is None:
        train, holdout = _shuffled_split(inputs, targets, spec)
        return info, train, holdout
    if test_pair[0].shape[1:] != inputs.shape[1:]:
        raise DatasetError(
            f"{folder}: t10k images are {test_pair[0].shape[2:]}, train images are "
            f"{inputs.shape[2:]}"
        )
    train = _shuffled_train(Split(inputs, targets), spec.max_samples)
    return info, train, Split(*test_pair)


# Arrays and tables -----------------------------------------------------------


def _labels_from_strings(labels: Sequence[str], source: str) -> tuple[np.ndarray, int]:
    """Integer labels are class ids as given; anything else maps names to sorted ids."""
    if all(_INT_LABEL.fullmatch(label) for label in labels):
        ids = np.array([int(label) for label in labels], dtype=np.int64)
        return _integer_labels(ids, source)
    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    ids = np.array([index[label] for label in labels], dtype=np.int64)
    return ids, _check_classes(len(names), source)


def _integer_labels(ids: np.ndarray, source: str) -> tuple[np.ndarray, int]:
    low = int(ids.min())
    if low < 0:
        raise DatasetError(f"{source}: label {low} is negative; integer labels must be >= 0")
    high = int(ids.max())
    if high >= MAX_CLASSES:
        raise DatasetError(f"{source}: label {high} is too large (at most {MAX_CLASSES - 1})")
    return ids.astype(np.int64), _check_classes(high + 1, source)


def _check_classes(count: int, source: str) -> int:
    if count < 2:
        raise DatasetError(f"{source}: labels name {count} class(es); at least 2 are needed")
    if count > MAX_CLASSES:
        raise DatasetError(f"{source}: {count} classes, at most {MAX_CLASSES} are allowed")
    return count


def _labels_from_array(labels: np.ndarray, source: str) -> tuple[np.ndarray, int]:
    if labels.ndim != 1:
        raise DatasetError(f"{source}: labels must be 1-D, got shape {labels.shape}")
    kind = labels.dtype.kind
    if kind in "iub":
        return _integer_labels(labels.astype(np.int64), source)
    if kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DatasetError(f"{source}: float labels must be whole numbers")
        return _integer_labels(labels.astype(np.int64), source)
    if kind in "US":
        texts = [str(v) if kind == "U" else bytes(v).decode("utf-8", "replace") for v in labels]
        names = sorted(set(texts))
        index = {name: i for i, name in enumerate(names)}
        ids = np.array([index[t] for t in texts], dtype=np.int64)
        return ids, _check_classes(len(names), source)
    raise DatasetError(f"{source}: labels of dtype {labels.dtype} are not supported")


def _standardise(
    train: np.ndarray, other: np.ndarray, axis: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale by training statistics (per feature or global); returns float32."""
    train64 = train.astype(np.float64)
    mean = train64.mean(axis=axis)
    std = train64.std(axis=axis)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    scaled = ((train64 - mean) / std).astype(np.float32)
    other_scaled = ((other.astype(np.float64) - mean) / std).astype(np.float32)
    return scaled, other_scaled


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz archive ({exc})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: holds a single array; expected an .npz archive")
    with loaded as archive:
        names = set(archive.files)
        for x_name, y_name in (("x", "y"), ("inputs", "targets"), ("X", "y")):
            if x_name in names and y_name in names:
                try:
                    return archive[x_name], archive[y_name]
                except (OSError, ValueError, EOFError) as exc:
                    raise DatasetError(f"{path}: cannot read arrays ({exc})") from None
        raise DatasetError(
            f"{path}: expected arrays x/y, inputs/targets or X/y; found "
            f"{', '.join(sorted(names)) or 'none'}"
        )


def _load_npz(spec: DatasetSpec) -> tuple[DataInfo, Split, Split]:
    path = Path(spec.source)
    source = str(path)
    inputs, labels = _npz_arrays(path)
    if inputs.dtype.kind not in "iuf":
        raise DatasetError(f"{source}: inputs of dtype {inputs.dtype} are not numeric")
    if inputs.ndim not in (2, 3, 4):
        raise DatasetError(
            f"{source}: inputs have shape {inputs.shape}; expected [N, F], [N, H, W] or "
            "[N, C, H, W]"
        )
    if len(inputs) != len(labels):
        raise DatasetError(f"{source}: {len(inputs)} inputs but {len(labels)} labels")
    if inputs.dtype.kind == "f" and not np.all(np.isfinite(inputs)):
        raise DatasetError(f"{source}: inputs contain NaN or infinite values")
    targets, num_classes = _labels_from_array(labels, source)
    if inputs.ndim == 2:
        train, holdout = _shuffled_split(inputs, targets, spec)
        x_train, x_hold = _standardise(train.inputs, holdout.inputs, axis=0)
        info = DataInfo(
            kind="tabular",
            task="classification",
            input_shape=(int(inputs.shape[1]),),
            num_classes=num_classes,
        )
        return info, Split(x_train, train.targets), Split(x_hold, holdout.targets)
    images = _as_nchw(inputs)
    is_bytes = images.dtype == np.uint8 or (
        images.dtype.kind in "iu" and int(images.min()) >= 0 and int(images.max()) <= 255
    )
    if is_bytes:
        images = images.astype(np.uint8)
    train, holdout = _shuffled_split(images, targets, spec)
    shape = tuple(int(d) for d in images.shape[1:])
    if is_bytes:
        scale = 1.0 / 255.0
        mean = float(train.inputs.mean()) * scale
        std = float(train.inputs.std()) * scale
        info = DataInfo(
            kind="image",
            task="classification",
            input_shape=shape,
            num_classes=num_classes,
            scale=scale,
            mean=mean,
            std=std if std > 0 else 1.0,
        )
        return info, train, holdout
    x_train, x_hold = _standardise(train.inputs, holdout.inputs, axis=None)
    info = DataInfo(kind="image", task="classification", input_shape=shape, num_classes=num_classes)
    return info, Split(x_train, train.targets), Split(x_hold, holdout.targets)


def _as_nchw(images: np.ndarray) -> np.ndarray:
    """[N, H, W] gains a channel axis; [N, H, W, C] is recognised when C is 1..4 and H is not."""
    if images.ndim == 3:
        return np.ascontiguousarray(images[:, None, :, :])
    if images.shape[3] <= 4 < images.shape[1]:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return np.ascontiguousarray(images)


def _load_csv(spec: DatasetSpec) -> tuple[DataInfo, Split, Split]:
    path = Path(spec.source)
    source = str(path)
    try:
        text = _read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"{source}: empty file, expected a header row") from None
    except csv.Error as exc:
        raise DatasetError(f"{source}: row 1: {exc}") from None
    columns = [name.strip() for name in header]
    if len(set(columns)) != len(columns):
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        raise DatasetError(f"{source}: repeated column names: {', '.join(repeated)}")
    if spec.label_column not in columns:
        raise DatasetError(
            f"{source}: label column {spec.label_column!r} not found "
            f"(columns: {', '.join(columns)})"
        )
    label_at = columns.index(spec.label_column)
    feature_at = [i for i in range(len(columns)) if i != label_at]
    if not feature_at:
        raise DatasetError(f"{source}: no feature columns besides {spec.label_column!r}")
    rows: list[list[float]] = []
    labels: list[str] = []
    try:
        for cells in reader:
            if not cells or all(not cell.strip() for cell in cells):
                continue
            row = reader.line_num
            if len(cells) != len(columns):
                raise DatasetError(
                    f"{source}: row {row} has {len(cells)} cells, the header has {len(columns)}"
                )
            values: list[float] = []
            for i in feature_at:
                cell = cells[i].strip()
                try:
                    value = float(cell)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise DatasetError(
                        f"{source}: row {row}, column {columns[i]!r}: {cell!r} is not a "
                        "finite number"
                    )
                values.append(value)
            label = cells[label_at].strip()
            if not label:
                raise DatasetError(
                    f"{source}: row {row}, column {spec.label_column!r}: empty label"
                )
            rows.append(values)
            labels.append(label)
    except csv.Error as exc:
        raise DatasetError(f"{source}: row {reader.line_num}: {exc}") from None
    if len(rows) < 2:
        raise DatasetError(f"{source}: {len(rows)} data rows; at least 2 are needed")
    targets, num_classes = _labels_from_strings(labels, source)
    inputs = np.array(rows, dtype=np.float64)
    train, holdout = _shuffled_split(inputs, targets, spec)
    x_train, x_hold = _standardise(train.inputs, holdout.inputs, axis=0)
    info = DataInfo(
        kind="tabular",
        task="classification",
        input_shape=(len(feature_at),),
        num_classes=num_classes,
    )
    return info, Split(x_train, train.targets), Split(x_hold, holdout.targets)


# Text -----------------------------------------------------------------------


def _load_text(spec: DatasetSpec) -> tuple[DataInfo, Split, Split]:
    path = Path(spec.source)
    source = str(path)
    try:
        text = _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    vocab = "".join(sorted(set(text)))
    if len(vocab) > MAX_VOCAB:
        raise DatasetError(
            f"{source}: {len(vocab)} distinct characters, at most {MAX_VOCAB} are allowed"
        )
    if len(vocab) < 2:
        raise DatasetError(f"{source}: {len(vocab)} distinct characters, at least 2 are needed")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    tokens = np.searchsorted(vocab_codes, codes).astype(np.int64)
    width = spec.seq_len + 1
    count = len(tokens) // width
    needed = 2 if spec.holdout > 0 else 1
    if count < needed:
        raise DatasetError(
            f"{source}: {len(tokens)} characters make {count} windows of seq_len + 1 = {width}; "
            f"at least {needed} are needed"
        )
    windows = tokens[: count * width].reshape(count, width)
    hold_count = _holdout_count(count, spec.holdout, source)
    train_windows = windows[: count - hold_count]
    hold_windows = windows[count - hold_count :]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train_windows))
    train_windows = train_windows[order[: spec.max_samples]]
    info = DataInfo(kind="text", task="language", input_shape=(spec.seq_len,), vocab=vocab)
    return info, _windows_split(train_windows), _windows_split(hold_windows)


def _windows_split(windows: np.ndarray) -> Split:
    return Split(np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:]))


# ---------------------------------------------------------------------------
# Shards


def cut_shards(train: Split, samples_per_shard: int) -> list[bytes]:
    """Cut the training split into equal-size shards of canonical safetensors bytes.

    Shards follow dataset order. Samples beyond the last full shard are dropped
    so that every calculation weighs the same; a dataset smaller than one shard
    becomes a single shard holding all of it.
    """
    if not _is_int(samples_per_shard) or samples_per_shard < 1:
        raise DatasetError(
            f"samples_per_shard must be a positive integer, got {samples_per_shard!r}"
        )
    total = len(train)
    if total == 0:
        raise DatasetError("cannot cut shards from an empty training split")
    if total < samples_per_shard:
        return [_encode_shard(train.inputs, train.targets)]
    return [
        _encode_shard(
            train.inputs[start : start + samples_per_shard],
            train.targets[start : start + samples_per_shard],
        )
        for start in range(0, total - samples_per_shard + 1, samples_per_shard)
    ]


def _encode_shard(inputs: np.ndarray, targets: np.ndarray) -> bytes:
    return encode_tensors({"inputs": inputs, "targets": targets})


def read_shard(data: bytes, info: DataInfo, *, max_bytes: int = DEFAULT_SHARD_BYTES) -> Split:
    """Decode shard bytes and check them against `info` before any computation touches them.

    Raises `TensorFormatError` for bytes that are not canonical safetensors and
    `DatasetError` for tensors that do not fit the job's data description.
    """
    tensors = decode_tensors(data, max_bytes=max_bytes)
    names = sorted(tensors)
    if names != ["inputs", "targets"]:
        raise DatasetError(f"shard: tensors {names}, expected exactly ['inputs', 'targets']")
    inputs = tensors["inputs"]
    targets = tensors["targets"]
    expected_dtype = info.input_dtype
    if inputs.dtype != expected_dtype:
        raise DatasetError(f"shard: 'inputs' has dtype {inputs.dtype}, expected {expected_dtype}")
    if targets.dtype != np.int64:
        raise DatasetError(f"shard: 'targets' has dtype {targets.dtype}, expected int64")
    if inputs.ndim != 1 + len(info.input_shape) or inputs.shape[1:] != info.input_shape:
        raise DatasetError(
            f"shard: 'inputs' has shape {inputs.shape}, expected [N, "
            f"{', '.join(str(d) for d in info.input_shape)}]"
        )
    samples = inputs.shape[0]
    if samples < 1:
        raise DatasetError("shard: holds no samples")
    target_shape = (samples,) if info.task == "classification" else (samples, info.input_shape[0])
    if targets.shape != target_shape:
        raise DatasetError(f"shard: 'targets' has shape {targets.shape}, expected {target_shape}")
    if info.task == "classification":
        _check_range(targets, "targets", info.num_classes or 0, "class ids")
    else:
        _check_range(inputs, "inputs", info.vocab_size or 0, "token ids")
        _check_range(targets, "targets", info.vocab_size or 0, "token ids")
    if inputs.dtype == np.float32 and not np.all(np.isfinite(inputs)):
        raise DatasetError("shard: 'inputs' contains NaN or infinite values")
    return Split(inputs, targets)


def _check_range(values: np.ndarray, name: str, limit: int, what: str) -> None:
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise DatasetError(f"shard: {name!r} holds {what} {bad}, allowed 0..{limit - 1}")
