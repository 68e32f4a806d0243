"""Property and example tests for the gradient agreement rule (consensus.agreement)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from numpy.typing import NDArray

from consensus.agreement import (
    FLOOR_FRACTION,
    MAX_ABS_TOLERANCE,
    REL_L2_TOLERANCE,
    Comparison,
    compare_tensors,
    tensors_agree,
)

Tensors = dict[str, NDArray[Any]]

# Examples are cheap but numerous; no deadline keeps slow CI machines from flaking.
FAST = settings(deadline=None, max_examples=60)

NAMES = st.text(alphabet="abcdefgh._", min_size=1, max_size=6)
FLOAT32 = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
FLOAT64 = st.floats(-1e6, 1e6, allow_subnormal=False)


def tensor_sets(
    dtype: type[np.floating[Any]] = np.float32, min_side: int = 1
) -> st.SearchStrategy[Tensors]:
    """Named sets of 0-3 dimensional finite tensors of one dtype."""
    elements = FLOAT32 if dtype is np.float32 else FLOAT64
    tensor = arrays(
        dtype,
        array_shapes(min_dims=0, max_dims=3, min_side=min_side, max_side=5),
        elements=elements,
    )
    return st.dictionaries(NAMES, tensor, min_size=1, max_size=4)


def global_max(tensors: Tensors) -> float:
    return max((float(np.max(np.abs(t))) for t in tensors.values() if t.size), default=0.0)


def gradients() -> st.SearchStrategy[Tensors]:
    """Tensor sets of either dtype that are not all zero (a real gradient)."""
    both = st.one_of(tensor_sets(np.float32), tensor_sets(np.float64))
    return both.filter(lambda g: global_max(g) >= 1e-6)


def copy_of(tensors: Tensors) -> Tensors:
    return {name: t.copy() for name, t in tensors.items()}


def with_noise(tensors: Tensors, relative: float, seed: int) -> Tensors:
    """Add gaussian noise whose L2 norm is exactly ``relative`` times each tensor's norm."""
    rng = np.random.default_rng(seed)
    noisy: Tensors = {}
    for name, t in tensors.items():
        direction = rng.standard_normal(t.shape)
        size = float(np.linalg.norm(direction))
        values = t.astype(np.float64)
        if size > 0.0:
            values = values + direction * (relative * float(np.linalg.norm(values)) / size)
        noisy[name] = values.astype(t.dtype)
    return noisy


@FAST
@given(tensor_sets(np.float32, min_side=0) | tensor_sets(np.float64, min_side=0))
def test_reflexive_for_finite_tensors(a: Tensors) -> None:
    """Any finite result agrees with a copy of itself, empty and all-zero tensors included."""
    verdict = compare_tensors(a, copy_of(a))
    assert verdict.agree, verdict.reason
    assert verdict.rel_l2 == 0.0
    assert verdict.worst_tensor is None


def perturbed(draw: st.DrawFn, a: Tensors) -> Tensors:
    """A second result built from ``a`` in one of many ways, agreeing or not."""
    how = draw(st.sampled_from(["noise", "scale", "flip", "zero", "fresh", "rename", "dtype"]))
    if how == "noise":
        relative = 10.0 ** draw(st.floats(-9, -1))
        return with_noise(a, relative, draw(st.integers(0, 2**32 - 1)))
    if how == "scale":
        factor = 1.0 + 10.0 ** draw(st.floats(-8, -1))
        return {name: (t * factor).astype(t.dtype) for name, t in a.items()}
    if how == "flip":
        b = copy_of(a)
        name = draw(st.sampled_from(sorted(b)))
        b[name].reshape(-1)[draw(st.integers(0, b[name].size - 1))] *= -1
        return b
    if how == "zero":
        return {name: np.zeros_like(t) for name, t in a.items()}
    if how == "fresh":
        return draw(tensor_sets(np.float32))
    if how == "rename":
        return {name + "x": t for name, t in a.items()}
    other = {np.dtype(np.float32): np.float64, np.dtype(np.float64): np.float32}
    return {name: t.astype(other[t.dtype]) for name, t in a.items()}


@settings(deadline=None, max_examples=150)
@given(st.data())
def test_symmetric(data: st.DataObject) -> None:
    """Swapping the two sides never changes the verdict, the distance or the tensor named."""
    a = data.draw(tensor_sets(np.float32) | tensor_sets(np.float64))
    b = perturbed(data.draw, a)
    forward, backward = compare_tensors(a, b), compare_tensors(b, a)
    assert forward.agree == backward.agree
    assert forward.rel_l2 == backward.rel_l2
    assert forward.worst_tensor == backward.worst_tensor


