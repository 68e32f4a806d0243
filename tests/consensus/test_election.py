"""Committee draw, eligibility, master ranking, epochs and takeover timing.

Hashes are recomputed here with eth_abi and eth_utils, independently of
consensus.abi, so an encoding mistake in either would show.
"""

from __future__ import annotations

from collections import Counter

import pytest
from eth_abi import encode
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.election import (
    draw_committee,
    election_seed,
    eligible,
    epoch_of,
    rank_masters,
    ranks_allowed_to_take_over,
    takeover_time,
)

FAST = settings(deadline=None, max_examples=80)

addresses = st.binary(min_size=20, max_size=20).map(lambda raw: "0x" + raw.hex())
seeds = st.binary(min_size=32, max_size=32)


@st.composite
def tables(draw: st.DrawFn, max_size: int = 12) -> tuple[list[str], list[int]]:
    """Distinct candidates, some checksummed and some lowercase, with positive weights."""
    raw = draw(st.lists(addresses, max_size=max_size, unique=True))
    forms = draw(st.lists(st.booleans(), min_size=len(raw), max_size=len(raw)))
    candidates = [to_checksum_address(a) if up else a for a, up in zip(raw, forms, strict=True)]
    weights = draw(st.lists(st.integers(1, 10**24), min_size=len(raw), max_size=len(raw)))
    return candidates, weights


def reference_draw(candidates: list[str], weights: list[int], seed: bytes, k: int) -> list[str]:
    """The document's step 3, spelled out with list removal instead of swap-with-last."""
    table = list(zip(candidates, weights, strict=True))
    committee = []
    for i in range(min(k, len(table))):
        total = sum(w for _, w in table)
        r = int.from_bytes(keccak(encode(["bytes32", "uint256"], [seed, i])), "big") % total
        acc = j = 0
        while r >= acc + table[j][1]:
            acc += table[j][1]
            j += 1
        committee.append(table[j][0])
        table[j] = table[-1]
        table.pop()
    return committee


@FAST
@given(tables(), seeds, st.integers(1, 15))
def test_draw_is_a_distinct_subset_of_size_min_k_n(
    table: tuple[list[str], list[int]], seed: bytes, k: int
) -> None:
    candidates, weights = table
    committee = draw_committee(candidates, weights, seed, k)
    assert len(committee) == len(set(committee)) == min(k, len(candidates))
    assert set(committee) <= set(candidates)  # the same string forms as given


@FAST
@given(tables(), seeds, st.integers(1, 15))
def test_draw_matches_the_documented_algorithm(
    table: tuple[list[str], list[int]], seed: bytes, k: int
) -> None:
    candidates, weights = table
    committee = draw_committee(candidates, weights, seed, k)
    assert committee == reference_draw(candidates, weights, seed, k)
    assert committee == draw_committee(candidates, weights, seed, k)


@FAST
@given(tables(max_size=8), seeds)
def test_a_full_draw_is_a_permutation_and_prefixes_agree(
    table: tuple[list[str], list[int]], seed: bytes
) -> None:
    candidates, weights = table
    full = draw_committee(candidates, weights, seed, len(candidates) + 1)
    assert sorted(full) == sorted(candidates)
    for k in range(1, len(candidates) + 1):
        assert draw_committee(candidates, weights, seed, k) == full[:k]


def test_heavier_stakes_are_chosen_proportionally_more_often() -> None:
    candidates = [f"0x{i:040x}" for i in range(1, 5)]
    weights = [1, 2, 3, 4]
    firsts: Counter[str] = Counter()
    members: Counter[str] = Counter()
    draws = 3000
    for n in range(draws):
        seed = keccak(b"stat" + n.to_bytes(4, "big"))
        firsts[draw_committee(candidates, weights, seed, 1)[0]] += 1
        members.update(draw_committee(candidates, weights, seed, 2))
    for candidate, weight in zip(candidates, weights, strict=True):
        expected = draws * weight / sum(weights)
        assert abs(firsts[candidate] - expected) < 0.1 * expected + 30
    counts = [members[c] for c in candidates]
    assert counts == sorted(counts) and counts[0] < counts[-1] * 0.6


