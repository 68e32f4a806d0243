"""Training jobs end to end on real py-libp2p hosts on loopback.

A requester, a master and workers (some byzantine, some killed, some without
consent) train on scikit-learn's digits; what the requester measures on its
holdout split, and what the master's signed records say, is checked.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import msgpack
import pytest
import trio

from ravenp2p.devnet import Devnet, devnet_spec, start_devnet
from ravenp2p.identity import create_identity, load_identity
from ravenp2p.network.framing import read_frame, write_frame
from ravenp2p.network.libp2p import Libp2pNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.node import Node
from ravenp2p.roles.master import Master, MasterConfig
from ravenp2p.roles.protocol import RESULT_PROTOCOL, SUBMIT_PROTOCOL
from ravenp2p.roles.requester import prepare_job
from ravenp2p.roles.worker import Worker
from ravenp2p.wire.job_messages import JobReceipt, JobSubmit, ResultAck, ResultHeader

JOB_TIMEOUT = 240.0


def digits_spec(redundancy: int = 3, calculation: str = "local_steps", **stop: object):
    spec = devnet_spec("digits", redundancy, calculation)
    if stop:
        spec = dataclasses.replace(spec, stop=dataclasses.replace(spec.stop, **stop))
    return spec


def aggregated_workers(net: Devnet, job_id: str) -> set[str]:
    """Every worker credited in a round record the requester received."""
    handle = net.requester.jobs[job_id]
    return {w for record in handle.rounds for calc in record.accepted for w in calc.workers}


async def test_four_workers_train_digits_to_95_percent() -> None:
    async with start_devnet(4) as net:
        handle = await net.requester.submit(digits_spec(), net.master.node.peer_id)
        result = await handle.wait(JOB_TIMEOUT)
    assert result.evaluation.accuracy is not None and result.evaluation.accuracy >= 0.95
    assert result.done.reason.startswith("target reached")
    assert result.done.calculations_accepted == 2 * result.done.rounds
    # Every accepted calculation credits exactly R=3 workers, and the credits add up.
    credited = sum(row.accepted for row in result.done.credits)
    assert credited == 3 * result.done.calculations_accepted
    assert all(len(calc.workers) == 3 for r in handle.rounds for calc in r.accepted)
    # Rounds chain: each round starts from the weights the previous one produced.
    for before, after in zip(handle.rounds, handle.rounds[1:], strict=False):
        assert after.previous_weights == before.weights


async def test_a_byzantine_worker_is_never_aggregated() -> None:
    async with start_devnet(4, byzantine=1, seed=3) as net:
        (liar,) = net.byzantine
        handle = await net.requester.submit(digits_spec(), net.master.node.peer_id)
        result = await handle.wait(JOB_TIMEOUT)
        liar_worker = next(w for w in net.workers if w.node.peer_id == liar)
        assert liar_worker.stats.delivered + liar_worker.stats.refused > 0, "it was never asked"
        assert liar not in aggregated_workers(net, result.job_id)
    assert result.evaluation.accuracy is not None and result.evaluation.accuracy >= 0.95
    credits = {row.worker: row for row in result.done.credits}
    assert credits[liar].accepted == 0
    assert credits[liar].mismatches >= 1
    assert result.done.results_rejected >= 1


async def test_a_worker_cancelled_mid_job_does_not_stop_it() -> None:
    """Also the whitepaper's plain path: each calculation is one gradient, the master steps."""
    config = MasterConfig(result_deadline_s=3.0)
    async with start_devnet(4, master_config=config) as net:
        handle = await net.requester.submit(
            digits_spec(calculation="gradient", target_accuracy=None, max_rounds=30),
            net.master.node.peer_id,
        )
        with trio.fail_after(60):
            while len(handle.rounds) < 5:
                await trio.sleep(0.05)
        victim = net.workers[0].node
        victim.stop()
        result = await handle.wait(JOB_TIMEOUT)
    assert result.done.rounds == 30
    assert result.done.reason.startswith("max_rounds")
    late = [r for r in handle.rounds if r.round >= 8]
    assert late and all(victim.peer_id not in c.workers for r in late for c in r.accepted)


async def test_a_node_without_consent_never_receives_work(caplog) -> None:
    caplog.set_level("INFO", logger="ravenp2p.worker")
    async with start_devnet(3) as net, trio.open_nursery() as nursery:
        data_dir = Path(net.nodes[0].config.data_dir).parent / "refuser"
        identity = create_identity(data_dir)
        config = NodeConfig(
            data_dir=data_dir, bootstrap=tuple(net.master.node.network.listen_addrs[:1]),
            share=50, consent=False, control=False,
        )
        node = Node(Libp2pNetwork(identity), identity, config)
        refuser = Worker(node)
        node.add_role(refuser.run)
        await nursery.start(node.run)
        with trio.fail_after(30):
            while node.peer_id not in net.master.node.directory:
                await trio.sleep(0.05)
        handle = await net.requester.submit(
            digits_spec(target_accuracy=None, max_rounds=6), net.master.node.peer_id
        )
        await handle.wait(JOB_TIMEOUT)
        assert refuser.stats.computed == 0 and refuser.stats.declined_jobs >= 1
        assert node.peer_id not in aggregated_workers(net, handle.job_id)
        orders = {w for r in handle.rounds for c in r.accepted for w in c.workers}
        assert node.peer_id not in orders
        node.stop()
    assert any("has not consented" in r.getMessage() for r in caplog.records)


