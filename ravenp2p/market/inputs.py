"""Inference inputs and outputs: reading them from files and prompts, checking them, reading
predictions out of the outputs.

A model takes its inputs as the job's data held them (see
`ravenp2p.training.model_file`): raw uint8 pixels (or normalised float32) for
images, float32 features for tabular data, int64 token ids for text. A
record says which (`ModelRecord.input_dtype`), so a caller converts and
checks its inputs before it pays for a call, and the serving peer checks
them again. Every refusal is an `InputError` whose message starts with
`inputs:` and says what is wrong.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from ravenp2p.market.records import (
    INPUT_TENSOR,
    MAX_BATCH,
    MAX_INPUT_BYTES,
    MAX_OUTPUT_BYTES,
    OUTPUT_TENSOR,
    ModelRecord,
)
from ravenp2p.training.tensors import TensorFormatError, decode_tensors, encode_tensors

MAX_INPUT_FILE_BYTES = 4 * 1024 * 1024
"""Largest input file read (the inputs it holds must still fit `MAX_INPUT_BYTES`)."""
INPUT_SUFFIXES = (".npy", ".npz", ".csv", ".safetensors", ".txt")
NPZ_NAMES = ("x", "inputs", "X")
"""Array names an .npz input file is read from (the names training data files use)."""
TOP_TOKENS = 5
"""Most likely next tokens listed per sample for a text model."""
_OUTPUT_HEADER_BYTES = 256


class InputError(ValueError):
    """Inputs a model cannot take; the message says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"inputs: {reason}")


# --- from files and prompts ----------------------------------------------------------------------
def read_input_file(path: Path, record: ModelRecord) -> np.ndarray:
    """The samples in an .npy, .npz, .csv, .safetensors or .txt (prompt) file, as `record`
    takes them.

    An .npz file is read from its array `x`, `inputs` or `X` (or its only
    array), a .safetensors file from its tensor `input` (or its only
    tensor); a .csv file holds one sample a row (a first row that is not
    numbers is taken as a header); a .txt file is a prompt for a text model.
    """
    path = Path(path)
    check_input_suffix(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size > MAX_INPUT_FILE_BYTES:
        raise InputError(f"{path}: {size} bytes, more than the {MAX_INPUT_FILE_BYTES} read at most")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse_input_file(data, path, record)


def check_input_suffix(path: Path) -> None:
    """Refuse a file whose name says it is none of the input formats."""
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise InputError(f"{path}: unknown kind of file; give one of {', '.join(INPUT_SUFFIXES)}")


def parse_input_file(data: bytes, path: Path, record: ModelRecord) -> np.ndarray:
    """The samples in the bytes of an input file named `path` (see `read_input_file`)."""
    check_input_suffix(path)
    suffix = path.suffix.lower()
    if len(data) > MAX_INPUT_FILE_BYTES:
        raise InputError(f"{path}: {len(data)} bytes, more than the {MAX_INPUT_FILE_BYTES} "
                         "read at most")
    if suffix == ".txt":
        try:
            return encode_prompt(data.decode("utf-8"), record)
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if suffix == ".npy":
        array = _load_npy(data, path)
    elif suffix == ".npz":
        array = _load_npz(data, path)
    elif suffix == ".safetensors":
        array = _load_safetensors(data, path)
    else:
        array = _load_csv(data, path)
    return shape_inputs(array, record)


def _load_npy(data: bytes, path: Path) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path}: holds an archive, not one array; name it .npz")
    return array


def _load_npz(data: bytes, path: Path) -> np.ndarray:
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: holds a single array; name it .npy")
    with archive:
        names = list(archive.files)
        chosen = next((n for n in NPZ_NAMES if n in names), names[0] if len(names) == 1 else None)
        if chosen is None:
            raise InputError(f"{path}: expected an array named {', '.join(NPZ_NAMES)} (or just "
                             f"one array); found {', '.join(sorted(names)) or 'none'}")
        try:
            return np.asarray(archive[chosen])
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"{path}: cannot read array {chosen!r} ({exc})") from None


def _load_safetensors(data: bytes, path: Path) -> np.ndarray:
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from None
    if INPUT_TENSOR in tensors:
        return tensors[INPUT_TENSOR]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise InputError(f"{path}: expected a tensor named {INPUT_TENSOR!r} (or just one tensor); "
                     f"found {', '.join(sorted(tensors)) or 'none'}")