def test_draw_refuses_bad_input() -> None:
    a, b = "0x" + "11" * 20, "0x" + "22" * 20
    seed = b"\x01" * 32
    with pytest.raises(ValueError, match="lengths must match"):
        draw_committee([a, b], [1], seed, 1)
    with pytest.raises(ValueError, match=f"candidate {b} has weight 0"):
        draw_committee([a, b], [5, 0], seed, 1)
    with pytest.raises(ValueError, match="appears more than once"):
        draw_committee([a, to_checksum_address(a)], [1, 1], seed, 1)
    with pytest.raises(ValueError, match="seed must be 32 bytes"):
        draw_committee([a], [1], b"short", 1)
    with pytest.raises(ValueError, match="k must be a positive"):
        draw_committee([a], [1], seed, 0)
    with pytest.raises(ValueError, match="not a 0x-prefixed"):
        draw_committee(["0x1234"], [1], seed, 1)
    with pytest.raises(ValueError, match="checksum"):
        draw_committee(["0x" + "aA" * 20], [1], seed, 1)
    with pytest.raises(ValueError, match="uint256"):
        draw_committee([a, b], [2**255, 2**255], seed, 1)
    assert draw_committee([], [], seed, 3) == []


def test_eligible_keeps_storage_order_and_filters_by_minimum() -> None:
    cands = [f"0x{i:040x}" for i in (5, 3, 9, 1)]
    stakes = {cands[0]: 100, cands[1]: 99, to_checksum_address(cands[2]): 250, cands[3]: 100}
    assert eligible(cands, stakes, 100) == ([cands[0], cands[2], cands[3]], [100, 250, 100])
    assert eligible(cands, stakes, 1000) == ([], [])
    with pytest.raises(ValueError, match=f"no stake given for candidate {cands[3]}"):
        eligible(cands, {c: 1 for c in cands[:3]}, 1)
    with pytest.raises(ValueError, match="minimum stake must be a positive"):
        eligible(cands, stakes, 0)
    with pytest.raises(ValueError, match="negative stake"):
        eligible(cands, {**stakes, cands[0]: -1}, 1)


@FAST
@given(st.lists(addresses, max_size=10, unique=True), seeds)
def test_masters_are_ranked_by_the_hash_of_job_and_member(
    committee: list[str], job_id: bytes
) -> None:
    ranked = rank_masters(job_id, committee)
    assert sorted(ranked) == sorted(committee)
    keys = [keccak(encode(["bytes32", "address"], [job_id, m])) for m in ranked]
    assert keys == sorted(keys)
    assert rank_masters(job_id, list(reversed(committee))) == ranked


def test_rank_masters_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="job id must be 32 bytes"):
        rank_masters(b"\x00" * 31, [])
    with pytest.raises(ValueError, match="appears more than once"):
        rank_masters(b"\x00" * 32, ["0x" + "ab" * 20, "0x" + "AB" * 20])


@given(seeds, st.integers(0, 2**256 - 1), addresses)
def test_election_seed_is_the_hash_of_the_encoded_triple(
    block_hash: bytes, epoch: int, registry: str
) -> None:
    expected = keccak(encode(["bytes32", "uint256", "address"], [block_hash, epoch, registry]))
    assert election_seed(block_hash, epoch, registry) == expected
    assert election_seed(block_hash, epoch, to_checksum_address(registry)) == expected


def test_epochs_count_whole_lengths_from_genesis() -> None:
    assert [epoch_of(t, 1000, 60) for t in (1000, 1059, 1060, 1119, 1120)] == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="before the registry's genesis"):
        epoch_of(999, 1000, 60)
    with pytest.raises(ValueError, match="epoch length must be positive"):
        epoch_of(1000, 1000, 0)


def test_takeover_waits_one_timeout_per_rank_skipped() -> None:
    assert takeover_time(0, 1, 500, 30) == 530
    assert takeover_time(1, 3, 500, 30) == 560
    with pytest.raises(ValueError, match="rank 1 cannot take over from rank 1"):
        takeover_time(1, 1, 500, 30)
    allowed = [list(ranks_allowed_to_take_over(4, 1, 500, now, 30)) for now in (529, 530, 560, 999)]
    assert allowed == [[], [2], [2, 3], [2, 3]]
    for now in range(480, 700, 7):
        for rank in range(2, 4):
            may = rank in ranks_allowed_to_take_over(4, 1, 500, now, 30)
            assert may == (now >= takeover_time(1, rank, 500, 30))
    with pytest.raises(ValueError, match="outside a committee of 4"):
        ranks_allowed_to_take_over(4, 4, 500, 600, 30)
