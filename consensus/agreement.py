"""When do two workers' results for the same calculation agree?

Gradients computed by honest peers on different CPUs (thread counts, ISAs, oneDNN
on or off) differ in their low bits, so equality of bytes is too strict. Two
results agree when their relative L2 distance is at most ``REL_L2_TOLERANCE``
and, for every tensor ``t``, ``max |a_t - b_t|`` is at most
``MAX_ABS_TOLERANCE * max(max |g_t|, FLOOR_FRACTION * max |g|)``, where every
reference magnitude is taken from the larger of the two sides so that the rule
is symmetric. The floor keeps a tensor whose values are all tiny next to the
rest of the gradient from being held to an impossibly tight bound.

Everything is computed in float64 from the tensors as given; the functions here
read no clock, draw no random numbers and perform no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

REL_L2_TOLERANCE = 1e-4
MAX_ABS_TOLERANCE = 1e-4
FLOOR_FRACTION = 1e-3

# Booleans, signed and unsigned integers, and real floating point numbers.
_NUMERIC_KINDS = frozenset("biuf")


@dataclass(frozen=True)
class Comparison:
    """The verdict of comparing two results, with what drove it.

    ``rel_l2`` is the relative L2 distance ``|a - b| / max(|a|, |b|)`` (0 when
    both sides are all zero, ``inf`` when the comparison stopped before it
    could be computed). ``worst_tensor`` names the tensor that decided a
    disagreement, or for an agreement the tensor closest to its bound; it is
    None when no tensor differs at all.
    """

    agree: bool
    reason: str
    rel_l2: float
    worst_tensor: str | None


def _structural_problem(name: str, x: NDArray[Any], y: NDArray[Any]) -> str | None:
    """Describe why tensor ``name`` cannot be compared numerically, or None."""
    if x.dtype != y.dtype:
        return f"tensor {name!r}: dtype differs ({x.dtype} vs {y.dtype})"
    if x.dtype.kind not in _NUMERIC_KINDS:
        return (
            f"tensor {name!r}: dtype {x.dtype} is not supported "
            "(allowed: bool, integer or real floating point)"
        )
    if x.shape != y.shape:
        return f"tensor {name!r}: shape differs ({x.shape} vs {y.shape})"
    for side, arr in (("first", x), ("second", y)):
        if arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
            return f"tensor {name!r}: {side} result holds a NaN or infinite value"
    return None


def _as_array(name: str, side: str, value: object) -> NDArray[Any]:
    """Return ``value`` as an array if it is numpy data; raise TypeError otherwise."""
    # Arithmetic on a 0-d array yields a numpy scalar; both are accepted.
    if not isinstance(value, np.ndarray | np.generic):
        raise TypeError(
            f"tensor {name!r} of the {side} result must be a numpy array, "
            f"got {type(value).__name__}"
        )
    return np.asarray(value)


def _max_abs(arr: NDArray[np.float64]) -> float:
    """Largest absolute value of ``arr``; 0.0 for an empty array."""
    return float(np.max(np.abs(arr))) if arr.size else 0.0


def compare_tensors(a: Mapping[str, NDArray[Any]], b: Mapping[str, NDArray[Any]]) -> Comparison:
    """Compare two named tensor sets under the agreement rule.

    The verdict is symmetric: ``compare_tensors(a, b).agree`` equals
    ``compare_tensors(b, a).agree`` and both report the same ``rel_l2``.
    Different tensor names, shapes or dtypes, an unsupported dtype, or any
    NaN or infinite value make the results disagree, with a reason naming the
    tensor. Two all-zero results agree.
    """
    names_a, names_b = set(a), set(b)
    if names_a != names_b:
        missing = sorted(names_a ^ names_b)
        first = missing[0]
        side = "second" if first in names_a else "first"
        return Comparison(
            agree=False,
            reason=f"tensor {first!r} is missing from the {side} result"
            + (f" ({len(missing)} names differ)" if len(missing) > 1 else ""),
            rel_l2=math.inf,
            worst_tensor=first,
        )
    names = sorted(names_a)
    left = {name: _as_array(name, "first", a[name]) for name in names}
    right = {name: _as_array(name, "second", b[name]) for name in names}
    for name in names:
        problem = _structural_problem(name, left[name], right[name])
        if problem is not None:
            return Comparison(agree=False, reason=problem, rel_l2=math.inf, worst_tensor=name)

    pairs = [
        (name, left[name].astype(np.float64), right[name].astype(np.float64)) for name in names
    ]
    tensor_max = {name: max(_max_abs(x), _max_abs(y)) for name, x, y in pairs}
    global_max = max(tensor_max.values(), default=0.0)
    if global_max == 0.0:
        return Comparison(
            agree=True, reason="both results are all zero", rel_l2=0.0, worst_tensor=None
        )

    # Dividing both sides by the same factor keeps the sums of squares finite for
    # any finite float64 input; every ratio below is unchanged by it.
    scale = global_max
    sq_diff = sq_a = sq_b = 0.0
    worst_name: str | None = None
    worst_ratio = 0.0
    worst_diff = 0.0
    worst_allowed = 0.0
    floor = FLOOR_FRACTION * global_max
    for name, x, y in pairs:
        xs, ys = x / scale, y / scale
        diff = xs - ys
        sq_diff += float(np.sum(diff * diff))
        sq_a += float(np.sum(xs * xs))
        sq_b += float(np.sum(ys * ys))
        max_diff = _max_abs(diff) * scale
        allowed = MAX_ABS_TOLERANCE * max(tensor_max[name], floor)
        if max_diff > 0.0:
            ratio = max_diff / allowed
            if ratio > worst_ratio:
                worst_name, worst_ratio = name, ratio
                worst_diff, worst_allowed = max_diff, allowed

    rel_l2 = math.sqrt(sq_diff) / math.sqrt(max(sq_a, sq_b))
    if worst_ratio > 1.0:
        return Comparison(
            agree=False,
            reason=(
                f"tensor {worst_name!r}: max |diff| {worst_diff:.3e} exceeds "
                f"the allowed {worst_allowed:.3e}"
            ),
            rel_l2=rel_l2,
            worst_tensor=worst_name,
        )
    if rel_l2 > REL_L2_TOLERANCE:
        return Comparison(
            agree=False,
            reason=f"relative L2 distance {rel_l2:.3e} exceeds {REL_L2_TOLERANCE:.0e}",
            rel_l2=rel_l2,
            worst_tensor=worst_name,
        )
    reason = "identical values" if worst_name is None else "within tolerance"
    return Comparison(agree=True, reason=reason, rel_l2=rel_l2, worst_tensor=worst_name)


def tensors_agree(a: Mapping[str, NDArray[Any]], b: Mapping[str, NDArray[Any]]) -> bool:
    """Whether two named tensor sets agree; see :func:`compare_tensors`."""
    return compare_tensors(a, b).agree