@FAST
@given(tensor_sets(np.float32, min_side=0) | tensor_sets(np.float64, min_side=0))
def test_equal_bytes_agree(a: Tensors) -> None:
    """Tensors rebuilt from the same bytes (what equal digests mean) agree exactly."""
    b = {name: np.frombuffer(t.tobytes(), dtype=t.dtype).reshape(t.shape) for name, t in a.items()}
    verdict = compare_tensors(a, b)
    assert verdict == Comparison(True, verdict.reason, 0.0, None)


@FAST
@given(gradients())
def test_scaled_by_one_percent_disagrees(g: Tensors) -> None:
    """A result scaled by 1.01, a classic cheap cheat, is caught."""
    scaled = {name: (t * 1.01).astype(t.dtype) for name, t in g.items()}
    verdict = compare_tensors(g, scaled)
    assert not verdict.agree
    assert verdict.rel_l2 > REL_L2_TOLERANCE


@FAST
@given(gradients(), st.integers(0, 2**32 - 1))
def test_tiny_gaussian_noise_agrees(g: Tensors, seed: int) -> None:
    """Noise of 1e-7 relative, the size of cross-CPU rounding differences, is tolerated."""
    verdict = compare_tensors(g, with_noise(g, 1e-7, seed))
    assert verdict.agree, verdict.reason
    assert verdict.rel_l2 < REL_L2_TOLERANCE


@FAST
@given(gradients(), st.integers(0, 2**32 - 1))
def test_noise_of_one_in_a_thousand_disagrees(g: Tensors, seed: int) -> None:
    """Noise of 1e-3 relative is far beyond rounding and is rejected."""
    verdict = compare_tensors(g, with_noise(g, 1e-3, seed))
    assert not verdict.agree
    assert verdict.worst_tensor in g


@FAST
@given(gradients())
def test_sign_flip_of_largest_element_disagrees(g: Tensors) -> None:
    """Flipping the sign of the single largest element is caught by the per-tensor bound."""
    flipped = copy_of(g)
    name = max(g, key=lambda n: float(np.max(np.abs(g[n]))) if g[n].size else -1.0)
    flat = flipped[name].reshape(-1)
    flat[int(np.argmax(np.abs(flat)))] *= -1
    verdict = compare_tensors(g, flipped)
    assert not verdict.agree
    assert verdict.worst_tensor == name
    assert name in verdict.reason


@FAST
@given(gradients())
def test_zeros_against_a_real_gradient_disagree(g: Tensors) -> None:
    """An all-zero result (work not done) never passes for a real gradient."""
    zeros = {name: np.zeros_like(t) for name, t in g.items()}
    verdict = compare_tensors(zeros, g)
    assert not verdict.agree
    assert verdict.rel_l2 == pytest.approx(1.0)


@FAST
@given(
    tensor_sets(np.float32) | tensor_sets(np.float64),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.data(),
)
def test_non_finite_values_never_agree(a: Tensors, bad: float, data: st.DataObject) -> None:
    """A NaN or infinity anywhere makes a result disagree, even with a bitwise copy."""
    b = copy_of(a)
    name = data.draw(st.sampled_from(sorted(b)))
    b[name].reshape(-1)[data.draw(st.integers(0, b[name].size - 1))] = bad
    for left, right in ((a, b), (b, a), (b, copy_of(b))):
        verdict = compare_tensors(left, right)
        assert not verdict.agree
        assert verdict.worst_tensor == name
        assert repr(name) in verdict.reason
        assert not tensors_agree(left, right)


@FAST
@given(tensor_sets(np.float32), st.data())
def test_structural_mismatch_names_the_tensor(a: Tensors, data: st.DataObject) -> None:
    """A renamed, reshaped or retyped tensor disagrees with a reason naming it."""
    name = data.draw(st.sampled_from(sorted(a)))
    b = copy_of(a)
    kind = data.draw(st.sampled_from(["name", "shape", "dtype"]))
    if kind == "name":
        renamed = name + "~"
        b[renamed] = b.pop(name)
        expected = min(name, renamed)
        words = "missing"
    elif kind == "shape":
        b[name] = np.concatenate([b[name].reshape(-1), np.zeros(1, dtype=np.float32)])
        expected, words = name, "shape"
    else:
        b[name] = b[name].astype(np.float64)
        expected, words = name, "dtype"
    for left, right in ((a, b), (b, a)):
        verdict = compare_tensors(left, right)
        assert not verdict.agree
        assert verdict.worst_tensor == expected
        assert repr(expected) in verdict.reason
        assert words in verdict.reason


