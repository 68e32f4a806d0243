"""The attacks that matter most, on the embedded chain and on a real anvil node alike.

Each test starts from a fresh deployment on each backend (the `backend`
fixture), builds the shared market (staked masters and workers, one open job)
and checks that the contract refuses the attack with its specific custom
error, and that the honest path next to it still works. The rest of the
adversarial cases run on the embedded chain only (test_escrow_adversarial.py,
test_registry_adversarial.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from chain.market import (
    CALCULATION,
    WORKER_STAKE,
    Market,
    build_market,
    equivocate,
    recover_signer,
    sign_result_in,
)

from consensus.abi import keccak256
from consensus.eip712 import Domain, result_digest
from ravenp2p.chain.base import ContractReverted, JobStatusOnChain

if TYPE_CHECKING:
    from chain.conftest import ChainEnv



def refusal(error: pytest.ExceptionInfo[ContractReverted]) -> str:
    return error.value.reason


def credits_of(market: Market) -> dict[str, int]:
    """Two workers' accepted results; the first has a website partner (three leaves)."""
    first, second = market.workers
    return {first.address: 4, second.address: 3}


async def test_settling_twice_is_refused(backend: ChainEnv) -> None:
    market = await build_market(backend)
    master = market.ranked[0]
    plan = await market.settle(credits_of(market))
    escrow_before = await master.balance_of(backend.deployment.escrow)
    master_before = await master.balance_of(master.address)

    with pytest.raises(ContractReverted) as again:
        await master.settle(market.job_id, plan.root, plan.accepted_results, plan.partner_total)

    assert refusal(again) == f"JobNotOpen(job=0x{market.job_id.hex()}, status=2)"
    assert await master.balance_of(backend.deployment.escrow) == escrow_before == plan.payout_total
    assert await master.balance_of(master.address) == master_before


async def test_claim_with_a_forged_proof_is_refused(backend: ChainEnv) -> None:
    market = await build_market(backend)
    plan = await market.settle(credits_of(market))
    worker, other = market.workers
    amount = plan.amount_of(worker.address)
    genuine = plan.proof(worker.address)
    assert genuine, "three leaves: every proof has siblings"
    forgeries = {
        "another leaf's proof": plan.proof(other.address),
        "made-up siblings": [keccak256(b"sibling %d" % i) for i in range(len(genuine))],
        "no proof": [],
        "the root as sibling": [plan.root],
    }
    for name, proof in forgeries.items():
        with pytest.raises(ContractReverted) as forged:
            await market.outsider.claim(market.job_id, worker.address, amount, proof)
        assert refusal(forged) == (
            f"InvalidProof(job=0x{market.job_id.hex()}, account={worker.address}, amount={amount})"
        ), name
    assert not await worker.has_claimed(market.job_id, worker.address)

    await market.outsider.claim(market.job_id, worker.address, amount, genuine)
    assert await worker.balance_of(worker.address) == amount


async def test_a_failed_over_master_can_no_longer_settle(backend: ChainEnv) -> None:
    market = await build_market(backend)
    old, new = market.ranked[0], market.ranked[1]
    backend.advance_time(backend.params.master_timeout)
    await new.take_over(market.job_id)
    assert await new.master_of(market.job_id) == new.address
    plan = await market.plan(credits_of(market))
    args = (market.job_id, plan.root, plan.accepted_results, plan.partner_total)
    not_master = f"NotJobMaster(job=0x{market.job_id.hex()}, caller={old.address})"

    with pytest.raises(ContractReverted) as heartbeat:
        await old.heartbeat(market.job_id)
    assert refusal(heartbeat) == not_master
    with pytest.raises(ContractReverted) as settle:
        await old.settle(*args)
    assert refusal(settle) == not_master

    before = await new.balance_of(new.address)
    settled = await new.settle(*args)
    assert settled.master_fee == plan.master_fee > 0
    assert await new.balance_of(new.address) == before + plan.master_fee
    assert (await new.job(market.job_id)).status == JobStatusOnChain.SETTLED


async def test_equivocation_slash_pays_reporter_and_treasury(backend: ChainEnv) -> None:
    market = await build_market(backend)
    worker, reporter = market.workers[0], market.outsider
    await worker.request_unbond(WORKER_STAKE // 4)  # unbonding stake is slashable too
    registry, treasury = backend.deployment.registry, backend.treasury.address
    registry_before = await reporter.balance_of(registry)
    treasury_before = await reporter.balance_of(treasury)
    await equivocate(market, worker, reporter)

    params = backend.params
    amount = WORKER_STAKE * params.equivocation_slash_bps // 10_000
    reward = amount * params.reporter_share_bps // 10_000
    assert amount > reward > 0
    stake = await worker.stake_of(worker.address)
    assert stake.active + stake.unbonding == WORKER_STAKE - amount
    assert await reporter.balance_of(reporter.address) == reward
    assert await reporter.balance_of(treasury) == treasury_before + amount - reward
    assert await reporter.balance_of(registry) == registry_before - amount


async def test_result_signature_replayed_from_another_chain_is_refused(backend: ChainEnv) -> None:
    market = await build_market(backend)
    worker, reporter = market.workers[0], market.outsider
    deployment = backend.deployment
    here = Domain(deployment.chain_id, deployment.registry)
    elsewhere = Domain(deployment.chain_id + 1, deployment.registry)
    digest_a, digest_b = keccak256(b"weights a"), keccak256(b"weights b")
    identity = market.identity_of(worker)
    signature_a = sign_result_in(identity, here, market.job_id, CALCULATION, digest_a)
    replayed_b = sign_result_in(identity, elsewhere, market.job_id, CALCULATION, digest_b)
    # What the registry recovers from the replayed signature: some key, not the worker's.
    signer = recover_signer(result_digest(here, market.job_id, CALCULATION, digest_b), replayed_b)
    assert signer != worker.address

    with pytest.raises(ContractReverted) as replay:
        await reporter.slash_equivocation(
            worker.address, market.job_id, CALCULATION, digest_a, signature_a, digest_b, replayed_b
        )

    assert refusal(replay) == f"SignatureNotByWorker(worker={worker.address}, signer={signer})"
    assert (await worker.stake_of(worker.address)).active == WORKER_STAKE
    # The same evidence signed in this chain's domain is accepted.
    await reporter.slash_equivocation(
        worker.address,
        market.job_id,
        CALCULATION,
        digest_a,
        signature_a,
        digest_b,
        sign_result_in(identity, here, market.job_id, CALCULATION, digest_b),
    )
    assert (await worker.stake_of(worker.address)).active < WORKER_STAKE
