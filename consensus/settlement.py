"""Job settlement: fees, refund and the merkle tree of payouts, as the escrow computes them.

From the master's final credits (accepted results per worker), the price, each
worker's website partner and the deposit, `settle` gives every figure the
escrow's `settle` call needs and the tree that workers and partners claim
against (docs/economics.md, "JobEscrow" and "Payouts off-chain"). Any worker
can rebuild it from the signed credits and check the root settled on-chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from consensus.abi import (
    UINT256_MAX,
    ZERO_ADDRESS,
    address_bytes,
    checksum_address,
    keccak256,
    uint_word,
)

MARGIN_PERCENT = 10
MASTER_FEE_PERCENT = 5
PARTNER_FEE_PERCENT = 3
EMPTY_ROOT = b"\x00" * 32

_V = TypeVar("_V")


def leaf_hash(account: str, amount: int) -> bytes:
    """OpenZeppelin's standard leaf for a claim of `amount` by `account`.

    `keccak256(bytes.concat(keccak256(abi.encode(account, amount))))`: hashing
    twice keeps a leaf from ever being mistaken for an inner node.
    """
    return _leaf(address_bytes(account), amount)


def _leaf(account: bytes, amount: int) -> bytes:
    return keccak256(keccak256(b"\x00" * 12 + account + uint_word(amount)))


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak256(a + b if a < b else b + a)


def process_proof(proof: Sequence[bytes], leaf: bytes) -> bytes:
    """The root a proof leads to from a leaf, as OpenZeppelin's `MerkleProof.processProof`."""
    node = leaf
    for sibling in proof:
        node = _hash_pair(node, sibling)
    return node


def verify(proof: Sequence[bytes], root: bytes, leaf: bytes) -> bool:
    """Whether `proof` proves `leaf` is in the tree with `root` (OpenZeppelin's `verify`)."""
    return process_proof(proof, leaf) == root


class MerkleTree:
    """A merkle tree over leaf hashes, verifiable with OpenZeppelin's `MerkleProof`.

    Leaves are sorted ascending, each pair is hashed smaller-first, and a node
    left without a partner at the end of a level is carried up unchanged. A
    single leaf is its own root; the tree of no leaves has the zero root, which
    no proof reaches.
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        ordered = sorted(leaves)
        for leaf in ordered:
            if len(leaf) != 32:
                raise ValueError(f"a merkle leaf must be 32 bytes, got {len(leaf)}")
        self._index = {leaf: i for i, leaf in enumerate(ordered)}
        if len(self._index) != len(ordered):
            raise ValueError("merkle leaves must be distinct")
        self._levels: list[list[bytes]] = [ordered]
        level = ordered
        while len(level) > 1:
            parents = [_hash_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                parents.append(level[-1])
            self._levels.append(parents)
            level = parents

    @property
    def root(self) -> bytes:
        """The root to settle on-chain (zero for an empty tree)."""
        top = self._levels[-1]
        return top[0] if top else EMPTY_ROOT

    def __len__(self) -> int:
        return len(self._levels[0])

    def __contains__(self, leaf: object) -> bool:
        return leaf in self._index

    def proof(self, leaf: bytes) -> list[bytes]:
        """The sibling hashes from `leaf` up to the root; empty for a single-leaf tree."""
        index = self._index.get(leaf)
        if index is None:
            raise KeyError(f"leaf 0x{leaf.hex()} is not in the tree")
        siblings: list[bytes] = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                siblings.append(level[sibling])
            index //= 2
        return siblings


@dataclass(frozen=True)
class Settlement:
    """Every figure of a job's settlement and the payout tree behind its root.

    Addresses (the keys of the payout mappings) are EIP-55 checksummed.
    `leaves` holds what each account can claim: its worker earnings plus its
    partner fees, one entry per address. Conservation holds to the wei:
    `sum(leaves) == cost + partner_total` and
    `sum(leaves) + master_fee + protocol_fee + refund == deposit`.
    """

    price: int
    accepted_results: int
    cost: int
    margin: int
    master_fee: int
    partner_total: int
    protocol_fee: int
    refund: int
    deposit: int
    worker_payouts: Mapping[str, int]
    partner_payouts: Mapping[str, int]
    leaves: Mapping[str, int]
    tree: MerkleTree = field(repr=False, compare=False)

    @property
    def root(self) -> bytes:
        """The merkle root to pass to the escrow's `settle`."""
        return self.tree.root

    @property
    def payout_total(self) -> int:
        """What all claims together pay out: `cost + partner_total`."""
        return self.cost + self.partner_total

    @property
    def total_paid(self) -> int:
        """Claims, fees and refund together; always equal to the deposit."""
        return self.payout_total + self.master_fee + self.protocol_fee + self.refund

    def amount_of(self, account: str) -> int:
        """What `account` may claim (0 when it has no leaf)."""
        return self.leaves.get(checksum_address(account), 0)

    def proof(self, account: str) -> list[bytes]:
        """The proof for `account`'s claim of `amount_of(account)`."""
        canonical = checksum_address(account)
        if canonical not in self.leaves:
            raise KeyError(f"{account} has nothing to claim in this settlement")
        return self.tree.proof(leaf_hash(canonical, self.leaves[canonical]))


