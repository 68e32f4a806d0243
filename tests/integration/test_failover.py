"""Master failover on real libp2p hosts and a real chain: no accepted work lost or paid twice.

The job's master dies mid-job; the next-ranked committee member takes the job
over on-chain, resumes from the replica of the last round it was handed, and
finishes and settles the job with payouts for the work accepted before and
after the failover.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from integration.money import check_money
from netns import Lan, netns_unavailable

from ravenp2p.chain.base import ContractReverted
from ravenp2p.chain.devchain import Anvil, anvil_path
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.devnet import (
    Devnet,
    Placement,
    devnet_spec,
    kill_master_at_round,
    settle_report,
    start_devnet,
    summarize,
)
from ravenp2p.identity import load_identity
from ravenp2p.network.libp2p import Libp2pNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.node import Node
from ravenp2p.roles.escrow import job_key
from ravenp2p.roles.master import Master
from ravenp2p.roles.protocol import job_topic
from ravenp2p.roles.requester import JobHandle, JobResult

CLI = [str(Path(sys.executable).with_name("ravenp2p"))]
JOB_TIMEOUT = 300.0
RESUME_LIMIT_S = 15.0


def check_no_work_lost_or_paid_twice(handle: JobHandle, result: JobResult) -> None:
    """Every round has one record; each calculation is accepted once; credits are the records'."""
    rounds = [record.round for record in handle.rounds]
    assert rounds == list(range(result.done.rounds))
    assert not handle.rewritten  # no round's work was replaced by other work
    calcs = [accepted.calc for record in handle.rounds for accepted in record.accepted]
    assert len(calcs) == len(set(calcs)) == result.done.calculations_accepted
    credited = Counter(
        worker for record in handle.rounds for accepted in record.accepted
        for worker in accepted.workers
    )
    assert {row.worker: row.accepted for row in result.done.credits if row.accepted} == credited


