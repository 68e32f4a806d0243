"""Worker choice by capacity: distinct, deterministic, load-spreading, capacity-weighted."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.assignment import Candidate, choose_workers

candidates_strategy = st.dictionaries(
    st.text(alphabet="abcdefgh", min_size=1, max_size=6),
    st.builds(Candidate, share=st.integers(1, 100), outstanding=st.integers(0, 20)),
    max_size=30,
)


@given(candidates_strategy, st.integers(0, 40), st.binary(max_size=16))
def test_choice_is_distinct_eligible_and_bounded(
    candidates: dict[str, Candidate], count: int, salt: bytes
) -> None:
    excluded = set(list(candidates)[:2])
    chosen = choose_workers(candidates, count, salt, exclude=excluded)
    assert len(chosen) == len(set(chosen)) == min(count, len(candidates) - len(excluded))
    assert not set(chosen) & excluded
    assert set(chosen) <= set(candidates)


@given(candidates_strategy, st.integers(0, 10), st.binary(max_size=16))
def test_choice_is_deterministic_and_independent_of_insertion_order(
    candidates: dict[str, Candidate], count: int, salt: bytes
) -> None:
    reordered = dict(reversed(list(candidates.items())))
    assert choose_workers(candidates, count, salt) == choose_workers(reordered, count, salt)


@given(candidates_strategy, st.integers(1, 10), st.binary(max_size=16))
def test_a_less_loaded_worker_is_never_passed_over(
    candidates: dict[str, Candidate], count: int, salt: bytes
) -> None:
    chosen = choose_workers(candidates, count, salt)
    load = {w: (c.outstanding + 1) / c.share for w, c in candidates.items()}
    if chosen:
        worst_chosen = max(load[w] for w in chosen)
        assert all(load[w] >= worst_chosen for w in candidates if w not in chosen)


def test_work_spreads_in_proportion_to_capacity() -> None:
    """Assigning one calculation at a time, a 20% node takes twice the work of a 10% node."""
    candidates = {"big": Candidate(20), "small-a": Candidate(10), "small-b": Candidate(10)}
    taken: Counter[str] = Counter()
    for calc in range(400):
        (worker,) = choose_workers(candidates, 1, f"calc{calc}".encode())
        taken[worker] += 1
        candidates[worker] = Candidate(candidates[worker].share, candidates[worker].outstanding + 1)
    assert taken["big"] == 200 and taken["small-a"] == taken["small-b"] == 100


def test_ties_are_spread_by_the_salt() -> None:
    candidates = {f"w{i}": Candidate(10) for i in range(6)}
    firsts = {choose_workers(candidates, 1, f"calc{i}".encode())[0] for i in range(60)}
    assert len(firsts) == 6


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="share"):
        Candidate(0)
    with pytest.raises(ValueError, match="outstanding"):
        Candidate(5, -1)
    with pytest.raises(ValueError, match="count"):
        choose_workers({}, -1, b"")
