"""Tensors on the wire: canonical safetensors bytes, named by their sha256.

Weights, dataset shards and gradients travel as safetensors (no pickle, no
code), and every blob is identified by the sha256 of its exact bytes. A blob is
accepted only in its canonical encoding (what `encode_tensors` produces for the
same tensors), so one set of tensors has exactly one digest: two workers that
computed the same gradient send byte-identical results.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

MAX_TENSORS = 4096
MAX_HEADER_BYTES = 1024 * 1024
DIGEST_HEX_LEN = 64
DIGEST_PATTERN = r"[0-9a-f]{64}"

ALLOWED_DTYPES = frozenset({"F32", "F64", "I64", "I32", "U8", "I8", "BOOL", "F16"})

TensorMap = dict[str, np.ndarray]


class TensorFormatError(ValueError):
    """Bytes that should hold tensors do not; the message says what is wrong."""


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """The content address of a blob: lowercase hex sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Canonical safetensors bytes for `tensors` (contiguous, no metadata)."""
    if len(tensors) > MAX_TENSORS:
        raise TensorFormatError(f"too many tensors: {len(tensors)}, at most {MAX_TENSORS}")
    return save({name: np.ascontiguousarray(array) for name, array in tensors.items()})


def decode_tensors(data: bytes, *, max_bytes: int | None = None) -> TensorMap:
    """Parse canonical safetensors bytes; `TensorFormatError` names what is wrong.

    The header is checked before the library sees it (size, dtype allow-list,
    tensor count), and the bytes must re-encode to themselves.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise TensorFormatError(f"{len(data)} bytes, more than the limit of {max_bytes}")
    if len(data) < 8:
        raise TensorFormatError("shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise TensorFormatError(f"header length {header_len} does not fit the data")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise TensorFormatError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFormatError("header is not a JSON object")
    if "__metadata__" in header:
        raise TensorFormatError("metadata is not allowed")
    if len(header) > MAX_TENSORS:
        raise TensorFormatError(f"too many tensors: {len(header)}, at most {MAX_TENSORS}")
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in ALLOWED_DTYPES:
            raise TensorFormatError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise TensorFormatError(f"not valid safetensors: {exc}") from None
    if encode_tensors(tensors) != data:
        raise TensorFormatError("not in canonical form")
    return tensors
