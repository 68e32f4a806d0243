"""Worker choice by capacity: distinct, deterministic, load-spreading, capacity-weighted."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.assignment import Candidate, choose_workers, in_job_sample, sample_fraction

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


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_a_drawn_worker_stays_drawn_when_the_sample_widens(
    job: str, worker: str, a: float, b: float
) -> None:
    low, high = sorted((a, b))
    if in_job_sample(job, worker, low):
        assert in_job_sample(job, worker, high)
    assert in_job_sample(job, worker, 1.0)


def test_a_sample_draws_about_its_share_of_the_workers() -> None:
    workers = [f"worker-{i}" for i in range(4000)]
    for fraction in (0.01, 0.1, 0.5):
        drawn = sum(in_job_sample("job-1", w, fraction) for w in workers)
        expected = fraction * len(workers)
        assert abs(drawn - expected) < 4 * (expected * (1 - fraction)) ** 0.5 + 1
    other_job = {w for w in workers if in_job_sample("job-2", w, 0.1)}
    this_job = {w for w in workers if in_job_sample("job-1", w, 0.1)}
    assert len(other_job & this_job) < len(this_job) / 2  # each job draws its own workers


def test_sample_fraction_seats_the_workers_a_job_needs() -> None:
    assert sample_fraction(48, 10) == 1.0
    assert sample_fraction(48, 48) == 1.0
    assert sample_fraction(48, 9600) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="seats"):
        sample_fraction(0, 10)
    with pytest.raises(ValueError, match="fraction"):
        in_job_sample("job", "worker", 1.5)
