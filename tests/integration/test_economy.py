"""The devnet's whole economy: stake, election, escrow, training, settlement, claims.

Real py-libp2p hosts on loopback, real torch training on digits, real
contracts on a real EVM: the embedded eth-tester chain, and anvil.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from eth_utils import to_checksum_address
from integration.money import check_money

from consensus.election import rank_masters
from ravenp2p.chain.base import ContractReverted, Deployment, JobStatusOnChain
from ravenp2p.chain.deploy import deploy_contracts, save_deployment
from ravenp2p.chain.devchain import Anvil, EmbeddedChain, anvil_path
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.devnet import (
    RAVEN,
    Devnet,
    devnet_spec,
    run_devnet,
    settle_report,
    start_devnet,
    summarize,
)
from ravenp2p.identity import create_identity
from ravenp2p.roles.escrow import job_key, max_calculations, peer_address
from ravenp2p.roles.master import MasterConfig
from ravenp2p.roles.protocol import SUBMIT_PROTOCOL
from ravenp2p.roles.requester import DEFAULT_CHUNK_SIZE, NoMaster, prepare_job
from ravenp2p.training.spec import JobSpec
from ravenp2p.wire.job_messages import JobReceipt, JobSubmit

JOB_TIMEOUT = 240.0


async def test_devnet_pays_verified_work_on_the_embedded_chain() -> None:
    report = await run_devnet(4, byzantine=1, seed=3, timeout=JOB_TIMEOUT)
    assert report["test_accuracy"] >= 0.95
    assert report["calculations_accepted"] > 0
    check_money(report)
    honest = [row for row in report["workers"] if not row["byzantine"]]
    assert sum(report["payouts"][row["address"]] for row in honest) > 0


@pytest.mark.skipif(anvil_path() is None, reason="anvil is not installed (run `make install`)")
async def test_devnet_pays_verified_work_on_anvil() -> None:
    with Anvil() as anvil:
        report = await run_devnet(3, timeout=JOB_TIMEOUT, chain_backend=anvil)
    assert report["test_accuracy"] >= 0.95
    check_money(report)


async def test_a_paid_job_runs_only_at_its_ranked_master_and_an_unsettled_deposit_returns() -> None:
    async with start_devnet(3, masters=2, economy=True) as net:
        money = net.economy
        assert money is not None
        requester = net.requester
        spec = devnet_spec()
        await money.owner.mint(requester.node.identity.address, spec.budget)
        prepared = await trio.to_thread.run_sync(
            prepare_job, spec, requester.node.peer_id, DEFAULT_CHUNK_SIZE, money.deployment
        )
        manifest = prepared.manifest
        key = job_key(manifest.job_id)
        committee = await money.owner.committee(await money.owner.current_epoch())
        first = rank_masters(key, committee)[0]
        wrong = next(m for m in net.masters if m.node.identity.address != first)
        # The requester does not deposit for a master the escrow would not name...
        with pytest.raises(NoMaster, match="not the job's master"):
            await requester.submit_prepared(prepared, wrong.node.peer_id)
        assert (await money.owner.job(key)).status is JobStatusOnChain.NONE
        # ... and a master refuses a paid job the escrow gives to another.
        chain = requester.node.chain
        assert chain is not None
        spec = manifest.spec
        deadline = await chain.now() + 900
        await chain.create_job(key, spec.price_per_calculation, spec.redundancy,
                               max_calculations(manifest), deadline, spec.budget)
        for digest, raw in prepared.blobs.items():
            requester.node.store.put_verified(digest, raw)
        receipt = await submit(requester.node, wrong.node.peer_id, manifest.job_id,
                               len(manifest.encode()))
        assert not receipt.accepted and "master on-chain is" in receipt.reason
        assert manifest.job_id not in wrong.jobs
        # Nobody settled it: after the deadline the whole deposit goes back.
        with pytest.raises(ContractReverted, match="DeadlineNotPassed"):
            await requester.refund(manifest.job_id)
        money.backend.advance_time(901)
        before = await chain.balance_of(chain.address)
        await requester.refund(manifest.job_id)
        assert await chain.balance_of(chain.address) - before == spec.budget
        assert (await chain.job(key)).status is JobStatusOnChain.REFUNDED


async def submit(node, master: str, job_id: str, size: int) -> JobReceipt:
    """Hand a master a job submission directly and return its receipt."""
    request = node.codec.seal(JobSubmit(manifest=job_id, manifest_size=size),
                              context=SUBMIT_PROTOCOL)
    await node.reach(master)
    reply = await node.network.request(master, SUBMIT_PROTOCOL, request, timeout=60)
    receipt = node.codec.open(reply, context=SUBMIT_PROTOCOL, from_peer=master).message
    assert isinstance(receipt, JobReceipt)
    return receipt


CLI = [str(Path(sys.executable).with_name("ravenp2p"))]


@pytest.mark.skipif(anvil_path() is None, reason="anvil is not installed (run `make install`)")
def test_a_node_daemon_stakes_and_stands_for_master_on_an_external_chain(tmp_path) -> None:
    with Anvil() as anvil:
        deployment = deploy_contracts(anvil.w3, anvil.funded_secret)
        contracts = tmp_path / "contracts.json"
        save_deployment(deployment, contracts)
        identity = create_identity(tmp_path / "node")
        anvil.fund(identity.address, 10**18)
        owner = Web3Chain(anvil.w3, deployment, anvil.funded_secret)
        trio.run(owner.mint, identity.address, 300 * RAVEN)
        partner = "0x" + "5a" * 20
        args = [*CLI, "node", "--data-dir", str(tmp_path / "node"), "--chain", anvil.url,
                "--contracts", str(contracts), "--stake", "200", "--candidate", "--master",
                "--partner", partner]
        log = tmp_path / "node.log"
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if (identity.address in trio.run(owner.candidates)
                        and trio.run(owner.partner_of, identity.address) is not None):
                    break
                assert process.poll() is None, log.read_text()
                time.sleep(0.25)
            stake = trio.run(owner.stake_of, identity.address)
            assert stake.active == 200 * RAVEN
            assert identity.address in trio.run(owner.candidates), log.read_text()
            assert trio.run(owner.partner_of, identity.address) == to_checksum_address(partner)
        finally:
            process.terminate()
            process.wait(timeout=15)
        assert "200000000000000000000 base units staked" in log.read_text()
        assert trio.run(owner.balance_of, identity.address) == 100 * RAVEN


def test_node_chain_settings_are_checked_with_one_line_errors(tmp_path) -> None:
    no_chain = subprocess.run(
        [*CLI, "node", "--data-dir", str(tmp_path / "a"), "--stake", "5"],
        capture_output=True, text=True, timeout=30,
    )
    assert no_chain.returncode == 2
    assert no_chain.stderr.strip().count("\n") == 0 and "need --chain" in no_chain.stderr
    contracts = tmp_path / "contracts.json"
    save_deployment(Deployment(31337, "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20),
                    contracts)
    bad_partner = subprocess.run(
        [*CLI, "node", "--data-dir", str(tmp_path / "p"), "--chain", "http://127.0.0.1:1",
         "--contracts", str(contracts), "--partner", "0x1234"],
        capture_output=True, text=True, timeout=30,
    )
    assert bad_partner.returncode == 2
    assert bad_partner.stderr.strip().splitlines() == [
        "ravenp2p: error: partner: not a 0x-prefixed 20-byte hex address: '0x1234'"
    ]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    unreachable = subprocess.run(
        [*CLI, "node", "--data-dir", str(tmp_path / "b"), "--chain",
         f"http://127.0.0.1:{closed}", "--contracts", str(contracts)],
        capture_output=True, text=True, timeout=60,
    )
    assert unreachable.returncode == 1
    errors = [line for line in unreachable.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in unreachable.stderr
    assert errors[0].startswith("ravenp2p: error:") and f"127.0.0.1:{closed}" in errors[0]


async def funded_spec_without_target(net: Devnet) -> JobSpec:
    """The devnet job with no accuracy target (it runs to its last round), its budget minted."""
    assert net.economy is not None
    spec = devnet_spec()
    spec = dataclasses.replace(spec, stop=dataclasses.replace(spec.stop, target_accuracy=None))
    await net.economy.owner.mint(net.requester.node.identity.address, spec.budget)
    return spec


async def test_a_paid_job_stops_in_time_to_settle_before_its_escrow_deadline() -> None:
    """Training that would outlast the escrow stops early; what was accepted is still paid."""
    # The margin covers a chain clock that runs ahead of the wall clock (blocks come faster
    # than one a second) between two of the master's checks, one per escrow heartbeat.
    config = MasterConfig(min_escrow_time_s=12.0, settle_margin_s=8.0)
    async with start_devnet(3, masters=1, economy=True, master_config=config) as net:
        spec = await funded_spec_without_target(net)
        handle = await net.requester.submit(spec, deadline_s=24)
        result = await handle.wait(JOB_TIMEOUT)
        assert result.done.reason.startswith("stopped before the escrow's deadline")
        assert 0 < result.done.rounds < spec.stop.max_rounds
        assert result.done.settle_tx
        report = summarize(net, result, 0.0)
        report.update(await settle_report(net, result))
    assert sum(report["payouts"].values()) == sum(
        row["accepted"] for row in report["workers"]) * spec.price_per_calculation > 0


async def test_a_master_the_escrow_no_longer_accepts_stops_without_settling() -> None:
    """A master that gave up its stake loses the job: its heartbeat is refused, training stops."""
    config = MasterConfig(chain_heartbeat_s=0.5)
    async with start_devnet(3, masters=1, economy=True, master_config=config) as net:
        spec = await funded_spec_without_target(net)
        handle = await net.requester.submit(spec)
        with trio.fail_after(60):
            while len(handle.rounds) < 2:
                await trio.sleep(0.05)
        master_chain = net.master.node.chain
        assert master_chain is not None
        staked = (await master_chain.stake_of(master_chain.address)).active
        await master_chain.request_unbond(staked)
        result = await handle.wait(JOB_TIMEOUT)
        assert "MasterStakeTooLow" in result.done.reason and not result.done.settle_tx
        assert result.done.rounds < spec.stop.max_rounds
        assert net.economy is not None
        job = await net.economy.owner.job(job_key(result.job_id))
        assert job.status is JobStatusOnChain.OPEN  # the requester refunds after the deadline


async def test_a_requester_elects_a_new_epochs_committee_before_it_deposits() -> None:
    """With no committee yet, the requester elects one first: it never deposits blind."""
    async with start_devnet(3, masters=2, economy=True) as net:
        money = net.economy
        assert money is not None and isinstance(money.backend, EmbeddedChain)
        money.backend.advance_time(3600)  # the devnet's epochs last an hour
        epoch = await money.owner.current_epoch()
        assert not await money.owner.is_elected(epoch)
        spec = devnet_spec()
        await money.owner.mint(net.requester.node.identity.address, spec.budget)
        handle = await net.requester.submit(spec)
        assert await money.owner.is_elected(epoch)
        named = await money.owner.master_of(job_key(handle.job_id))
        assert peer_address(handle.master) == named
        assert (await money.owner.job(job_key(handle.job_id))).epoch == epoch