def _load_csv(data: bytes, path: Path) -> np.ndarray:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    values: list[list[float]] = []
    for number, row in enumerate(rows, start=1):
        try:
            values.append([float(cell) for cell in row])
        except ValueError:
            if number == 1:  # a header
                continue
            raise InputError(f"{path}: row {number} holds something that is not a number") from None
    if not values:
        raise InputError(f"{path}: holds no rows of numbers")
    width = len(values[0])
    for numbers in values:
        if len(numbers) != width:
            raise InputError(f"{path}: rows have {width} and {len(numbers)} values; all rows "
                             "must have as many")
    return np.asarray(values, dtype=np.float64)


def encode_prompt(text: str, record: ModelRecord) -> np.ndarray:
    """A text model's token ids for `text` (its last `seq_len` characters), as a batch of one."""
    if record.task != "language":
        raise InputError(f"model {record.name} takes {record.kind} inputs, not a text prompt: "
                         "give an .npy, .npz, .csv or .safetensors file")
    if not text:
        raise InputError("the prompt is empty")
    vocab = {char: index for index, char in enumerate(record.vocab)}
    unknown = sorted({char for char in text if char not in vocab})
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise InputError(f"the prompt holds characters model {record.name} never saw: {shown}")
    tokens = [vocab[char] for char in text[-record.input_shape[0]:]]
    return np.asarray([tokens], dtype=np.int64)


# --- shape, dtype, limits ------------------------------------------------------------------------
def shape_inputs(array: np.ndarray, record: ModelRecord) -> np.ndarray:
    """`array` as a batch the model takes: batch axis added to one sample, flat rows reshaped,
    values converted to the record's dtype when that loses nothing; then `check_inputs`."""
    array = np.asarray(array)
    shape = tuple(record.input_shape)
    if array.dtype.kind not in "biuf":
        raise InputError(f"values must be numbers, not {array.dtype}")
    if record.task == "language":
        if array.ndim == 1:
            array = array[None, :]
    elif array.shape == shape:
        array = array[None, ...]
    elif array.ndim == 2 and len(shape) > 1 and array.shape[1] == math.prod(shape):
        array = array.reshape((array.shape[0], *shape))  # CSV rows of flattened images
    array = _converted(array, record)
    check_inputs(array, record)
    return array


