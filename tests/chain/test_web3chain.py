"""`Web3Chain` through the `Chain` interface, on the embedded chain and on anvil.

The expected figures come from `consensus/` (election, ranking, settlement),
so these tests also check that the contracts and the Python rules agree.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from eth_utils import to_checksum_address

from consensus.abi import keccak256
from consensus.election import draw_committee, eligible, rank_masters
from consensus.settlement import settle as settle_offchain
from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import (
    ChainError,
    ContractReverted,
    Deployment,
    JobStatusOnChain,
    StakeInfo,
)
from ravenp2p.chain.deploy import (
    RAVEN,
    DeployParams,
    deploy_contracts,
    load_deployment,
    save_deployment,
)
from ravenp2p.chain.devchain import Anvil, connect
from ravenp2p.chain.errors import RevertDecoder, default_decoder
from ravenp2p.chain.web3chain import Web3Chain

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

MASTER_STAKE = 150 * RAVEN
PRICE = 2 * RAVEN
REDUNDANCY = 2
MAX_CALCULATIONS = 5


def max_cost(price: int, redundancy: int, max_calculations: int) -> int:
    """The deposit a job needs (docs/economics.md): full cost plus the 10% margin."""
    c = max_calculations * redundancy * price
    return c + c * 10 // 100


async def make_candidates(env: ChainEnv, count: int = 3) -> list[Web3Chain]:
    """Make the first `count` nodes staked candidates; return their chain objects."""
    masters = env.nodes[:count]
    for master in masters:
        await env.mint(master.address, MASTER_STAKE)
        await master.stake(MASTER_STAKE)
        await master.become_candidate()
    return masters


async def open_job(env: ChainEnv, label: str, lifetime: int = 3600) -> tuple[bytes, Web3Chain]:
    """A job created by a fresh requester (masters must already be candidates)."""
    requester = env.account(f"requester {label}")
    deposit = max_cost(PRICE, REDUNDANCY, MAX_CALCULATIONS)
    await env.mint(requester.address, deposit)
    job_id = keccak256(f"job {label}".encode())
    deadline = await requester.now() + lifetime
    await requester.create_job(job_id, PRICE, REDUNDANCY, MAX_CALCULATIONS, deadline, deposit)
    return job_id, requester


def chain_of(env: ChainEnv, address: str) -> Web3Chain:
    return next(c for c in env.nodes if c.address == address)


async def test_stake_by_permit_in_one_transaction(backend: ChainEnv) -> None:
    node = backend.nodes[0]
    await backend.mint(node.address, 3 * MASTER_STAKE)
    assert await node.balance_of(node.address) == 3 * MASTER_STAKE

    before = node.w3.eth.get_transaction_count(node.address)
    await node.stake(MASTER_STAKE)
    assert node.w3.eth.get_transaction_count(node.address) == before + 1  # no separate approve
    assert await node.stake_of(node.address) == StakeInfo(MASTER_STAKE, 0, 0)
    assert await node.balance_of(node.address) == 2 * MASTER_STAKE
    assert await node.balance_of(backend.deployment.registry) == MASTER_STAKE

    await node.stake(MASTER_STAKE)  # a second permit uses the token's next nonce
    assert (await node.stake_of(node.address)).active == 2 * MASTER_STAKE

    await node.become_candidate()
    assert await node.candidates() == [node.address]

    await node.request_unbond(MASTER_STAKE)
    info = await node.stake_of(node.address)
    assert (info.active, info.unbonding) == (MASTER_STAKE, MASTER_STAKE)
    assert info.release_time == await node.now() + backend.params.unbonding_delay


async def test_registry_params_are_the_deployed_ones(backend: ChainEnv) -> None:
    params = await backend.nodes[0].registry_params()
    p = backend.params
    assert (params.min_master_stake, params.unbonding_delay, params.epoch_length) == (
        p.min_master_stake, p.unbonding_delay, p.epoch_length
    )
    assert (params.committee_size, params.max_candidates) == (p.committee_size, p.max_candidates)
    assert (params.equivocation_slash_bps, params.reporter_share_bps) == (
        p.equivocation_slash_bps, p.reporter_share_bps
    )


async def test_election_matches_the_python_draw(backend: ChainEnv) -> None:
    # Five candidates with different stakes for a committee of three: the draw matters.
    nodes = backend.nodes[:5]
    stakes = {}
    for i, node in enumerate(nodes):
        amount = MASTER_STAKE + i * 40 * RAVEN
        await backend.mint(node.address, amount)
        await node.stake(amount)
        await node.become_candidate()
        stakes[node.address] = amount
    observer = backend.nodes[5]
    epoch = await observer.current_epoch()
    assert not await observer.is_elected(epoch)
    assert await observer.committee(epoch) == []

    await observer.elect()

    assert await observer.is_elected(epoch)
    seed = await observer.epoch_seed(epoch)
    assert len(seed) == 32 and seed != bytes(32)
    table, weights = eligible(await observer.candidates(), stakes, backend.params.min_master_stake)
    expected = draw_committee(table, weights, seed, backend.params.committee_size)
    assert await observer.committee(epoch) == expected
    with pytest.raises(ContractReverted) as refused:
        await observer.elect()
    assert refused.value.reason == f"EpochAlreadyElected(epoch={epoch})"


async def test_job_lifecycle_settle_and_claim(backend: ChainEnv) -> None:
    masters = await make_candidates(backend)
    workers = backend.nodes[3:5]
    partner = backend.nodes[5]
    await workers[0].set_partner(partner.address)
    assert await workers[0].partner_of(workers[0].address) == partner.address
    assert await workers[1].partner_of(workers[1].address) is None

    epoch_before = await masters[0].current_epoch()
    job_id, requester = await open_job(backend, "lifecycle")
    epoch_after = await masters[0].current_epoch()
    deposit = max_cost(PRICE, REDUNDANCY, MAX_CALCULATIONS)
    assert await requester.balance_of(requester.address) == 0
    assert await requester.balance_of(backend.deployment.escrow) == deposit

    job = await requester.job(job_id)
    assert (job.job_id, job.requester, job.price, job.deposit) == (
        job_id, requester.address, PRICE, deposit
    )
    assert (job.redundancy, job.max_calculations) == (REDUNDANCY, MAX_CALCULATIONS)
    assert job.epoch in (epoch_before, epoch_after)  # wall-clock time flows on both chains
    assert (job.status, job.master_rank, job.payout_total, job.claimed_total) == (
        JobStatusOnChain.OPEN, 0, 0, 0
    )
    assert await requester.is_elected(job.epoch)  # createJob elected the epoch
    committee = await requester.committee(job.epoch)
    assert sorted(committee) == sorted(m.address for m in masters)
    ranked = rank_masters(job_id, committee)
    assert await requester.ranked_masters(job_id) == ranked
    assert await requester.master_of(job_id) == ranked[0]
    master = chain_of(backend, ranked[0])

    await master.heartbeat(job_id)
    assert (await master.job(job_id)).last_heartbeat == await master.now()

    credits = {workers[0].address: 4, workers[1].address: 3}
    partners = {w: await master.partner_of(w) for w in credits}
    plan = settle_offchain(credits, PRICE, partners, deposit, REDUNDANCY * MAX_CALCULATIONS)
    treasury = backend.treasury.address
    treasury_before = await master.balance_of(treasury)
    master_before = await master.balance_of(master.address)

    settled = await master.settle(job_id, plan.root, plan.accepted_results, plan.partner_total)

    assert settled.tx_hash.startswith("0x") and len(settled.tx_hash) == 66
    assert (settled.accepted_results, settled.cost, settled.master_fee) == (
        plan.accepted_results, plan.cost, plan.master_fee
    )
    assert (settled.partner_total, settled.protocol_fee, settled.refund) == (
        plan.partner_total, plan.protocol_fee, plan.refund
    )
    assert await master.balance_of(master.address) == master_before + plan.master_fee
    assert await master.balance_of(treasury) == treasury_before + plan.protocol_fee
    assert await master.balance_of(requester.address) == plan.refund
    job = await master.job(job_id)
    assert (job.status, job.root, job.payout_total) == (
        JobStatusOnChain.SETTLED, plan.root, plan.payout_total
    )

    # Anyone may submit a claim; the amount goes to the account of the leaf.
    for account, amount in plan.leaves.items():
        assert not await requester.has_claimed(job_id, account)
        before = await requester.balance_of(account)
        await requester.claim(job_id, account, amount, plan.proof(account))
        assert await requester.balance_of(account) == before + amount
        assert await requester.has_claimed(job_id, account)
    job = await master.job(job_id)
    assert job.claimed_total == job.payout_total
    assert await master.balance_of(backend.deployment.escrow) == 0


async def test_refund_after_deadline(backend: ChainEnv) -> None:
    await make_candidates(backend)
    job_id, requester = await open_job(backend, "refund", lifetime=600)
    deposit = max_cost(PRICE, REDUNDANCY, MAX_CALCULATIONS)
    job = await requester.job(job_id)

    with pytest.raises(ContractReverted) as early:
        await requester.refund(job_id)
    assert early.value.reason == (
        f"DeadlineNotPassed(job=0x{job_id.hex()}, deadline={job.deadline})"
    )

    backend.advance_time(601)
    assert await requester.now() > job.deadline
    await requester.refund(job_id)
    assert await requester.balance_of(requester.address) == deposit
    assert (await requester.job(job_id)).status == JobStatusOnChain.REFUNDED


async def test_take_over_after_master_timeout(chain_env: ChainEnv) -> None:
    await make_candidates(chain_env)
    job_id, requester = await open_job(chain_env, "take over")
    ranked = await requester.ranked_masters(job_id)
    first, second = chain_of(chain_env, ranked[0]), chain_of(chain_env, ranked[1])
    job = await requester.job(job_id)
    timeout = chain_env.params.master_timeout

    with pytest.raises(ContractReverted) as early:
        await second.take_over(job_id)
    assert early.value.reason == (
        f"TakeOverTooEarly(job=0x{job_id.hex()}, allowedAt={job.last_heartbeat + timeout})"
    )

    chain_env.advance_time(timeout)
    await second.take_over(job_id)
    assert await second.master_of(job_id) == second.address
    assert (await second.job(job_id)).master_rank == 1
    with pytest.raises(ContractReverted) as stale:
        await first.heartbeat(job_id)
    assert stale.value.reason == f"NotJobMaster(job=0x{job_id.hex()}, caller={first.address})"


async def test_equivocation_evidence_signed_by_sign_result_slashes(chain_env: ChainEnv) -> None:
    worker, reporter = chain_env.nodes[0], chain_env.nodes[1]
    await chain_env.mint(worker.address, MASTER_STAKE)
    await worker.stake(MASTER_STAKE)
    job_id = keccak256(b"equivocation")
    digest_a, digest_b = keccak256(b"result a"), keccak256(b"result b")
    signature_a = worker.sign_result(job_id, 7, digest_a)
    signature_b = worker.sign_result(job_id, 7, digest_b)
    assert len(signature_a) == 65 and signature_a[64] in (27, 28)

    await reporter.slash_equivocation(
        worker.address, job_id, 7, digest_a, signature_a, digest_b, signature_b
    )

    slashed = MASTER_STAKE * chain_env.params.equivocation_slash_bps // 10_000
    reward = slashed * chain_env.params.reporter_share_bps // 10_000
    assert (await worker.stake_of(worker.address)).active == MASTER_STAKE - slashed
    assert await reporter.balance_of(reporter.address) == reward
    assert await reporter.balance_of(chain_env.treasury.address) == slashed - reward


async def test_slash_order_signed_by_a_committee_majority(chain_env: ChainEnv) -> None:
    members = await make_candidates(chain_env)
    offender = chain_env.nodes[4]
    await chain_env.mint(offender.address, MASTER_STAKE)
    await offender.stake(MASTER_STAKE)
    await members[0].elect()
    epoch = await members[0].current_epoch()
    evidence = keccak256(b"withheld results")
    amount = 40 * RAVEN
    signatures = [m.sign_slash_order(offender.address, amount, evidence, epoch) for m in members]

    with pytest.raises(ContractReverted) as too_few:
        await offender.slash_by_committee(offender.address, amount, evidence, epoch, signatures[:1])
    assert too_few.value.reason == "NotEnoughSignatures(signers=1, required=2)"

    await offender.slash_by_committee(offender.address, amount, evidence, epoch, signatures[:2])
    assert (await offender.stake_of(offender.address)).active == MASTER_STAKE - amount
    assert await offender.balance_of(chain_env.treasury.address) == amount


async def test_same_refusal_reads_the_same_on_both_backends(
    both_backends: tuple[ChainEnv, ChainEnv],
) -> None:
    reasons = []
    for env in both_backends:
        await make_candidates(env)
        job_id, requester = await open_job(env, "refusal")
        with pytest.raises(ContractReverted) as refused:
            await requester.settle(job_id, keccak256(b"root"), 1, 0)
        assert (refused.value.contract, refused.value.function) == ("JobEscrow", "settle")
        reasons.append(refused.value.reason)
    # The accounts are deterministic, so the refusal names the same job and caller on both.
    assert reasons[0] == f"NotJobMaster(job=0x{job_id.hex()}, caller={requester.address})"
    assert reasons[1] == reasons[0]


async def test_transactions_are_logged_with_their_receipt(
    chain_env: ChainEnv, caplog: pytest.LogCaptureFixture
) -> None:
    node = chain_env.nodes[0]
    with caplog.at_level(logging.INFO, logger="ravenp2p.chain"):
        tx_hash = await node.set_partner(chain_env.nodes[1].address)
    records = [r.getMessage() for r in caplog.records if r.name == "ravenp2p.chain"]
    assert any(
        m.startswith("StakeRegistry.setPartner mined") and tx_hash in m and "gas used" in m
        for m in records
    ), records


async def test_stale_nonce_is_resynced(chain_env: ChainEnv) -> None:
    node = chain_env.nodes[0]
    secret = chain_env.identities[0].private_key.secret
    twin = Web3Chain(node.w3, chain_env.deployment, secret)
    await twin.set_partner(chain_env.nodes[1].address)  # node's cached nonce is now stale
    await node.set_partner(chain_env.nodes[2].address)
    assert await node.partner_of(node.address) == chain_env.nodes[2].address


async def test_bad_arguments_are_named(chain_env: ChainEnv) -> None:
    node = chain_env.nodes[0]
    with pytest.raises(ValueError, match="job_id must be 32 bytes, got 31"):
        await node.heartbeat(bytes(31))
    with pytest.raises(ValueError, match="amount must be between 0 and"):
        await node.stake(-1)
    with pytest.raises(ValueError, match="partner is not a 20-byte hex address"):
        await node.set_partner("0x1234")
    with pytest.raises(ValueError, match=r"signatures\[1\] must be a 65-byte signature"):
        await node.slash_by_committee(node.address, 1, bytes(32), 0, [bytes(65), bytes(64)])


async def test_only_the_owner_mints(chain_env: ChainEnv) -> None:
    node = chain_env.nodes[0]
    with pytest.raises(ContractReverted) as refused:
        await node.mint(node.address, RAVEN)
    assert refused.value.contract == "RavenToken"
    assert refused.value.function == "mint"
    assert refused.value.reason == f"OwnableUnauthorizedAccount(account={node.address})"


async def test_a_transaction_without_gas_money_is_a_chain_error(backend: ChainEnv) -> None:
    secret = keccak256(b"an account nobody funded")
    poor = Web3Chain(backend.dev.w3, backend.deployment, secret)
    with pytest.raises(ChainError, match=r"^StakeRegistry\.setPartner: .* refused") as failed:
        await poor.set_partner(backend.nodes[0].address)
    assert not isinstance(failed.value, ContractReverted)


def test_wrong_chain_or_missing_contracts_are_refused(chain_env: ChainEnv) -> None:
    secret = bytes(32 * [7])
    dep = chain_env.deployment
    other_chain = Deployment(dep.chain_id + 1, dep.token, dep.registry, dep.escrow)
    with pytest.raises(ChainError, match=f"deployment is for chain id {dep.chain_id + 1}"):
        Web3Chain(chain_env.dev.w3, other_chain, secret)
    nowhere = Deployment(dep.chain_id, dep.token, dep.registry, chain_env.treasury.address)
    with pytest.raises(ChainError, match=r"no contract at 0x\w+ \(the deployment's JobEscrow\)"):
        Web3Chain(chain_env.dev.w3, nowhere, secret)


def test_deploy_reports_a_constructor_refusal(backend: ChainEnv) -> None:
    deployer = backend.identities[0].private_key.secret
    with pytest.raises(ContractReverted) as refused:
        deploy_contracts(backend.dev.w3, deployer, DeployParams(committee_size=0))
    assert (refused.value.contract, refused.value.function) == ("StakeRegistry", "constructor")
    assert refused.value.reason == 'InvalidParameter(parameter="committeeSize", value=0)'


def test_anvil_without_a_binary_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "anvil"
    with pytest.raises(ChainError, match=f"no executable anvil at {re.escape(str(missing))}"):
        Anvil(missing).start()


def test_unreachable_node_is_named() -> None:
    url = "http://127.0.0.1:9"  # the discard port: nothing answers JSON-RPC there
    with pytest.raises(ChainError, match=re.escape(url)):
        connect(url)
    with pytest.raises(ChainError, match="expected 'embedded' or an http"):
        connect("ftp://example.invalid")


def test_deployment_file_round_trip(chain_env: ChainEnv, tmp_path: Path) -> None:
    path = tmp_path / "deployment.json"
    save_deployment(chain_env.deployment, path)
    assert load_deployment(path) == chain_env.deployment
    path.write_text('{"chain_id": 1, "token": "0x12"}')
    with pytest.raises(ChainError, match=r"deployment file \S+: deployment: missing 'registry'"):
        load_deployment(path)
    with pytest.raises(ChainError, match="no deployment file at"):
        load_deployment(path.with_name("absent.json"))


def test_revert_data_decoding() -> None:
    decoder = default_decoder()
    error_string = bytes.fromhex("08c379a0") + (32).to_bytes(32, "big") + (4).to_bytes(
        32, "big"
    ) + b"nope".ljust(32, b"\0")
    assert decoder.decode(error_string) == "nope"
    panic = bytes.fromhex("4e487b71") + (0x11).to_bytes(32, "big")
    assert decoder.decode(panic) == "Panic(0x11: arithmetic overflow)"
    assert decoder.decode(b"") == "reverted without a reason"
    assert decoder.decode(bytes.fromhex("deadbeef")).startswith("unknown error 0xdeadbeef")
    custom = RevertDecoder([load_artifact("JobEscrow").abi])
    selector = keccak256(b"AlreadyClaimed(bytes32,address)")[:4]
    account = "0x" + "ab" * 20
    data = selector + bytes(range(32)) + bytes(12) + bytes.fromhex(account[2:])
    assert custom.decode(data) == (
        f"AlreadyClaimed(job=0x{bytes(range(32)).hex()}, account={to_checksum_address(account)})"
    )
