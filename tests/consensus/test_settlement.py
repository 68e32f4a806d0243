"""Settlement figures, conservation to the wei, and the OpenZeppelin-compatible payout tree.

Leaves, pair hashes and proof checks are recomputed here with eth_abi and
eth_utils, independently of consensus.abi and consensus.settlement.
"""

from __future__ import annotations

import time

import pytest
from eth_abi import encode
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.settlement import MerkleTree, leaf_hash, settle, verify

FAST = settings(deadline=None, max_examples=80)

addresses = st.binary(min_size=20, max_size=20).map(lambda raw: "0x" + raw.hex())


def oz_leaf(account: str, amount: int) -> bytes:
    return keccak(keccak(encode(["address", "uint256"], [account, amount])))


def oz_pair(a: bytes, b: bytes) -> bytes:
    return keccak(min(a, b) + max(a, b))


def oz_process_proof(proof: list[bytes], leaf: bytes) -> bytes:
    node = leaf
    for sibling in proof:
        node = oz_pair(node, sibling)
    return node


@st.composite
def jobs(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, str | None], int, int]:
    """Credits, partners (some shared, some workers, some none), price and a sufficient deposit."""
    workers = draw(st.lists(addresses, min_size=0, max_size=12, unique=True))
    credits = {w: draw(st.integers(0, 50)) for w in workers}
    outsiders = draw(st.lists(addresses, min_size=1, max_size=3))
    outsiders.append("0x" + "00" * 20)
    partner_pool = outsiders + workers
    partners: dict[str, str | None] = {
        w: draw(st.one_of(st.none(), st.sampled_from(partner_pool))) for w in workers
    }
    price = draw(st.integers(1, 10**20))
    cost = sum(credits.values()) * price
    deposit = cost + cost // 10 + draw(st.integers(0, 10**21))
    return credits, partners, price, deposit


@FAST
@given(jobs())
def test_settlement_conserves_the_deposit_to_the_wei(
    job: tuple[dict[str, int], dict[str, str | None], int, int],
) -> None:
    credits, partners, price, deposit = job
    s = settle(credits, price, partners, deposit)
    assert s.accepted_results == sum(credits.values())
    assert s.cost == s.accepted_results * price
    assert s.margin == s.cost * 10 // 100 and s.master_fee == s.cost * 5 // 100
    assert s.partner_total <= s.cost * 3 // 100
    assert s.protocol_fee == s.margin - s.master_fee - s.partner_total >= 0
    assert sum(s.leaves.values()) == s.cost + s.partner_total == s.payout_total
    assert sum(s.leaves.values()) + s.master_fee + s.protocol_fee + s.refund == s.deposit
    assert s.total_paid == deposit
    for worker, count in credits.items():
        canonical = to_checksum_address(worker)
        assert s.worker_payouts.get(canonical, 0) == count * price
        partner = partners[worker]
        if count and partner is not None and int(partner, 16) != 0:
            share = s.partner_payouts.get(to_checksum_address(partner), 0)
            assert share >= count * price * 3 // 100
    # The zero address stands for "no partner": its fee stays with the protocol.
    assert to_checksum_address("0x" + "00" * 20) not in s.partner_payouts
    assert set(s.leaves) == set(s.worker_payouts) | set(s.partner_payouts)
    assert all(amount > 0 for amount in s.leaves.values())


@FAST
@given(jobs())
def test_every_leaf_proves_and_tampering_does_not(
    job: tuple[dict[str, int], dict[str, str | None], int, int],
) -> None:
    credits, partners, price, deposit = job
    s = settle(credits, price, partners, deposit)
    stranger = "0x" + "ee" * 20
    for account, amount in s.leaves.items():
        proof = s.proof(account.lower())
        assert s.amount_of(account.lower()) == amount
        assert oz_process_proof(proof, oz_leaf(account, amount)) == s.root
        assert verify(proof, s.root, leaf_hash(account, amount))
        assert not verify(proof, s.root, oz_leaf(account, amount + 1))
        if account != to_checksum_address(stranger):
            assert not verify(proof, s.root, oz_leaf(stranger, amount))
        if proof:
            bent = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
            assert not verify(bent, s.root, oz_leaf(account, amount))
    if not s.leaves:
        assert s.root == b"\x00" * 32