async def test_bad_input_to_the_master_is_refused_and_it_keeps_serving() -> None:
    async with start_devnet(3) as net:
        requester = net.requester.node
        prepared = await trio.to_thread.run_sync(
            prepare_job, digits_spec(), requester.peer_id
        )
        body = msgpack.unpackb(prepared.manifest.encode(), raw=False)
        body["spec"]["payment"]["budget"] = "0.001"
        raw = msgpack.packb(body, use_bin_type=True)
        digest = requester.store.put(raw)
        requester.store.pin(digest)
        request = requester.codec.seal(
            JobSubmit(manifest=digest, manifest_size=len(raw)), context=SUBMIT_PROTOCOL
        )
        master = net.master.node.peer_id
        reply = await requester.network.request(master, SUBMIT_PROTOCOL, request, timeout=30)
        receipt = requester.codec.open(reply, context=SUBMIT_PROTOCOL, from_peer=master).message
        assert isinstance(receipt, JobReceipt) and not receipt.accepted
        assert "budget" in receipt.reason
        # Garbage on the result stream is dropped; the master keeps going.
        stream = await requester.network.open_bulk_stream(master, RESULT_PROTOCOL)
        await write_frame(stream, b"\x00 not an envelope")
        await stream.close()
        assert await send_result(requester, master, "ab" * 32, calc=0) == (
            False, "this master runs no such job"
        )
        # A valid job is still accepted, and results nobody asked for are refused.
        handle = await net.requester.submit(
            digits_spec(target_accuracy=None, max_rounds=3), master
        )
        with trio.fail_after(60):
            while not handle.rounds:
                await trio.sleep(0.01)
        calc = 2 * len(handle.rounds)
        taken, reason = await send_result(requester, master, handle.job_id, calc=calc)
        assert not taken and ("not assigned to this worker" in reason or "not open" in reason)
        result = await handle.wait(JOB_TIMEOUT)
        assert result.done.rounds == 3
        assert requester.peer_id not in {row.worker for row in result.done.credits}


async def send_result(node: Node, master: str, job: str, calc: int) -> tuple[bool, str]:
    """Offer the master a signed result header and return its verdict."""
    header = ResultHeader(
        job=job, calc=calc, round=calc // 2, digest="cd" * 32, size=4, loss=0.0, compute_ms=1.0,
        signature=bytes(65),
    )
    stream = await node.network.open_bulk_stream(master, RESULT_PROTOCOL)
    try:
        await write_frame(stream, node.codec.seal(header, context=RESULT_PROTOCOL))
        reply = await read_frame(stream, 65536)
    finally:
        await stream.close()
    ack = node.codec.open(reply, context=RESULT_PROTOCOL, from_peer=master).message
    assert isinstance(ack, ResultAck)
    return ack.taken, ack.reason


async def test_a_job_without_enough_workers_fails_with_the_reason() -> None:
    async with start_devnet(2, master_config=MasterConfig(worker_wait_s=2.0)) as net:
        handle = await net.requester.submit(digits_spec(redundancy=3), net.master.node.peer_id)
        result = await handle.wait(JOB_TIMEOUT)
    assert result.done.rounds == 0
    assert "fewer than 3 consenting workers" in result.done.reason


async def test_the_job_survives_a_master_restart() -> None:
    """The master stops mid-job; started again on its data dir, it resumes from its checkpoint."""
    async with start_devnet(3) as net, trio.open_nursery() as nursery:
        old = net.master.node
        handle = await net.requester.submit(
            digits_spec(target_accuracy=None, max_rounds=12), old.peer_id
        )
        with trio.fail_after(60):
            while len(handle.rounds) < 4:
                await trio.sleep(0.02)
        old.stop()
        with trio.fail_after(30):
            while old.peer_id in net.requester.node.network.connected_peers():
                await trio.sleep(0.05)
        stopped_after = len(handle.rounds)
        identity = load_identity(old.config.data_dir)
        node = Node(Libp2pNetwork(identity), identity, old.config)
        master = Master(node, MasterConfig(result_deadline_s=3.0))
        node.add_role(master.run)
        await nursery.start(node.run)
        result = await handle.wait(JOB_TIMEOUT)
        node.stop()
    assert stopped_after < 12
    assert result.done.rounds == 12
    assert [r.round for r in handle.rounds] == list(range(12))
    for before, after in zip(handle.rounds, handle.rounds[1:], strict=False):
        assert after.previous_weights == before.weights


@pytest.mark.slow
async def test_a_sigkilled_worker_process_does_not_stop_the_job(tmp_path: Path) -> None:
    config = MasterConfig(result_deadline_s=3.0)
    async with start_devnet(3, master_config=config) as net:
        victim = await net.start_worker_process(tmp_path / "victim", share=20)
        with trio.fail_after(60):
            while victim.peer_id not in net.master.node.directory:
                await trio.sleep(0.1)
        handle = await net.requester.submit(
            digits_spec(target_accuracy=None, max_rounds=20), net.master.node.peer_id
        )
        with trio.fail_after(120):
            while victim.peer_id not in aggregated_workers(net, handle.job_id):
                await trio.sleep(0.02)
        killed_at = len(handle.rounds)
        victim.process.send_signal(signal.SIGKILL)
        result = await handle.wait(JOB_TIMEOUT)
    assert killed_at < 20
    assert result.done.rounds == 20
    assert victim.process.returncode == -signal.SIGKILL
    late = handle.rounds[killed_at + 2 :]
    assert late and all(victim.peer_id not in c.workers for r in late for c in r.accepted)
