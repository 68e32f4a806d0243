"""Typed message classes with strict validation.

A message class is a frozen dataclass registered under a wire type name. Its
fields are checked on the way in (types, ranges, lengths, patterns) so that a
malformed body is refused with an error naming the field and the reason before
any role code sees it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, get_args, get_origin

from ravenp2p.wire.errors import WireError

MAX_STR_DEFAULT = 1024
MAX_BYTES_DEFAULT = 64 * 1024
MAX_ITEMS_DEFAULT = 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def constrained(
    *,
    min: float | None = None,
    max: float | None = None,
    max_len: int | None = None,
    min_len: int | None = None,
    pattern: str | None = None,
    choices: tuple[Any, ...] | None = None,
    item_max_len: int | None = None,
    default: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with validation limits, e.g. `share: int = constrained(min=1, max=100)`."""
    metadata = {
        "min": min,
        "max": max,
        "max_len": max_len,
        "min_len": min_len,
        "pattern": re.compile(pattern) if pattern else None,
        "choices": choices,
        "item_max_len": item_max_len,
    }
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Message:
    """Base of every typed wire message; subclasses are frozen dataclasses."""

    TYPE: ClassVar[str]

    def to_body(self) -> dict[str, Any]:
        """The body as plain msgpack-able values (nested messages become dicts)."""
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_body(cls: type[M], body: object) -> M:
        """Validate a decoded body and build the message, or raise `WireError`."""
        if not isinstance(body, dict):
            raise WireError("body", f"must be a map, got {type(body).__name__}")
        hints, fields = _shape_of(cls)
        unknown = sorted(set(body) - set(fields), key=str)
        if unknown:
            raise WireError(f"body.{unknown[0]}", f"unknown field for {cls.TYPE}")
        values: dict[str, Any] = {}
        for name, field in fields.items():
            path = f"body.{name}"
            if name not in body:
                if field.default is not dataclasses.MISSING:
                    continue
                raise WireError(path, "missing")
            values[name] = _check(path, body[name], hints[name], field.metadata)
        return cls(**values)

    def validate(self) -> None:
        """Check a locally built message against its own limits before sending it."""
        type(self).from_body(self.to_body())


M = TypeVar("M", bound=Message)


@functools.cache
def _shape_of(cls: type[Message]) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """A message class's resolved type hints and fields (resolving them is slow)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return typing.get_type_hints(cls), fields

_REGISTRY: dict[str, type[Message]] = {}


def register(cls: type[M]) -> type[M]:
    """Class decorator: make a message type known to the decoder."""
    name = cls.TYPE
    if not re.fullmatch(r"[a-z0-9_.\-]{1,64}", name):
        raise ValueError(f"invalid message type name {name!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"message type {name!r} is already registered by {existing.__name__}")
    _REGISTRY[name] = cls
    return cls


def message_class(type_name: str) -> type[Message]:
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise WireError("type", f"unknown message type {type_name!r}") from None


def _to_plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_body()
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _check(path: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{path}: only Optional[X] unions are supported")
        return _check(path, value, inner[0], meta)
    if origin in (tuple, list):
        item_hint = get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise WireError(path, f"must be a list, got {type(value).__name__}")
        _check_len(path, len(value), meta, MAX_ITEMS_DEFAULT, "items")
        item_meta = {"max_len": meta.get("item_max_len"), "pattern": meta.get("pattern")}
        scalar = _SCALARS.get(item_hint)
        if scalar is None:
            return tuple(_check(f"{path}[{i}]", v, item_hint, item_meta)
                         for i, v in enumerate(value))
        # Lists of scalars (message ids, peer ids) can be long: no path string per item.
        try:
            return tuple([scalar(path, v, item_meta) for v in value])
        except WireError as exc:
            index = next(i for i, v in enumerate(value) if not _scalar_ok(scalar, v, item_meta))
            raise WireError(f"{path}[{index}]", exc.reason) from None
    if isinstance(hint, type) and issubclass(hint, Message):
        try:
            return hint.from_body(value)
        except WireError as exc:
            raise WireError(path + exc.field.removeprefix("body"), exc.reason) from None
    checker = _SCALARS.get(hint)
    if checker is None:
        raise TypeError(f"{path}: unsupported field type {hint!r}")
    return checker(path, value, meta)


def _check_len(path: str, n: int, meta: typing.Mapping[str, Any], default: int, unit: str) -> None:
    max_len = meta.get("max_len") or default
    min_len = meta.get("min_len") or 0
    if n > max_len:
        raise WireError(path, f"too long: {n} {unit}, at most {max_len}")
    if n < min_len:
        raise WireError(path, f"too short: {n} {unit}, at least {min_len}")


def _check_range(path: str, value: float, meta: typing.Mapping[str, Any]) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise WireError(path, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise WireError(path, f"must be <= {hi}, got {value}")


def _check_choices(path: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise WireError(path, f"must be one of {list(choices)}, got {value!r}")


def _check_int(path: str, value: Any, meta: typing.Mapping[str, Any]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(path, f"must be an integer, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise WireError(path, "integer out of 64-bit range")
    _check_range(path, value, meta)
    _check_choices(path, value, meta)
    return value


def _check_float(path: str, value: Any, meta: typing.Mapping[str, Any]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(path, f"must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise WireError(path, "must be finite")
    _check_range(path, value, meta)
    return value


def _check_bool(path: str, value: Any, meta: typing.Mapping[str, Any]) -> bool:
    if not isinstance(value, bool):
        raise WireError(path, f"must be true or false, got {type(value).__name__}")
    return value


def _check_str(path: str, value: Any, meta: typing.Mapping[str, Any]) -> str:
    if not isinstance(value, str):
        raise WireError(path, f"must be a string, got {type(value).__name__}")
    _check_len(path, len(value), meta, MAX_STR_DEFAULT, "characters")
    pattern = meta.get("pattern")
    if pattern is not None and not pattern.fullmatch(value):
        raise WireError(path, f"does not match the expected format {pattern.pattern!r}")
    _check_choices(path, value, meta)
    return value


def _check_bytes(path: str, value: Any, meta: typing.Mapping[str, Any]) -> bytes:
    if not isinstance(value, bytes):
        raise WireError(path, f"must be bytes, got {type(value).__name__}")
    _check_len(path, len(value), meta, MAX_BYTES_DEFAULT, "bytes")
    return value


def _scalar_ok(
    checker: Callable[[str, Any, typing.Mapping[str, Any]], Any], value: Any,
    meta: typing.Mapping[str, Any],
) -> bool:
    try:
        checker("", value, meta)
    except WireError:
        return False
    return True


_SCALARS: dict[Any, Callable[[str, Any, typing.Mapping[str, Any]], Any]] = {
    int: _check_int,
    float: _check_float,
    bool: _check_bool,
    str: _check_str,
    bytes: _check_bytes,
}