def test_devnet_kill_master_at_reports_the_failover_and_pays_to_the_wei() -> None:
    """`ravenp2p devnet --kill-master-at 2`: the job survives its master and settles."""
    done = subprocess.run(
        [*CLI, "devnet", "--nodes", "3", "--kill-master-at", "2", "--json"],
        capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    (failover,) = report["failovers"]
    assert set(failover) == {"round", "old_master", "new_master", "seconds_to_resume"}
    assert failover["old_master"] != failover["new_master"] == report["master"]
    assert failover["round"] >= 3  # rounds 0..2 were recorded, hence replicated, before the kill
    assert 0 < failover["seconds_to_resume"] < RESUME_LIMIT_S
    assert report["test_accuracy"] >= 0.95
    check_money(report)  # work accepted under both masters is paid to the wei, once


def test_kill_master_at_needs_a_committee_to_fail_over_to() -> None:
    done = subprocess.run([*CLI, "devnet", "--masters", "1", "--kill-master-at", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ravenp2p: error: --kill-master-at needs the economy and at least 2 masters: failover "
        "goes to the next master of the job's committee"
    ]


async def kill_at(
    net: Devnet, handle: JobHandle, round_: int, kill: Callable[[str], None] | None = None
) -> tuple[str, float]:
    """Kill (or cut off) the job's master after round `round_`: (its peer id, when)."""
    killed: list[tuple[str, float]] = []
    with trio.fail_after(JOB_TIMEOUT):
        await kill_master_at_round(net, handle, round_, killed, kill)
    return killed[0]


async def wait_for_failover(handle: JobHandle) -> None:
    with trio.fail_after(JOB_TIMEOUT):
        while not handle.failovers:
            await handle.progress.wait()


async def funded_job(net: Devnet) -> JobHandle:
    assert net.economy is not None
    spec = devnet_spec()
    await net.economy.owner.mint(net.requester.node.identity.address, spec.budget)
    return await net.requester.submit(spec)


async def check_settle_refused(anvil: Anvil, net: Devnet, data_dir: Path, job_id: str) -> None:
    """The replaced master's own key cannot settle the job: the escrow names another master."""
    assert net.economy is not None
    old = Web3Chain(anvil.w3, net.economy.deployment,
                    load_identity(data_dir).private_key.secret)
    with pytest.raises(ContractReverted, match="NotJobMaster"):
        await old.settle(job_key(job_id), b"\x01" * 32, 0, 0)


def check_failover(handle: JobHandle, killed: str, at: float) -> None:
    assert len(handle.failovers) == 1
    failover = handle.failovers[0]
    assert failover.old_master == killed != failover.new_master == handle.master
    assert 0 < failover.at - at < RESUME_LIMIT_S


@pytest.mark.skipif(anvil_path() is None, reason="anvil is not installed (run `make install`)")
async def test_a_sigkilled_master_process_is_replaced_and_the_job_settles() -> None:
    with Anvil() as anvil:
        placements = (Placement(), Placement())
        async with start_devnet(3, masters=2, economy=True, chain_backend=anvil,
                                master_processes=placements) as net:
            handle = await funded_job(net)
            killed, at = await kill_at(net, handle, 2)
            result = await handle.wait(JOB_TIMEOUT)
            report: dict[str, Any] = summarize(net, result, 0.0)
            report.update(await settle_report(net, result))
            process = next(p for p in net.master_processes if p.peer_id == killed)
            assert process.process.returncode == -signal.SIGKILL
    check_failover(handle, killed, at)
    assert result.evaluation.accuracy is not None and result.evaluation.accuracy >= 0.95
    check_no_work_lost_or_paid_twice(handle, result)
    check_money(report)


@pytest.mark.skipif(anvil_path() is None, reason="anvil is not installed (run `make install`)")
async def test_a_master_cut_off_the_network_is_replaced_and_its_later_records_rejected() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces: {reason}")
    with Lan() as lan, Anvil(host=lan.host_ip) as anvil:
        members = [lan.add_namespace(), lan.add_namespace()]
        placements = tuple(Placement(tuple(m.exec_prefix), m.ip) for m in members)
        async with start_devnet(3, masters=2, economy=True, chain_backend=anvil,
                                master_processes=placements, listen_host=lan.host_ip) as net:
            handle = await funded_job(net)
            member_of = dict(zip((p.peer_id for p in net.master_processes), members, strict=True))
            killed, at = await kill_at(net, handle, 2, lambda peer: member_of[peer].cut())
            await wait_for_failover(handle)
            old_dir = next(p.log_path.parent for p in net.master_processes
                           if p.peer_id == killed)
            await check_settle_refused(anvil, net, old_dir, handle.job_id)
            member_of[killed].heal()
            # Back on the network, the old master still speaks for the job until it learns it
            # was replaced: peers reject what it says, and the escrow refuses its heartbeat.
            old_log = old_dir / "node.log"
            with trio.fail_after(60):
                while "this master steps down" not in old_log.read_text():
                    await trio.sleep(0.5)
            result = await handle.wait(JOB_TIMEOUT)
            report: dict[str, Any] = summarize(net, result, 0.0)
            report.update(await settle_report(net, result))
            stale = handle.stale_messages + sum(w.stats.stale_messages for w in net.workers)
    check_failover(handle, killed, at)
    assert stale > 0
    check_no_work_lost_or_paid_twice(handle, result)
    check_money(report)


@pytest.mark.skipif(anvil_path() is None, reason="anvil is not installed (run `make install`)")
async def test_a_replaced_master_that_comes_back_steps_down_and_is_ignored() -> None:
    with Anvil() as anvil:
        async with start_devnet(3, masters=2, economy=True, chain_backend=anvil,
                                master_processes=(Placement(), Placement())) as net:
            assert net.economy is not None
            handle = await funded_job(net)
            killed, _ = await kill_at(net, handle, 1)
            await wait_for_failover(handle)
            # It comes back: the same key, data dir and chain account, through the requester.
            data_dir = next(p.log_path.parent for p in net.master_processes
                            if p.peer_id == killed)
            identity = load_identity(data_dir)
            chain = Web3Chain(anvil.w3, net.economy.deployment, identity.private_key.secret)
            config = NodeConfig(data_dir=data_dir, control=False,
                                bootstrap=tuple(net.requester.node.network.listen_addrs[:1]))
            node = Node(Libp2pNetwork(identity, config.listen), identity, config, chain=chain)
            await comes_back(net, handle, node)
            result = await handle.wait(JOB_TIMEOUT)
    check_no_work_lost_or_paid_twice(handle, result)


async def comes_back(net: Devnet, handle: JobHandle, node: Node) -> None:
    """The replaced master's node runs again: it steps down, and what it says is rejected."""
    job_id = handle.job_id
    master = Master(node)
    node.add_role(master.run)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        # It resumes the job from its checkpoint, reads that the escrow names another
        # master, and steps down without a word on the job's topic.
        with trio.fail_after(60):
            for _poll in itertools.count():
                if job_id in master.jobs and master.jobs[job_id].done.is_set():
                    break
                await trio.sleep(0.2)
        assert master.jobs[job_id].state == "replaced"
        # Whatever it still says about the job is rejected: a round record of its own ...
        topic = job_topic(job_id)
        await node.topics.subscribe(topic)
        with trio.fail_after(30):
            await node.reach(net.requester.node.peer_id)
        before = handle.stale_messages
        last = handle.rounds[-1]
        forged = dataclasses.replace(last, round=last.round + 1, accepted=())
        await node.topics.publish(topic, forged)
        with trio.fail_after(60):
            for _poll in itertools.count():
                if handle.stale_messages > before:
                    break
                await trio.sleep(0.2)
        # ... and its settlement: the escrow refuses it.
        assert node.chain is not None
        with pytest.raises(ContractReverted, match="NotJobMaster"):
            await node.chain.settle(job_key(job_id), b"\x01" * 32, 0, 0)
        node.stop()
    assert forged not in handle.rounds