def test_all_zero_against_all_zero_agrees() -> None:
    """Two all-zero results agree: a dead layer is not a disagreement."""
    zeros = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    assert tensors_agree(zeros, copy_of(zeros))


def test_per_tensor_bound_catches_one_changed_element() -> None:
    """One element off by twice the per-tensor bound disagrees although the L2 distance is tiny."""
    a = {"w": np.ones(10_000, np.float64)}
    bound = MAX_ABS_TOLERANCE * 1.0
    inside = copy_of(a)
    inside["w"][17] += 0.5 * bound
    outside = copy_of(a)
    outside["w"][17] += 2.0 * bound
    assert tensors_agree(a, inside)
    verdict = compare_tensors(a, outside)
    assert not verdict.agree
    assert verdict.rel_l2 < REL_L2_TOLERANCE
    assert "'w'" in verdict.reason


def test_relative_l2_bound_catches_small_changes_everywhere() -> None:
    """Elements each nudged by half the per-tensor bound agree while the total drift stays
    under the L2 tolerance, and disagree once it is twice that tolerance."""
    nudge = 0.5 * MAX_ABS_TOLERANCE  # the peak of 1.0 makes the per-tensor bound 1e-4

    def nudged(count: int) -> tuple[Tensors, Tensors]:
        a = {"w": np.zeros(count + 1)}
        a["w"][0] = 1.0
        b = {"w": a["w"].copy()}
        b["w"][1:] += nudge
        return a, b

    # The L2 drift is nudge * sqrt(count) / ~1: 0.5x the tolerance for 1, 2x for 16.
    assert tensors_agree(*nudged(1))
    verdict = compare_tensors(*nudged(16))
    assert not verdict.agree
    assert verdict.rel_l2 == pytest.approx(2 * REL_L2_TOLERANCE, rel=1e-3)
    assert "relative L2" in verdict.reason


def test_floor_shields_tiny_tensors() -> None:
    """A tensor far smaller than the rest is judged against a floor set by the whole gradient."""
    a = {"big": np.ones(4), "tiny": np.full(4, 1e-8)}
    floor_bound = MAX_ABS_TOLERANCE * FLOOR_FRACTION * 1.0
    within = {"big": a["big"].copy(), "tiny": a["tiny"] + 0.5 * floor_bound}
    beyond = {"big": a["big"].copy(), "tiny": a["tiny"] + 2.0 * floor_bound}
    # 0.5 * floor_bound is 500% of the tiny tensor's own size, yet agrees.
    assert tensors_agree(a, within)
    verdict = compare_tensors(a, beyond)
    assert not verdict.agree
    assert verdict.worst_tensor == "tiny"


def test_huge_values_do_not_overflow() -> None:
    """Values near the float64 limit are compared without overflowing to infinity."""
    a = {"w": np.array([1e300, -1e300, 3e299])}
    assert tensors_agree(a, copy_of(a))
    verdict = compare_tensors(a, {"w": a["w"] * 1.01})
    assert not verdict.agree
    assert math.isfinite(verdict.rel_l2)


def test_integer_and_bool_tensors_are_compared_as_numbers() -> None:
    """Integer and boolean tensors compare numerically, in float64."""
    counts = {"n": np.array([1_000_000, 2_000_000], np.int64)}
    assert tensors_agree(counts, {"n": counts["n"] + np.array([1, 0])})
    assert not tensors_agree(counts, {"n": counts["n"] * 2})
    mask = {"m": np.array([True, False, True])}
    assert tensors_agree(mask, copy_of(mask))
    assert not tensors_agree(mask, {"m": ~mask["m"]})


def test_unsupported_dtype_disagrees_and_non_arrays_are_rejected() -> None:
    """Complex tensors disagree with a reason; a value that is not an array is a caller error."""
    z = {"z": np.array([1 + 2j])}
    verdict = compare_tensors(z, copy_of(z))
    assert not verdict.agree
    assert "'z'" in verdict.reason
    assert "not supported" in verdict.reason
    with pytest.raises(TypeError, match=r"'w'.*numpy array"):
        compare_tensors({"w": [1.0]}, {"w": np.array([1.0])})  # type: ignore[dict-item]


def test_missing_tensor_reason_says_which_side() -> None:
    """A tensor present on only one side is named, and so is the side it is missing from."""
    a = {"w": np.ones(2), "b": np.ones(1)}
    b = {"w": np.ones(2)}
    verdict = compare_tensors(a, b)
    assert not verdict.agree
    assert verdict.worst_tensor == "b"
    assert "missing from the second" in verdict.reason
    assert "missing from the first" in compare_tensors(b, a).reason
