"""Attacks on the stake registry: unbonding, equivocation evidence, committee orders, minting.

Embedded chain. The market (staked masters and workers, a job whose epoch is
elected) is built once for the module, and so is a second deployment with a
partial equivocation slash and room for only two candidates; every test runs
inside a snapshot of both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from chain.market import (
    CALCULATION,
    DIGEST_A,
    DIGEST_B,
    WORKER_STAKE,
    Market,
    build_market,
    equivocate,
    recover_signer,
    sign_result_in,
    sync,
)

from consensus.abi import keccak256
from consensus.eip712 import Domain, result_digest, slash_order_digest
from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import ContractReverted, Deployment, StakeInfo
from ravenp2p.chain.deploy import RAVEN, DeployParams, deploy_contracts
from ravenp2p.chain.sender import TransactionSender
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.identity import NodeIdentity

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

OTHER_PARAMS = DeployParams(
    equivocation_slash_bps=3_000, reporter_share_bps=2_500, committee_size=1, max_candidates=2
)
ETH = 10**20


@dataclass
class Other:
    """A second deployment (own token, registry, escrow) and three funded accounts on it."""

    deployment: Deployment
    owner: Web3Chain
    owner_secret: bytes
    nodes: list[Web3Chain]


@dataclass
class World:
    market: Market
    other: Other


def _other_deployment(env: ChainEnv) -> Other:
    keys = [keccak256(f"registry tests: other {i}".encode()) for i in range(4)]
    for key in keys:
        env.dev.fund(NodeIdentity.from_secret(key).address, ETH)
    deployment = deploy_contracts(env.dev.w3, keys[0], OTHER_PARAMS)
    owner, *nodes = (Web3Chain(env.dev.w3, deployment, key) for key in keys)
    return Other(deployment, owner, keys[0], nodes)


@pytest.fixture(scope="module")
def prepared(embedded_env: ChainEnv) -> Iterator[World]:
    snapshot = embedded_env.snapshot()
    try:
        yield World(sync(build_market, embedded_env), _other_deployment(embedded_env))
    finally:
        embedded_env.revert(snapshot)


@pytest.fixture
def world(prepared: World) -> Iterator[World]:
    snapshot = prepared.market.snapshot()
    try:
        yield prepared
    finally:
        prepared.market.revert(snapshot)
        for chain in (prepared.other.owner, *prepared.other.nodes):
            chain.resync_nonce()


@pytest.fixture
def market(world: World) -> Market:
    return world.market


def domain_of(deployment: Deployment) -> Domain:
    return Domain(deployment.chain_id, deployment.registry)


# ---------------------------------------------------------------- stake and unbonding


async def test_withdraw_waits_for_the_unbonding_delay(market: Market) -> None:
    node = market.workers[0]
    delay = market.env.params.unbonding_delay
    with pytest.raises(ContractReverted) as nothing:
        await node.withdraw()
    assert nothing.value.reason == f"NothingToWithdraw(node={node.address})"

    await node.request_unbond(WORKER_STAKE // 2)
    release = (await node.stake_of(node.address)).release_time
    assert release == await node.now() + delay
    with pytest.raises(ContractReverted) as early:
        await node.withdraw()
    assert early.value.reason == f"StillUnbonding(node={node.address}, releaseTime={release})"

    market.env.advance_time(delay // 2)
    await node.request_unbond(WORKER_STAKE // 4)  # a new request restarts the delay
    restarted = (await node.stake_of(node.address)).release_time
    assert restarted > release
    market.env.advance_time(release - await node.now())
    with pytest.raises(ContractReverted) as still:
        await node.withdraw()
    assert still.value.reason == f"StillUnbonding(node={node.address}, releaseTime={restarted})"

    market.env.advance_time(restarted - await node.now())
    await node.withdraw()
    assert await node.balance_of(node.address) == WORKER_STAKE * 3 // 4
    assert await node.stake_of(node.address) == StakeInfo(WORKER_STAKE // 4, 0, 0)


async def test_unbonding_more_than_the_active_stake_is_refused(market: Market) -> None:
    node = market.workers[0]
    with pytest.raises(ContractReverted) as too_much:
        await node.request_unbond(WORKER_STAKE + 1)
    assert too_much.value.reason == (
        f"InsufficientStake(node={node.address}, requested={WORKER_STAKE + 1}, "
        f"active={WORKER_STAKE})"
    )
    with pytest.raises(ContractReverted) as zero:
        await node.request_unbond(0)
    assert zero.value.reason == "ZeroAmount()"


async def test_candidacy_needs_the_minimum_stake_and_a_free_slot(world: World) -> None:
    market = world.market
    master = market.masters[0]
    minimum = market.env.params.min_master_stake
    active = (await master.stake_of(master.address)).active
    with pytest.raises(ContractReverted) as twice:
        await master.become_candidate()
    assert twice.value.reason == f"AlreadyCandidate(node={master.address})"

    await master.request_unbond(active - minimum + 1)  # below the minimum: no longer a candidate
    assert master.address not in await master.candidates()
    with pytest.raises(ContractReverted) as below:
        await master.become_candidate()
    assert below.value.reason == (
        f"StakeBelowMinimum(node={master.address}, active={minimum - 1}, minimum={minimum})"
    )
    with pytest.raises(ContractReverted) as left:
        await master.leave_candidacy()
    assert left.value.reason == f"NotCandidate(node={master.address})"

    other = world.other
    for node in other.nodes:
        await other.owner.mint(node.address, OTHER_PARAMS.min_master_stake)
        await node.stake(OTHER_PARAMS.min_master_stake)
    await other.nodes[0].become_candidate()
    await other.nodes[1].become_candidate()
    with pytest.raises(ContractReverted) as full:
        await other.nodes[2].become_candidate()
    assert full.value.reason == f"CandidateSetFull(maxCandidates={OTHER_PARAMS.max_candidates})"
    await other.nodes[0].leave_candidacy()
    await other.nodes[2].become_candidate()
    assert await other.nodes[2].candidates() == [other.nodes[1].address, other.nodes[2].address]


# ------------------------------------------------------------------------ equivocation


async def test_equivocation_with_a_second_signature_by_another_key_is_refused(
    market: Market,
) -> None:
    worker, framer = market.workers
    with pytest.raises(ContractReverted) as forged:
        await market.outsider.slash_equivocation(
            worker.address,
            market.job_id,
            CALCULATION,
            DIGEST_A,
            worker.sign_result(market.job_id, CALCULATION, DIGEST_A),
            DIGEST_B,
            framer.sign_result(market.job_id, CALCULATION, DIGEST_B),
        )
    assert forged.value.reason == (
        f"SignatureNotByWorker(worker={worker.address}, signer={framer.address})"
    )
    with pytest.raises(ContractReverted) as garbage:
        await market.outsider.slash_equivocation(
            worker.address,
            market.job_id,
            CALCULATION,
            DIGEST_A,
            bytes(65),
            DIGEST_B,
            worker.sign_result(market.job_id, CALCULATION, DIGEST_B),
        )
    assert garbage.value.reason == (
        f"SignatureNotByWorker(worker={worker.address}, signer={'0x' + '00' * 20})"
    )
    assert (await worker.stake_of(worker.address)).active == WORKER_STAKE


async def test_equivocation_needs_two_different_digests(market: Market) -> None:
    worker = market.workers[0]
    signature = worker.sign_result(market.job_id, CALCULATION, DIGEST_A)
    with pytest.raises(ContractReverted) as same:
        await market.outsider.slash_equivocation(
            worker.address, market.job_id, CALCULATION, DIGEST_A, signature, DIGEST_A, signature
        )
    assert same.value.reason == f"IdenticalDigests(digest=0x{DIGEST_A.hex()})"


async def test_the_same_equivocation_is_slashed_once(market: Market) -> None:
    worker, reporter = market.workers[0], market.outsider
    await equivocate(market, worker, reporter)
    await market.env.mint(worker.address, WORKER_STAKE)
    await worker.stake(WORKER_STAKE)  # fresh stake, old evidence
    for submitter in (reporter, market.workers[1]):
        with pytest.raises(ContractReverted) as again:
            await equivocate(market, worker, submitter)
        assert again.value.reason == (
            f"EquivocationAlreadySlashed(worker={worker.address}, "
            f"job=0x{market.job_id.hex()}, calculation={CALCULATION})"
        )
    assert (await worker.stake_of(worker.address)).active == WORKER_STAKE
    # Another calculation is new evidence.
    await equivocate(market, worker, reporter, CALCULATION + 1)
    assert (await worker.stake_of(worker.address)).active == 0


async def test_equivocation_without_stake_is_refused_and_the_evidence_kept(
    market: Market,
) -> None:
    # The outsider has never staked.
    offender, reporter = market.outsider, market.workers[1]
    with pytest.raises(ContractReverted) as empty:
        await equivocate(market, offender, reporter)
    assert empty.value.reason == f"NothingToSlash(offender={offender.address})"
    await market.env.mint(offender.address, 10 * RAVEN)
    await offender.stake(10 * RAVEN)
    await equivocate(market, offender, reporter)
    assert await reporter.balance_of(reporter.address) == RAVEN  # the 10% reporter share


async def test_signature_for_another_registry_is_refused(world: World) -> None:
    market, other = world.market, world.other
    worker = market.workers[0]
    elsewhere = domain_of(other.deployment)
    here = domain_of(market.env.deployment)
    identity = market.identity_of(worker)
    signature_a = worker.sign_result(market.job_id, CALCULATION, DIGEST_A)
    foreign_b = sign_result_in(identity, elsewhere, market.job_id, CALCULATION, DIGEST_B)
    # On its own registry the signature is the worker's: that registry's digest recovers to it.
    other_registry = market.env.dev.w3.eth.contract(
        address=other.deployment.registry, abi=load_artifact("StakeRegistry").abi
    )
    foreign_digest = other_registry.functions.resultDigest(
        market.job_id, CALCULATION, DIGEST_B
    ).call()
    assert recover_signer(foreign_digest, foreign_b) == worker.address
    signer = recover_signer(result_digest(here, market.job_id, CALCULATION, DIGEST_B), foreign_b)

    with pytest.raises(ContractReverted) as replay:
        await market.outsider.slash_equivocation(
            worker.address, market.job_id, CALCULATION, DIGEST_A, signature_a, DIGEST_B, foreign_b
        )
    assert replay.value.reason == f"SignatureNotByWorker(worker={worker.address}, signer={signer})"
    assert (await worker.stake_of(worker.address)).active == WORKER_STAKE


async def test_a_partial_slash_takes_active_stake_first_then_unbonding(world: World) -> None:
    other = world.other
    bps, share = OTHER_PARAMS.equivocation_slash_bps, OTHER_PARAMS.reporter_share_bps
    worker, reporter = other.nodes[0], other.nodes[1]
    job = keccak256(b"partial slash")
    await other.owner.mint(worker.address, 150 * RAVEN)
    await worker.stake(150 * RAVEN)
    await worker.request_unbond(140 * RAVEN)  # active 10, unbonding 140
    treasury = other.owner.address  # the deployer is this deployment's treasury
    treasury_before = await reporter.balance_of(treasury)

    for calculation, expected in (
        (1, StakeInfo(0, 105 * RAVEN, 0)),  # 45 slashed: 10 active, 35 unbonding
        (2, StakeInfo(0, 105 * RAVEN * 7 // 10, 0)),
    ):
        before = await worker.stake_of(worker.address)
        total = before.active + before.unbonding
        await reporter.slash_equivocation(
            worker.address,
            job,
            calculation,
            DIGEST_A,
            worker.sign_result(job, calculation, DIGEST_A),
            DIGEST_B,
            worker.sign_result(job, calculation, DIGEST_B),
        )
        after = await worker.stake_of(worker.address)
        assert (after.active, after.unbonding) == (expected.active, expected.unbonding)
        assert after.release_time == before.release_time > 0
        assert total - (after.active + after.unbonding) == total * bps // 10_000

    slashed = 150 * RAVEN - (await worker.stake_of(worker.address)).unbonding
    reward = 45 * RAVEN * share // 10_000 + (105 * RAVEN * bps // 10_000) * share // 10_000
    assert await reporter.balance_of(reporter.address) == reward
    assert await reporter.balance_of(treasury) == treasury_before + slashed - reward


# --------------------------------------------------------------------- committee orders


async def test_committee_slash_orders(market: Market) -> None:
    """A majority of distinct members slashes once; everything short of that is refused."""
    offender, submitter = market.workers[1], market.outsider
    members = [market.chain_of(a) for a in await submitter.committee(market.epoch)]
    assert len(members) == 3
    amount, evidence, epoch = 30 * RAVEN, keccak256(b"withheld gradients"), market.epoch
    signatures = [m.sign_slash_order(offender.address, amount, evidence, epoch) for m in members]
    domain = domain_of(market.env.deployment)
    stranger = market.workers[0].sign_slash_order(offender.address, amount, evidence, epoch)

    async def order(signed: list[bytes], value: int = amount, at: int = epoch) -> str:
        with pytest.raises(ContractReverted) as refused:
            await submitter.slash_by_committee(offender.address, value, evidence, at, signed)
        return refused.value.reason

    assert await order(signatures[:1]) == "NotEnoughSignatures(signers=1, required=2)"
    assert await order([signatures[0], stranger]) == (
        f"SignerNotInCommittee(signer={market.workers[0].address}, epoch={epoch})"
    )
    assert await order([signatures[1], signatures[1]]) == (
        f"DuplicateSigner(signer={members[1].address})"
    )
    assert await order([signatures[0], bytes(65)]) == "InvalidSignature(index=1)"
    # Signatures over one amount do not authorize another: they recover to strangers.
    tampered = recover_signer(
        slash_order_digest(domain, offender.address, 2 * amount, evidence, epoch), signatures[0]
    )
    assert await order(signatures[:2], value=2 * amount) == (
        f"SignerNotInCommittee(signer={tampered}, epoch={epoch})"
    )
    assert await order(signatures[:2], at=epoch + 1) == f"EpochNotElected(epoch={epoch + 1})"
    assert await order(signatures[:2], value=0) == "ZeroAmount()"
    assert (await offender.stake_of(offender.address)).active == WORKER_STAKE

    treasury = market.env.treasury.address
    treasury_before = await submitter.balance_of(treasury)
    await submitter.slash_by_committee(offender.address, amount, evidence, epoch, signatures[1:])
    assert (await offender.stake_of(offender.address)).active == WORKER_STAKE - amount
    assert await submitter.balance_of(treasury) == treasury_before + amount
    assert await submitter.balance_of(submitter.address) == 0  # nobody profits from a vote

    digest = slash_order_digest(domain, offender.address, amount, evidence, epoch)
    for replay in (signatures[1:], signatures, signatures[:2]):
        assert await order(replay) == f"SlashOrderAlreadyExecuted(orderDigest=0x{digest.hex()})"
    assert (await offender.stake_of(offender.address)).active == WORKER_STAKE - amount


async def test_committee_slash_is_capped_at_the_stake_and_reaches_unbonding(
    market: Market,
) -> None:
    offender, submitter = market.workers[1], market.outsider
    members = [market.chain_of(a) for a in await submitter.committee(market.epoch)]
    await offender.request_unbond(WORKER_STAKE // 2)
    evidence, huge = keccak256(b"sabotage"), 10**9 * RAVEN
    signed = [m.sign_slash_order(offender.address, huge, evidence, market.epoch) for m in members]
    treasury_before = await submitter.balance_of(market.env.treasury.address)

    await submitter.slash_by_committee(offender.address, huge, evidence, market.epoch, signed)

    assert await offender.stake_of(offender.address) == StakeInfo(0, 0, 0)
    assert await submitter.balance_of(market.env.treasury.address) == (
        treasury_before + WORKER_STAKE
    )
    again = [
        m.sign_slash_order(offender.address, huge, keccak256(b"more"), market.epoch)
        for m in members
    ]
    with pytest.raises(ContractReverted) as empty:
        await submitter.slash_by_committee(
            offender.address, huge, keccak256(b"more"), market.epoch, again
        )
    assert empty.value.reason == f"NothingToSlash(offender={offender.address})"


# ----------------------------------------------------------------------------- token


async def test_only_the_token_owner_mints_and_not_after_renouncing(world: World) -> None:
    other = world.other
    owner, node = other.owner, other.nodes[0]
    with pytest.raises(ContractReverted) as stranger:
        await node.mint(node.address, RAVEN)
    assert stranger.value.reason == f"OwnableUnauthorizedAccount(account={node.address})"
    await owner.mint(node.address, RAVEN)
    assert await owner.balance_of(node.address) == RAVEN

    token = owner.w3.eth.contract(
        address=other.deployment.token, abi=load_artifact("RavenToken").abi
    )
    # Web3Chain has no renounce (production deployments do it once, by hand): a raw call.
    TransactionSender(owner.w3, other.owner_secret).transact(
        "RavenToken", "renounceOwnership", token.address, token.encode_abi("renounceOwnership")
    )
    owner.resync_nonce()
    with pytest.raises(ContractReverted) as former:
        await owner.mint(owner.address, RAVEN)
    assert former.value.reason == f"OwnableUnauthorizedAccount(account={owner.address})"
    assert int(token.functions.totalSupply().call()) == RAVEN


async def test_a_committee_slash_order_expires_after_the_next_epoch(market: Market) -> None:
    """An old committee cannot reach back: its orders count only in its epoch and the next."""
    offender, submitter = market.workers[1], market.outsider
    members = [market.chain_of(a) for a in await submitter.committee(market.epoch)]
    amount, evidence, epoch = 10 * RAVEN, keccak256(b"stale order"), market.epoch
    signatures = [m.sign_slash_order(offender.address, amount, evidence, epoch) for m in members]
    market.env.advance_time(2 * market.env.params.epoch_length)
    current = await submitter.current_epoch()
    with pytest.raises(ContractReverted) as refused:
        await submitter.slash_by_committee(offender.address, amount, evidence, epoch, signatures)
    assert refused.value.reason == f"SlashOrderExpired(epoch={epoch}, currentEpoch={current})"
    assert (await offender.stake_of(offender.address)).active == WORKER_STAKE