def _converted(array: np.ndarray, record: ModelRecord) -> np.ndarray:
    wanted = np.dtype(record.input_dtype)
    if array.dtype == wanted:
        return np.ascontiguousarray(array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError("values must be finite numbers (found NaN or infinity)")
    if wanted.kind == "f":
        return np.ascontiguousarray(array, dtype=wanted)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        what = "token ids" if record.task == "language" else "raw pixel values"
        raise InputError(f"model {record.name} takes {what} ({record.input_dtype}): whole "
                         "numbers only")
    info = np.iinfo(wanted)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise InputError(f"values must fit {record.input_dtype} ({info.min}..{info.max}), got "
                         f"{array.min()}..{array.max()}")
    return np.ascontiguousarray(array, dtype=wanted)


def check_inputs(array: np.ndarray, record: ModelRecord) -> None:
    """Refuse a batch that `record`'s model cannot take, or whose call would break the limits."""
    shape = tuple(record.input_shape)
    if array.dtype != np.dtype(record.input_dtype):
        raise InputError(f"model {record.name} takes {record.input_dtype} values, "
                         f"not {array.dtype}")
    if record.task == "language":
        if array.ndim != 2 or not 1 <= array.shape[1] <= shape[0]:
            raise InputError(f"model {record.name} takes token ids of shape (batch, steps) with "
                             f"1..{shape[0]} steps, got {array.shape}")
        if array.size and (array.min() < 0 or array.max() >= len(record.vocab)):
            raise InputError(f"token ids must be 0..{len(record.vocab) - 1}")
    elif array.shape[1:] != shape:
        raise InputError(f"model {record.name} takes samples of shape {shape} (a batch: "
                         f"(N, {', '.join(map(str, shape))})), got {array.shape}")
    elif array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError("values must be finite numbers (found NaN or infinity)")
    batch = array.shape[0] if array.ndim else 0
    if not 1 <= batch <= MAX_BATCH:
        raise InputError(f"a call takes 1..{MAX_BATCH} samples, got {batch}")
    if array.nbytes + _OUTPUT_HEADER_BYTES > MAX_INPUT_BYTES:
        raise InputError(f"{array.nbytes} bytes of inputs, more than a call carries "
                         f"({MAX_INPUT_BYTES}); send fewer samples")
    steps = array.shape[1] if record.task == "language" else None
    out = batch * record.output_values_per_sample(steps) * 4
    if out + _OUTPUT_HEADER_BYTES > MAX_OUTPUT_BYTES:
        raise InputError(f"the outputs would be {out} bytes, more than a reply carries "
                         f"({MAX_OUTPUT_BYTES}); send fewer samples")


# --- on the wire ---------------------------------------------------------------------------------
def encode_inputs(array: np.ndarray) -> bytes:
    """A batch as an inference request carries it: canonical safetensors, tensor `input`."""
    return encode_tensors({INPUT_TENSOR: array})


def decode_inputs(data: bytes, record: ModelRecord) -> np.ndarray:
    """The checked batch in an inference request's `inputs`; `InputError` says what is wrong."""
    try:
        tensors = decode_tensors(data, max_bytes=MAX_INPUT_BYTES)
    except TensorFormatError as exc:
        raise InputError(str(exc)) from None
    if set(tensors) != {INPUT_TENSOR}:
        raise InputError(f"must hold exactly one tensor, {INPUT_TENSOR!r}; found "
                         f"{', '.join(sorted(tensors)) or 'none'}")
    array = tensors[INPUT_TENSOR]
    check_inputs(array, record)
    return array


def encode_outputs(array: np.ndarray) -> bytes:
    """Model outputs as a reply carries them: canonical safetensors, tensor `output`."""
    return encode_tensors({OUTPUT_TENSOR: np.ascontiguousarray(array, dtype=np.float32)})


def decode_outputs(data: bytes, record: ModelRecord, inputs: np.ndarray) -> np.ndarray:
    """The outputs in a reply, checked against what the model returns for `inputs`.

    Raises ValueError (naming `outputs`) when they are malformed or of the wrong shape.
    """
    try:
        tensors = decode_tensors(data, max_bytes=MAX_OUTPUT_BYTES)
    except TensorFormatError as exc:
        raise ValueError(f"outputs: {exc}") from None
    array = tensors.get(OUTPUT_TENSOR)
    if array is None or len(tensors) != 1:
        raise ValueError(f"outputs: must hold exactly one tensor, {OUTPUT_TENSOR!r}")
    expected = output_shape(record, inputs)
    if array.shape != expected or array.dtype != np.float32:
        raise ValueError(f"outputs: expected float32 {expected}, got {array.dtype} {array.shape}")
    return array


def output_shape(record: ModelRecord, inputs: np.ndarray) -> tuple[int, ...]:
    """The shape of the model's outputs for a batch of `inputs`."""
    if record.task == "language":
        return (inputs.shape[0], inputs.shape[1], len(record.vocab))
    assert record.num_classes is not None
    return (inputs.shape[0], record.num_classes)


# --- predictions ---------------------------------------------------------------------------------
def predictions(outputs: np.ndarray, record: ModelRecord) -> list[dict[str, Any]]:
    """What the outputs say, per sample, as plain data.

    A classifier: the most likely `class` and its `probability` (softmax of
    the outputs). A text model: the most likely `next` character after the
    last step, and the `top` few with their probabilities.
    """
    if record.task == "language":
        last = _softmax(outputs[:, -1, :].astype(np.float64))
        rows = []
        for probs in last:
            order = np.argsort(-probs, kind="stable")[:TOP_TOKENS]
            top = [{"token": record.vocab[i], "probability": round(float(probs[i]), 6)}
                   for i in order]
            rows.append({"next": top[0]["token"], "top": top})
        return rows
    probs = _softmax(outputs.astype(np.float64))
    classes = probs.argmax(axis=1)
    return [{"class": int(c), "probability": round(float(p[c]), 6)}
            for c, p in zip(classes, probs, strict=True)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result