def test_a_small_tree_matches_a_root_built_by_hand() -> None:
    leaves = [oz_leaf(f"0x{i:040x}", 1000 * i) for i in range(1, 6)]
    a, b, c, d, e = sorted(leaves)
    # Five leaves: (ab)(cd) e -> ((ab)(cd)) e -> root; e is carried up twice.
    root = oz_pair(oz_pair(oz_pair(a, b), oz_pair(c, d)), e)
    tree = MerkleTree(leaves)
    assert tree.root == root
    assert tree.proof(e) == [oz_pair(oz_pair(a, b), oz_pair(c, d))]
    assert tree.proof(c) == [d, oz_pair(a, b), e]
    assert MerkleTree([a]).root == a and MerkleTree([a]).proof(a) == []
    assert MerkleTree([]).root == b"\x00" * 32


def test_a_settlement_tree_matches_the_hand_built_one() -> None:
    w1, w2, p = (f"0x{i:040x}" for i in (0xA1, 0xB2, 0xC3))
    s = settle({w1: 3, w2: 1}, 100, {w1: p, w2: None}, 10_000)
    assert dict(s.leaves) == {
        to_checksum_address(w1): 300,
        to_checksum_address(w2): 100,
        to_checksum_address(p): 9,
    }
    x, y, z = sorted([oz_leaf(w1, 300), oz_leaf(w2, 100), oz_leaf(p, 9)])
    assert s.root == oz_pair(oz_pair(x, y), z)
    assert (s.cost, s.margin, s.master_fee, s.partner_total) == (400, 40, 20, 9)
    assert (s.protocol_fee, s.refund) == (11, 10_000 - 440)


def test_a_partner_that_also_works_has_one_leaf() -> None:
    w1, w2 = "0x" + "01" * 20, "0x" + "02" * 20
    s = settle({w1: 10, w2: 0}, 1000, {w1: w2, w2: w1}, 20_000)
    assert dict(s.leaves) == {to_checksum_address(w1): 10_000, to_checksum_address(w2): 300}
    assert to_checksum_address(w2) not in s.worker_payouts  # no results, no worker leaf


def test_partner_fees_round_down_per_worker_and_zero_address_means_none() -> None:
    w1, w2, p = "0x" + "01" * 20, "0x" + "02" * 20, "0x" + "03" * 20
    s = settle({w1: 1, w2: 1}, 50, {w1: p, w2: p}, 110)
    assert s.partner_total == 2 * (50 * 3 // 100) == 2  # not (100 * 3 // 100) == 3
    s = settle({w1: 1}, 100, {w1: "0x" + "00" * 20}, 110)
    assert s.partner_total == 0 and s.protocol_fee == 5 and len(s.leaves) == 1


def test_settle_refuses_bad_input() -> None:
    w = "0x" + "ab" * 20
    with pytest.raises(ValueError, match="cost 1000 plus margin 100 exceeds the deposit 1099"):
        settle({w: 10}, 100, {w: None}, 1099)
    with pytest.raises(ValueError, match="-1 accepted results"):
        settle({w: -1}, 100, {w: None}, 1000)
    with pytest.raises(ValueError, match="11 accepted results exceed the job's maximum of 10"):
        settle({w: 11}, 1, {w: None}, 1000, max_results=10)
    with pytest.raises(ValueError, match="appears more than once"):
        settle({w: 1, w.upper().replace("0X", "0x"): 1}, 1, {w: None}, 1000)
    with pytest.raises(ValueError, match="no entry for credited worker"):
        settle({w: 1}, 1, {}, 1000)
    with pytest.raises(ValueError, match="price must be a positive"):
        settle({w: 1}, 0, {w: None}, 1000)
    with pytest.raises(KeyError, match="nothing to claim"):
        settle({w: 1}, 1, {w: None}, 1000).proof("0x" + "02" * 20)
    assert settle({w: 10}, 100, {w: None}, 1100, max_results=10).refund == 0


def test_a_hundred_thousand_leaves_build_quickly() -> None:
    leaves = [keccak(i.to_bytes(32, "big")) for i in range(100_000)]
    started = time.perf_counter()
    tree = MerkleTree(leaves)
    elapsed = time.perf_counter() - started
    for leaf in leaves[::9973]:
        assert oz_process_proof(tree.proof(leaf), leaf) == tree.root
        assert len(tree.proof(leaf)) <= 17
    assert elapsed < 5.0
