"""The contracts and `consensus/` compute the same things: committees, rankings, digests, payouts.

Random stake tables go through the registry's pure `drawCommittee` and
`consensus.election.draw_committee`; real elections over several epochs
(stakes changing, a candidate leaving, one slashed) are recomputed from public
chain data; job rankings, EIP-712 digests and whole settlements (every fee and
every claim, to the wei) are compared the same way. Embedded chain, on a
deployment with a committee of 5 out of at most 8 candidates.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from chain.market import max_cost, sync
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from web3.contract import Contract

from consensus.abi import UINT256_MAX, checksum_address, keccak256
from consensus.eip712 import Domain, result_digest, slash_order_digest
from consensus.election import draw_committee, election_seed, eligible, rank_masters
from consensus.settlement import settle as settle_offchain
from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import ContractReverted, Deployment
from ravenp2p.chain.deploy import RAVEN, DeployParams, deploy_contracts
from ravenp2p.chain.errors import chain_errors
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.identity import NodeIdentity

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

PARAMS = DeployParams(committee_size=5, max_candidates=8)
CANDIDATES = 8
ETH = 10**20
# Distinct stakes (whole RAVEN plus odd wei) so that a wrong walk picks a different member.
STAKES = [(100 + 37 * i) * RAVEN + 1_000_003 * i for i in range(CANDIDATES)]


@dataclass
class Council:
    """A deployment whose 8 candidates hold `STAKES`, their stake in `stakes`; owner = treasury."""

    env: ChainEnv
    deployment: Deployment
    owner: Web3Chain
    nodes: list[Web3Chain]
    requester: Web3Chain
    registry: Contract
    stakes: dict[str, int]
    first_election: str = ""  # the tx that elected the first epoch, in the module's setup

    def resync(self) -> None:
        for chain in (self.owner, *self.nodes, self.requester):
            chain.resync_nonce()

    @property
    def w3(self) -> Any:
        return self.env.dev.w3


@pytest.fixture(scope="module")
def council_setup(embedded_env: ChainEnv) -> Iterator[Council]:
    env = embedded_env
    snapshot = env.snapshot()
    identities = [
        NodeIdentity.from_secret(keccak256(f"equivalence tests: account {i}".encode()))
        for i in range(CANDIDATES + 2)
    ]
    try:
        for identity in identities:
            env.dev.fund(identity.address, ETH)
        secrets = [i.private_key.secret for i in identities]
        deployment = deploy_contracts(env.dev.w3, secrets[0], PARAMS)
        owner, *nodes, requester = (Web3Chain(env.dev.w3, deployment, s) for s in secrets)
        w3 = env.dev.w3
        registry = w3.eth.contract(
            address=deployment.registry, abi=load_artifact("StakeRegistry").abi
        )
        council = Council(env, deployment, owner, nodes, requester, registry, {})
        council.stakes = sync(stake_candidates, council)
        council.first_election = sync(owner.elect)
        yield council
    finally:
        env.revert(snapshot)


@pytest.fixture
def council(council_setup: Council) -> Iterator[Council]:
    with _isolated(council_setup):
        yield council_setup


@contextmanager
def _isolated(council: Council) -> Iterator[Council]:
    """Run a block on the council and return its chain to the state it had before."""
    snapshot = council.env.dev.snapshot()
    try:
        yield council
    finally:
        council.env.dev.revert(snapshot)
        council.resync()


async def stake_candidates(council: Council) -> dict[str, int]:
    """Stake every node with its `STAKES` entry and make it a candidate, in order."""
    stakes = {}
    for node, amount in zip(council.nodes, STAKES, strict=True):
        await council.owner.mint(node.address, amount)
        await node.stake(amount)
        await node.become_candidate()
        stakes[node.address] = amount
    return stakes


def previous_block_hash(council: Council, tx_hash: str) -> bytes:
    """The hash of the block before the one that mined `tx_hash` (what `blockhash(n-1)` saw)."""
    number = council.w3.eth.get_transaction_receipt(tx_hash)["blockNumber"]
    return bytes(council.w3.eth.get_block(number - 1)["hash"])


# ------------------------------------------------------------------ the pure draw

ADDRESSES_40 = [checksum_address(f"0x{i:040x}") for i in range(1, 41)]
addresses = st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=40, unique=True)
weight_scales = st.sampled_from([10, 10**6, RAVEN * 1000, 2**200])


@st.composite
def stake_tables(draw: st.DrawFn) -> tuple[list[str], list[int], bytes, int]:
    """A random table of distinct candidates with positive weights, a seed and a k."""
    raw = draw(addresses)
    table = [checksum_address("0x" + a.hex()) for a in raw]
    scale = draw(weight_scales)
    weights = draw(st.lists(st.integers(1, scale), min_size=len(table), max_size=len(table)))
    seed = draw(st.binary(min_size=32, max_size=32))
    k = draw(st.integers(1, 45))
    return table, weights, seed, k


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=stake_tables())
@example(case=(["0x" + "11" * 20], [1], bytes(32), 1))
@example(case=(ADDRESSES_40, [UINT256_MAX // 40] * 40, b"\xff" * 32, 40))
def test_draw_committee_matches_the_registry(
    council_setup: Council, case: tuple[list[str], list[int], bytes, int]
) -> None:
    table, weights, seed, k = case
    expected = draw_committee(table, weights, seed, k)
    drawn = council_setup.registry.functions.drawCommittee(table, weights, seed, k).call()
    assert [checksum_address(a) for a in drawn] == expected
    assert len(expected) == min(k, len(table))


@pytest.mark.parametrize(
    ("table", "weights", "k", "reason"),
    [
        (2, [5], 1, "LengthMismatch(candidates=2, weights=1)"),
        (3, [5, 0, 5], 2, "ZeroWeight(index=1)"),
        (2, [5, 5], 0, "ZeroCommitteeSize()"),
        (2, [2**255, 2**255], 1, "Panic(0x11: arithmetic overflow)"),
    ],
)
def test_draw_committee_refuses_what_python_refuses(
    council_setup: Council, table: int, weights: list[int], k: int, reason: str
) -> None:
    members = ADDRESSES_40[:table]
    with pytest.raises(ValueError):
        draw_committee(members, weights, bytes(32), k)
    with (
        pytest.raises(ContractReverted) as refused,
        chain_errors(council_setup.w3, "StakeRegistry", "drawCommittee"),
    ):
        council_setup.registry.functions.drawCommittee(members, weights, bytes(32), k).call()
    assert refused.value.reason == reason


# ------------------------------------------------------------------ real elections


async def test_elections_over_several_epochs_match_the_python_draw(council: Council) -> None:
    stakes = dict(council.stakes)
    nodes, epoch_length = council.nodes, PARAMS.epoch_length
    minimum = PARAMS.min_master_stake
    observer = council.owner

    async def check_epoch(tx_hash: str) -> list[str]:
        epoch = await observer.current_epoch()
        seed = await observer.epoch_seed(epoch)
        expected_seed = election_seed(
            previous_block_hash(council, tx_hash), epoch, council.deployment.registry
        )
        assert seed == expected_seed
        for address, amount in stakes.items():
            assert (await observer.stake_of(address)).active == amount
        table, weights = eligible(await observer.candidates(), stakes, minimum)
        committee = await observer.committee(epoch)
        assert committee == draw_committee(table, weights, seed, PARAMS.committee_size)
        return committee

    first = await check_epoch(council.first_election)
    assert len(first) == PARAMS.committee_size

    # Epoch 2: node 2 unbonds below the minimum (leaves: the last candidate takes its slot),
    # node 4 is slashed to nothing (leaves the same way), node 1 adds stake.
    await nodes[2].request_unbond(stakes[nodes[2].address] - minimum + 1)
    stakes[nodes[2].address] = minimum - 1
    job = keccak256(b"equivocated")
    a, b = keccak256(b"a"), keccak256(b"b")
    await observer.slash_equivocation(
        nodes[4].address, job, 1, a, nodes[4].sign_result(job, 1, a),
        b, nodes[4].sign_result(job, 1, b),
    )
    stakes[nodes[4].address] = 0
    await council.owner.mint(nodes[1].address, 500 * RAVEN)
    await nodes[1].stake(500 * RAVEN)
    stakes[nodes[1].address] += 500 * RAVEN
    order = [n.address for n in nodes]
    order[2] = order.pop()
    order[order.index(nodes[4].address)] = order[-1]
    order.pop()
    assert await observer.candidates() == order
    council.env.advance_time(epoch_length)
    second = await check_epoch(await observer.elect())
    assert nodes[2].address not in second and nodes[4].address not in second
    assert await observer.committee(await observer.current_epoch() - 1) == first

    # Epoch 3: nobody calls elect(); the first job of the epoch does.
    council.env.advance_time(epoch_length)
    requester = council.requester
    deposit = max_cost(RAVEN, 1, 1)
    await council.owner.mint(requester.address, deposit)
    deadline = await requester.now() + 600
    tx = await requester.create_job(keccak256(b"epoch 3 job"), RAVEN, 1, 1, deadline, deposit)
    await check_epoch(tx)


async def test_ranked_masters_match_rank_masters(council: Council) -> None:
    requester = council.requester
    rng = random.Random(20240611)
    deposit = max_cost(RAVEN, 1, 1)
    await council.owner.mint(requester.address, 12 * deposit)
    firsts = set()
    for _ in range(12):
        job_id = rng.randbytes(32)
        deadline = await requester.now() + 600
        await requester.create_job(job_id, RAVEN, 1, 1, deadline, deposit)
        committee = await requester.committee((await requester.job(job_id)).epoch)
        expected = rank_masters(job_id, committee)
        assert await requester.ranked_masters(job_id) == expected
        assert await requester.master_of(job_id) == expected[0]
        firsts.add(expected[0])
    assert len(firsts) > 1, "random job ids should not all share one first master"


# ------------------------------------------------------------------ EIP-712 digests

bytes32s = st.binary(min_size=32, max_size=32)


@settings(max_examples=60, deadline=None)
@given(
    job=bytes32s,
    calculation=st.integers(0, 2**64 - 1),
    digest=bytes32s,
    offender=st.binary(min_size=20, max_size=20),
    amount=st.integers(0, UINT256_MAX),
    evidence=bytes32s,
    epoch=st.integers(0, UINT256_MAX),
)
def test_eip712_digests_match_the_registry(
    council_setup: Council,
    job: bytes,
    calculation: int,
    digest: bytes,
    offender: bytes,
    amount: int,
    evidence: bytes,
    epoch: int,
) -> None:
    registry = council_setup.registry
    domain = Domain(council_setup.deployment.chain_id, council_setup.deployment.registry)
    assert registry.functions.DOMAIN_SEPARATOR().call() == domain.separator()
    assert registry.functions.resultDigest(job, calculation, digest).call() == result_digest(
        domain, job, calculation, digest
    )
    address = checksum_address("0x" + offender.hex())
    order = (address, amount, evidence, epoch)
    assert registry.functions.slashOrderDigest(order).call() == slash_order_digest(
        domain, address, amount, evidence, epoch
    )


# ------------------------------------------------------------------ settlement

# Each example costs a second or more of chain time and shrinking would replay hundreds of
# them: a failure is reported as found.
NO_SHRINKING = (Phase.explicit, Phase.reuse, Phase.generate)


@st.composite
def settlements(draw: st.DrawFn) -> dict[str, Any]:
    """A job's terms and a master's final credits, with partners that overlap workers."""
    workers = [
        checksum_address("0x" + a.hex())
        for a in draw(st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=8,
                               unique=True))
    ]
    outside = [checksum_address(f"0x{0xbeef0000 + i:040x}") for i in range(3)]
    partners = {
        w: draw(st.sampled_from([None, *outside, *workers]).filter(lambda p, w=w: p != w))
        for w in workers
    }
    price = draw(st.one_of(st.integers(1, 200), st.integers(1, 10 * RAVEN)))
    redundancy = draw(st.integers(1, 3))
    credits = {w: draw(st.integers(0, 6)) for w in workers}
    max_calculations = draw(st.integers(1, 6)) + sum(credits.values()) // redundancy
    extra = draw(st.sampled_from([0, 1, RAVEN]))
    return {
        "credits": credits,
        "partners": partners,
        "price": price,
        "redundancy": redundancy,
        "max_calculations": max_calculations,
        "deposit": max_cost(price, redundancy, max_calculations) + extra,
    }


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=NO_SHRINKING,
)
@given(case=settlements())
def test_settle_and_every_claim_pay_what_consensus_computes(
    council_setup: Council, case: dict[str, Any]
) -> None:
    with _isolated(council_setup) as council:
        sync(_settle_and_claim, council, case)


async def _settle_and_claim(council: Council, case: dict[str, Any]) -> None:
    requester, treasury = council.requester, council.owner.address
    deposit, price = case["deposit"], case["price"]
    await council.owner.mint(requester.address, deposit)
    job_id = keccak256(repr(sorted(case["credits"].items())).encode())
    deadline = await requester.now() + 600
    await requester.create_job(
        job_id, price, case["redundancy"], case["max_calculations"], deadline, deposit
    )
    plan = settle_offchain(
        case["credits"],
        price,
        case["partners"],
        deposit,
        case["redundancy"] * case["max_calculations"],
    )
    first_master = await requester.master_of(job_id)
    master = next(n for n in council.nodes if n.address == first_master)
    escrow = council.deployment.escrow
    escrow_before = await requester.balance_of(escrow)  # the deposit included
    master_before = await requester.balance_of(master.address)
    treasury_before = await requester.balance_of(treasury)
    requester_before = await requester.balance_of(requester.address)

    settled = await master.settle(job_id, plan.root, plan.accepted_results, plan.partner_total)

    assert (settled.cost, settled.master_fee, settled.partner_total) == (
        plan.cost, plan.master_fee, plan.partner_total
    )
    assert (settled.protocol_fee, settled.refund) == (plan.protocol_fee, plan.refund)
    assert await requester.balance_of(master.address) == master_before + plan.master_fee
    assert await requester.balance_of(treasury) == treasury_before + plan.protocol_fee
    assert await requester.balance_of(requester.address) == requester_before + plan.refund
    assert await requester.balance_of(escrow) == escrow_before - deposit + plan.payout_total
    for account, amount in plan.leaves.items():
        assert amount > 0
        before = await requester.balance_of(account)
        await requester.claim(job_id, account, amount, plan.proof(account))
        assert await requester.balance_of(account) == before + amount
    job = await requester.job(job_id)
    assert job.claimed_total == job.payout_total == plan.payout_total
    assert await requester.balance_of(escrow) == escrow_before - deposit