class _Canonical:
    """EIP-55 forms of addresses, each computed once: one hash per address, not per use."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}

    def __call__(self, address: str) -> str:
        canonical = self._known.get(address)
        if canonical is None:
            canonical = checksum_address(address)
            self._known[address] = canonical
            self._known[canonical] = canonical
        return canonical


def _canonical_keys(mapping: Mapping[str, _V], what: str, canonical: _Canonical) -> dict[str, _V]:
    result: dict[str, _V] = {}
    for address, value in mapping.items():
        key = canonical(address)
        if key in result:
            raise ValueError(f"{what}: {address} appears more than once")
        result[key] = value
    return result


def settle(
    credits: Mapping[str, int],
    price: int,
    partners: Mapping[str, str | None],
    deposit: int,
    max_results: int | None = None,
) -> Settlement:
    """Settle a job: who is paid what, the fees, the refund and the merkle root.

    `credits` maps each worker address to its accepted results, `partners`
    each credited worker to its website partner (None or the zero address: no
    partner, the fee stays with the protocol), `max_results` is the job's
    `maxCalculations * redundancy` when it should be enforced here too.
    """
    if isinstance(price, bool) or not isinstance(price, int) or price < 1:
        raise ValueError(f"price must be a positive integer, got {price!r}")
    if isinstance(deposit, bool) or not isinstance(deposit, int) or not 0 <= deposit <= UINT256_MAX:
        raise ValueError(f"deposit must be a uint256, got {deposit!r}")
    canonical = _Canonical()
    accepted = _canonical_keys(credits, "credits", canonical)
    for worker, count in accepted.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"credits: worker {worker} has {count!r} accepted results")
    partner_of = {
        worker: None if partner is None else canonical(partner)
        for worker, partner in _canonical_keys(partners, "partners", canonical).items()
    }

    accepted_results = sum(accepted.values())
    if max_results is not None and accepted_results > max_results:
        raise ValueError(
            f"{accepted_results} accepted results exceed the job's maximum of {max_results}"
        )
    cost = accepted_results * price
    margin = cost * MARGIN_PERCENT // 100
    if cost + margin > deposit:
        raise ValueError(f"cost {cost} plus margin {margin} exceeds the deposit {deposit}")

    worker_payouts: dict[str, int] = {}
    partner_payouts: dict[str, int] = {}
    for worker in sorted(accepted):
        if accepted[worker] == 0:
            continue
        if worker not in partner_of:
            raise ValueError(f"partners: no entry for credited worker {worker} (use None)")
        earned = accepted[worker] * price
        worker_payouts[worker] = earned
        partner = partner_of[worker]
        if partner is not None and partner != ZERO_ADDRESS:
            fee = earned * PARTNER_FEE_PERCENT // 100
            if fee:
                partner_payouts[partner] = partner_payouts.get(partner, 0) + fee

    leaves = dict(worker_payouts)
    for partner, fee in partner_payouts.items():
        leaves[partner] = leaves.get(partner, 0) + fee
    partner_total = sum(partner_payouts.values())
    master_fee = cost * MASTER_FEE_PERCENT // 100
    return Settlement(
        price=price,
        accepted_results=accepted_results,
        cost=cost,
        margin=margin,
        master_fee=master_fee,
        partner_total=partner_total,
        protocol_fee=margin - master_fee - partner_total,
        refund=deposit - cost - margin,
        deposit=deposit,
        worker_payouts=worker_payouts,
        partner_payouts=partner_payouts,
        leaves=leaves,
        tree=MerkleTree(
            [_leaf(bytes.fromhex(account[2:]), amount) for account, amount in leaves.items()]
        ),
    )
