"""Attacks on the job escrow, each refused with its specific custom error (embedded chain).

The market (staked masters, workers, one open job) is built once for the
module; every test runs inside a snapshot of it. The most important attacks
also run on anvil, in test_contracts.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from chain.market import (
    DEPOSIT,
    LIFETIME,
    MAX_CALCULATIONS,
    PRICE,
    REDUNDANCY,
    Market,
    isolated_market,
    market_on,
    max_cost,
    open_job,
)
from web3.contract import Contract

import ravenp2p.chain
from consensus.abi import keccak256
from consensus.settlement import MerkleTree, leaf_hash
from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import ContractReverted, JobStatusOnChain
from ravenp2p.chain.sender import TransactionSender

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

ARTIFACTS = Path(ravenp2p.chain.__file__).parent / "artifacts"
REENTRANT_TOKEN = ARTIFACTS / "test" / "ReentrantToken.json"


@pytest.fixture(scope="module")
def prepared(embedded_env: ChainEnv) -> Iterator[Market]:
    with market_on(embedded_env) as market:
        yield market


@pytest.fixture
def market(prepared: Market) -> Iterator[Market]:
    with isolated_market(prepared) as market:
        yield market


def job_hex(market: Market) -> str:
    return f"0x{market.job_id.hex()}"


def credits_of(market: Market) -> dict[str, int]:
    first, second = market.workers
    return {first.address: 4, second.address: 3}


async def test_claiming_twice_is_refused(market: Market) -> None:
    plan = await market.settle(credits_of(market))
    worker = market.workers[1]
    amount, proof = plan.amount_of(worker.address), plan.proof(worker.address)
    await worker.claim(market.job_id, worker.address, amount, proof)

    for submitter in (worker, market.outsider):  # whoever resubmits it
        with pytest.raises(ContractReverted) as again:
            await submitter.claim(market.job_id, worker.address, amount, proof)
        assert again.value.reason == (
            f"AlreadyClaimed(job={job_hex(market)}, account={worker.address})"
        )
    assert await worker.balance_of(worker.address) == amount
    assert (await worker.job(market.job_id)).claimed_total == amount


async def test_claiming_more_or_less_than_the_leaf_is_refused(market: Market) -> None:
    plan = await market.settle(credits_of(market))
    worker = market.workers[0]
    amount, proof = plan.amount_of(worker.address), plan.proof(worker.address)
    for wrong in (amount + 1, amount * 2, amount - 1, 0):
        with pytest.raises(ContractReverted) as refused:
            await market.outsider.claim(market.job_id, worker.address, wrong, proof)
        assert refused.value.reason == (
            f"InvalidProof(job={job_hex(market)}, account={worker.address}, amount={wrong})"
        )
    # Another account cannot take the worker's leaf either.
    with pytest.raises(ContractReverted) as thief:
        await market.outsider.claim(market.job_id, market.outsider.address, amount, proof)
    assert thief.value.reason.startswith(f"InvalidProof(job={job_hex(market)}, ")
    assert await worker.balance_of(worker.address) == 0


async def test_claims_before_settlement_or_on_unknown_jobs_are_refused(market: Market) -> None:
    worker = market.workers[0]
    with pytest.raises(ContractReverted) as early:
        await worker.claim(market.job_id, worker.address, PRICE, [])
    assert early.value.reason == f"JobNotSettled(job={job_hex(market)}, status=1)"
    unknown = keccak256(b"no such job")
    with pytest.raises(ContractReverted) as missing:
        await worker.claim(unknown, worker.address, PRICE, [])
    assert missing.value.reason == f"UnknownJob(job=0x{unknown.hex()})"


async def test_claims_cannot_exceed_the_settled_payout(market: Market) -> None:
    # A dishonest master commits a tree whose leaves add up to more than it settles for.
    a, b = market.workers
    inflated = 2 * PRICE
    leaf_a, leaf_b = leaf_hash(a.address, inflated), leaf_hash(b.address, inflated)
    tree = MerkleTree([leaf_a, leaf_b])
    await market.ranked[0].settle(market.job_id, tree.root, 2, 0)  # payout: 2 * PRICE

    await a.claim(market.job_id, a.address, inflated, tree.proof(leaf_a))
    with pytest.raises(ContractReverted) as exceeded:
        await b.claim(market.job_id, b.address, inflated, tree.proof(leaf_b))
    assert exceeded.value.reason == (
        f"ClaimExceedsPayout(job={job_hex(market)}, amount={inflated}, remaining=0)"
    )
    assert await b.balance_of(market.env.deployment.escrow) == 0


async def test_settling_by_anyone_but_the_current_master_is_refused(market: Market) -> None:
    plan = await market.plan(credits_of(market))
    args = (market.job_id, plan.root, plan.accepted_results, plan.partner_total)
    for intruder in (*market.ranked[1:], market.outsider, market.requester, market.workers[0]):
        with pytest.raises(ContractReverted) as refused:
            await intruder.settle(*args)
        assert refused.value.reason == (
            f"NotJobMaster(job={job_hex(market)}, caller={intruder.address})"
        )
    await market.ranked[0].settle(*args)


async def test_taking_over_too_early_is_refused(market: Market) -> None:
    timeout = market.env.params.master_timeout
    second, third = market.ranked[1], market.ranked[2]
    created = (await second.job(market.job_id)).last_heartbeat

    with pytest.raises(ContractReverted) as early:
        await second.take_over(market.job_id)
    assert early.value.reason == (
        f"TakeOverTooEarly(job={job_hex(market)}, allowedAt={created + timeout})"
    )
    # A heartbeat pushes the deadline back.
    market.env.advance_time(timeout - 5)
    await market.ranked[0].heartbeat(market.job_id)
    beat = (await second.job(market.job_id)).last_heartbeat
    assert beat > created
    with pytest.raises(ContractReverted) as pushed:
        await second.take_over(market.job_id)
    assert pushed.value.reason == (
        f"TakeOverTooEarly(job={job_hex(market)}, allowedAt={beat + timeout})"
    )
    # Rank 2 waits one timeout per rank it skips.
    market.env.advance_time(timeout)
    with pytest.raises(ContractReverted) as skipping:
        await third.take_over(market.job_id)
    assert skipping.value.reason == (
        f"TakeOverTooEarly(job={job_hex(market)}, allowedAt={beat + 2 * timeout})"
    )
    await second.take_over(market.job_id)
    assert (await second.job(market.job_id)).master_rank == 1


async def test_take_over_needs_a_later_rank_on_the_committee(market: Market) -> None:
    market.env.advance_time(10 * market.env.params.master_timeout)
    with pytest.raises(ContractReverted) as first:
        await market.ranked[0].take_over(market.job_id)
    assert first.value.reason == f"RankNotAfterMaster(job={job_hex(market)}, rank=0, masterRank=0)"
    with pytest.raises(ContractReverted) as outsider:
        await market.outsider.take_over(market.job_id)
    assert outsider.value.reason == (
        f"NotJobCommitteeMember(job={job_hex(market)}, caller={market.outsider.address})"
    )
    await market.ranked[2].take_over(market.job_id)  # skipping rank 1, after two timeouts
    with pytest.raises(ContractReverted) as back:
        await market.ranked[1].take_over(market.job_id)
    assert back.value.reason == f"RankNotAfterMaster(job={job_hex(market)}, rank=1, masterRank=2)"


async def test_settling_beyond_the_budget_is_refused(market: Market) -> None:
    master = market.ranked[0]
    max_results = REDUNDANCY * MAX_CALCULATIONS
    root = keccak256(b"any root")
    with pytest.raises(ContractReverted) as too_many:
        await master.settle(market.job_id, root, max_results + 1, 0)
    assert too_many.value.reason == (
        f"TooManyResults(job={job_hex(market)}, acceptedResults={max_results + 1}, "
        f"maxResults={max_results})"
    )
    cost = max_results * PRICE
    cap = cost * 3 // 100
    with pytest.raises(ContractReverted) as partners:
        await master.settle(market.job_id, root, max_results, cap + 1)
    assert partners.value.reason == (
        f"PartnerTotalTooHigh(job={job_hex(market)}, partnerTotal={cap + 1}, "
        f"maxPartnerTotal={cap})"
    )
    with pytest.raises(ContractReverted) as empty:
        await master.settle(market.job_id, bytes(32), 1, 0)
    assert empty.value.reason == f"EmptyRoot(job={job_hex(market)})"

    # The whole budget, partner cap included, is fine and leaves nothing in the escrow unowed.
    settled = await master.settle(market.job_id, root, max_results, cap)
    assert settled.refund == DEPOSIT - cost - cost // 10
    assert await master.balance_of(market.env.deployment.escrow) == cost + cap


async def test_settling_no_results_refunds_the_whole_deposit(market: Market) -> None:
    settled = await market.ranked[0].settle(market.job_id, bytes(32), 0, 0)
    assert (settled.cost, settled.master_fee, settled.protocol_fee) == (0, 0, 0)
    assert settled.refund == DEPOSIT
    assert await market.requester.balance_of(market.requester.address) == DEPOSIT
    with pytest.raises(ContractReverted) as nothing:
        await market.outsider.claim(market.job_id, market.outsider.address, 0, [])
    assert nothing.value.reason.startswith("InvalidProof(")


async def test_refund_only_after_the_deadline_and_never_after_settling(market: Market) -> None:
    requester = market.requester
    deadline = (await requester.job(market.job_id)).deadline
    with pytest.raises(ContractReverted) as early:
        await requester.refund(market.job_id)
    assert early.value.reason == f"DeadlineNotPassed(job={job_hex(market)}, deadline={deadline})"

    market.env.advance_time(LIFETIME + 1)
    master = market.ranked[0]
    plan = await market.plan(credits_of(market))
    late = f"JobDeadlinePassed(job={job_hex(market)}, deadline={deadline})"
    for attempt in (
        lambda: master.settle(market.job_id, plan.root, plan.accepted_results, plan.partner_total),
        lambda: master.heartbeat(market.job_id),
        lambda: market.ranked[1].take_over(market.job_id),
    ):
        with pytest.raises(ContractReverted) as refused:
            await attempt()
        assert refused.value.reason == late

    await market.outsider.refund(market.job_id)  # anyone may submit it; the requester is paid
    assert await requester.balance_of(requester.address) == DEPOSIT
    assert await requester.balance_of(market.outsider.address) == 0
    assert (await requester.job(market.job_id)).status == JobStatusOnChain.REFUNDED
    with pytest.raises(ContractReverted) as twice:
        await requester.refund(market.job_id)
    assert twice.value.reason == f"JobNotOpen(job={job_hex(market)}, status=3)"


async def test_refund_of_a_settled_job_is_refused(market: Market) -> None:
    await market.settle(credits_of(market))
    market.env.advance_time(LIFETIME + 1)
    with pytest.raises(ContractReverted) as refused:
        await market.requester.refund(market.job_id)
    assert refused.value.reason == f"JobNotOpen(job={job_hex(market)}, status=2)"


async def test_job_creation_checks_its_arguments(market: Market) -> None:
    requester = market.requester
    await market.env.mint(requester.address, 2 * DEPOSIT)
    now = await requester.now()
    job_id = keccak256(b"new job")
    ok = (job_id, PRICE, REDUNDANCY, MAX_CALCULATIONS, now + LIFETIME, DEPOSIT)
    needed = max_cost(PRICE, REDUNDANCY, MAX_CALCULATIONS)
    cases = [
        ({5: needed - 1}, f"DepositBelowMaxCost(deposit={needed - 1}, maxCost={needed})"),
        ({0: market.job_id}, f"JobAlreadyExists(job={job_hex(market)})"),
        ({0: bytes(32)}, "ZeroJobId()"),
        ({1: 0}, "ZeroPrice()"),
        ({2: 0}, "ZeroRedundancy()"),
        ({3: 0}, "ZeroMaxCalculations()"),
    ]
    for change, reason in cases:
        args = [change.get(i, value) for i, value in enumerate(ok)]
        with pytest.raises(ContractReverted) as refused:
            await requester.create_job(*args)
        assert refused.value.reason == reason
    past = now - 1
    with pytest.raises(ContractReverted) as stale:
        await requester.create_job(job_id, PRICE, REDUNDANCY, MAX_CALCULATIONS, past, DEPOSIT)
    assert stale.value.reason.startswith(f"DeadlineNotInFuture(deadline={past}, timestamp=")
    assert await requester.balance_of(requester.address) == 2 * DEPOSIT

    await requester.create_job(*ok)
    assert await requester.balance_of(requester.address) == DEPOSIT


async def test_a_job_id_is_never_reused(market: Market) -> None:
    market.env.advance_time(LIFETIME + 1)
    await market.requester.refund(market.job_id)
    with pytest.raises(ContractReverted) as reused:
        await open_job(market.env, market.requester, "market job")
    assert reused.value.reason == f"JobAlreadyExists(job={job_hex(market)})"


class _Raw:
    """Raw transactions for a contract the `Chain` API cannot drive (the reentrant token)."""

    def __init__(self, sender: TransactionSender, name: str, contract: Contract) -> None:
        self.sender, self.name, self.contract = sender, name, contract

    def __call__(self, function: str, *args: Any) -> None:
        data = self.contract.encode_abi(function, args=list(args))
        self.sender.transact(self.name, function, self.contract.address, data)


def _deploy(sender: TransactionSender, name: str, abi: Any, bytecode: str, *args: Any) -> Contract:
    w3 = sender.w3
    init = w3.eth.contract(abi=abi, bytecode=bytecode).constructor(*args).data_in_transaction
    address = sender.deploy(name, init)["contractAddress"]
    return w3.eth.contract(address=address, abi=abi)


async def test_reentrancy_through_a_malicious_token_is_stopped(market: Market) -> None:
    env = market.env
    w3 = env.dev.w3
    token_artifact = json.loads(REENTRANT_TOKEN.read_text())
    owner = TransactionSender(w3, env.identities[0].private_key.secret)
    token = _deploy(owner, "ReentrantToken", token_artifact["abi"], token_artifact["bytecode"])
    registry_artifact, escrow_artifact = load_artifact("StakeRegistry"), load_artifact("JobEscrow")
    p = env.params
    registry = _deploy(
        owner, "StakeRegistry", registry_artifact.abi, registry_artifact.bytecode,
        token.address, env.treasury.address, p.min_master_stake, p.unbonding_delay,
        p.epoch_length, p.committee_size, p.max_candidates, p.equivocation_slash_bps,
        p.reporter_share_bps,
    )
    escrow = _deploy(
        owner, "JobEscrow", escrow_artifact.abi, escrow_artifact.bytecode,
        token.address, registry.address, env.treasury.address, p.master_timeout,
    )
    call_token = _Raw(owner, "ReentrantToken", token)
    call_registry = _Raw(owner, "StakeRegistry", registry)
    call_escrow = _Raw(owner, "JobEscrow", escrow)
    master = owner.address
    call_token("mint", master, p.min_master_stake + DEPOSIT)
    call_token("approve", registry.address, p.min_master_stake)
    call_registry("stake", p.min_master_stake)
    call_registry("becomeCandidate")
    call_token("approve", escrow.address, DEPOSIT)
    job_id = keccak256(b"reentrancy")
    now = await market.requester.now()
    call_escrow("createJob", job_id, PRICE, REDUNDANCY, MAX_CALCULATIONS, now + 100, DEPOSIT)
    env.advance_time(101)

    def balance(account: str) -> int:
        return int(token.functions.balanceOf(account).call())

    # Control: the armed token really calls back into the escrow mid-transfer, into an
    # unguarded function, which already sees the job refunded (effects before interactions).
    call_token("arm", escrow.address, escrow.encode_abi("heartbeat", args=[job_id]))
    with pytest.raises(ContractReverted) as control:
        call_escrow("refund", job_id)
    assert control.value.reason == f"JobNotOpen(job=0x{job_id.hex()}, status=3)"
    # The attack: a second refund from inside the first one's transfer.
    call_token("arm", escrow.address, escrow.encode_abi("refund", args=[job_id]))
    with pytest.raises(ContractReverted) as reentered:
        call_escrow("refund", job_id)
    assert reentered.value.reason == "ReentrancyGuardReentrantCall()"
    assert balance(escrow.address) == DEPOSIT

    # The registry's guard holds the same way: withdraw re-entered from its own payout.
    call_registry("requestUnbond", p.min_master_stake)
    env.advance_time(p.unbonding_delay)
    call_token("arm", registry.address, registry.encode_abi("withdraw", args=[]))
    with pytest.raises(ContractReverted) as withdraw:
        call_registry("withdraw")
    assert withdraw.value.reason == "ReentrancyGuardReentrantCall()"
    assert balance(registry.address) == p.min_master_stake

    call_token("arm", "0x" + "00" * 20, b"")
    call_escrow("refund", job_id)
    call_registry("withdraw")
    assert balance(master) == p.min_master_stake + DEPOSIT
    assert balance(escrow.address) == balance(registry.address) == 0


async def test_a_settle_mined_at_the_deadline_itself_is_in_time(market: Market) -> None:
    # The embedded chain mines each transaction one second after the previous block, so the
    # block that includes the next transaction is predictable to the second.
    deadline = (await market.requester.job(market.job_id)).deadline
    market.env.advance_time(deadline - 1 - await market.requester.now())
    assert await market.requester.now() == deadline - 1
    with pytest.raises(ContractReverted) as early:
        await market.requester.refund(market.job_id)  # would be mined at the deadline itself
    assert early.value.reason.startswith("DeadlineNotPassed(")
    assert await market.requester.now() == deadline - 1  # the refused call mined nothing
    await market.settle(credits_of(market))  # mined at `deadline`: still in time
    assert await market.requester.now() == deadline



async def test_a_refund_mined_one_second_after_the_deadline_goes_through(
    market: Market,
) -> None:
    deadline = (await market.requester.job(market.job_id)).deadline
    market.env.advance_time(deadline - await market.requester.now())
    assert await market.requester.now() == deadline
    plan = await market.plan(credits_of(market))
    with pytest.raises(ContractReverted) as late:  # would be mined at deadline + 1
        await market.ranked[0].settle(
            market.job_id, plan.root, plan.accepted_results, plan.partner_total
        )
    assert late.value.reason == f"JobDeadlinePassed(job={job_hex(market)}, deadline={deadline})"
    await market.requester.refund(market.job_id)
    assert await market.requester.now() == deadline + 1
    assert await market.requester.balance_of(market.requester.address) == DEPOSIT


async def test_a_master_without_its_stake_can_neither_settle_nor_take_over(market: Market) -> None:
    """Unbonding below the minimum ends a master's right to act on its jobs."""
    first, second = market.ranked[0], market.ranked[1]
    minimum = market.env.params.min_master_stake
    plan = await market.plan(credits_of(market))
    active = (await first.stake_of(first.address)).active
    await first.request_unbond(active - minimum + 1)
    with pytest.raises(ContractReverted) as refused:
        await first.settle(market.job_id, plan.root, plan.accepted_results, plan.partner_total)
    assert refused.value.reason == (
        f"MasterStakeTooLow(master={first.address}, active={minimum - 1}, minimum={minimum})"
    )
    second_active = (await second.stake_of(second.address)).active
    await second.request_unbond(second_active)
    market.env.advance_time(2 * market.env.params.master_timeout)
    with pytest.raises(ContractReverted, match="MasterStakeTooLow"):
        await second.take_over(market.job_id)
    await market.ranked[2].take_over(market.job_id)
    await market.ranked[2].settle(market.job_id, plan.root, plan.accepted_results,
                                  plan.partner_total)
