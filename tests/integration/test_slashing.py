"""Slashing end to end: equivocation reports and committee slash orders, checked by each member.

Real contracts on an embedded EVM, real py-libp2p hosts on loopback, real torch
gradients on the digits dataset: the accepted results are honest gradients,
the offender's are a tampered copy (scaled by 1.01), and "close" results differ
from the honest ones in one float32 bit, which the agreement rule tolerates.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import trio

from ravenp2p import devnet
from ravenp2p.chain.base import Deployment
from ravenp2p.chain.deploy import RAVEN, deploy_contracts
from ravenp2p.chain.devchain import EmbeddedChain
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.identity import NodeIdentity
from ravenp2p.network.libp2p import Libp2pNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.node import Node
from ravenp2p.roles.escrow import sign_result
from ravenp2p.roles.requester import prepare_job
from ravenp2p.roles.slashing import SLASH_PROTOCOL, SlashDesk, report_equivocation
from ravenp2p.training.compute import ComputeProfile, ModelRuntime
from ravenp2p.training.datasets import read_shard
from ravenp2p.training.manifest import JobManifest
from ravenp2p.training.spec import parse_job_spec
from ravenp2p.training.tensors import decode_tensors, digest_of, encode_tensors
from ravenp2p.wire.slash_messages import (
    AcceptedSigner,
    ContradictionRecord,
    SlashRequest,
    SlashSignature,
)

SPEC = """
name = "slashing"
model = "auto"
loss = "cross_entropy"
samples_per_calculation = 64
calculations_per_round = 2
redundancy = 2
calculation = "gradient"
batch_size = 32
[dataset]
source = "digits"
[optimizer]
name = "adam"
lr = 0.003
[stop]
max_rounds = 10
[payment]
price_per_calculation = "0.001"
budget = "1"
"""
MEMBER_STAKES = (150 * RAVEN, 190 * RAVEN, 230 * RAVEN)
WORKER_STAKE = 120 * RAVEN
GAS = 10**19
CALCULATIONS = 3


@dataclass
class World:
    """A deployment with an elected committee of three, staked workers, a job and its results.

    `honest[c]`, `tampered[c]` and `close[c]` are result digests of calculation
    `c`; `blobs` holds their bytes and the manifest's.
    """

    dev: EmbeddedChain
    deployment: Deployment
    members: list[NodeIdentity]
    outsider: NodeIdentity
    workers: list[NodeIdentity]
    offender: NodeIdentity
    equivocator: NodeIdentity
    manifest: JobManifest
    blobs: dict[str, bytes]
    honest: list[str]
    tampered: list[str]
    close: list[str]
    epoch: int

    def chain(self, identity: NodeIdentity) -> Web3Chain:
        return Web3Chain(self.dev.w3, self.deployment, identity.private_key.secret)

    def record(
        self,
        calc: int,
        offered: str,
        signer: NodeIdentity | None = None,
        accepted_signers: list[NodeIdentity] | None = None,
    ) -> ContradictionRecord:
        """The offender's (or `signer`'s) signed `offered` digest against the accepted result."""
        accepted = self.honest[calc]
        signers = self.workers if accepted_signers is None else accepted_signers
        return ContradictionRecord(
            calc=calc,
            digest=offered,
            signature=sign_result(signer or self.offender, self.manifest, calc, offered),
            accepted_digest=accepted,
            accepted=tuple(
                AcceptedSigner(worker=w.peer_id,
                               signature=sign_result(w, self.manifest, calc, accepted))
                for w in signers
            ),
        )


def one_bit_off(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy with the largest element of the largest tensor moved to the next float32."""
    out = {name: array.copy() for name, array in tensors.items()}
    name = max(out, key=lambda n: out[n].size)
    flat = out[name].reshape(-1)
    i = int(np.argmax(np.abs(flat)))
    flat[i] = np.nextafter(flat[i], np.float32(np.inf))
    return out


async def _stake(world: World, owner: Web3Chain) -> int:
    for identity, amount in zip(world.members, MEMBER_STAKES, strict=True):
        chain = world.chain(identity)
        await owner.mint(identity.address, amount)
        await chain.stake(amount)
        await chain.become_candidate()
    for identity in (world.outsider, *world.workers, world.offender, world.equivocator):
        await owner.mint(identity.address, WORKER_STAKE)
        await world.chain(identity).stake(WORKER_STAKE)
    await owner.elect()
    return await owner.current_epoch()


@pytest.fixture(scope="module")
def world() -> World:
    dev = EmbeddedChain()
    identities = [NodeIdentity.generate() for _ in range(8)]
    for identity in identities:
        dev.fund(identity.address, GAS)
    deployment = deploy_contracts(dev.w3, dev.funded_secret)
    requester = NodeIdentity.generate()
    prepared = prepare_job(parse_job_spec(SPEC, source="test"), requester.peer_id,
                           chain=deployment)
    manifest = prepared.manifest
    runtime = ModelRuntime(manifest.spec.model, manifest.data, manifest.spec.loss)
    weights = decode_tensors(prepared.blobs[manifest.initial_weights])
    blobs = {manifest.job_id: manifest.encode()}
    honest, tampered, close = [], [], []
    for calc in range(CALCULATIONS):
        shard = read_shard(prepared.blobs[manifest.shards[calc].digest], manifest.data)
        gradient = runtime.gradient(weights, shard, seed=calc, profile=ComputeProfile())
        for kind, tensors in (
            (honest, gradient),
            (tampered, {n: a * np.float32(1.01) for n, a in gradient.items()}),
            (close, one_bit_off(gradient)),
        ):
            raw = encode_tensors(tensors)
            blobs[digest_of(raw)] = raw
            kind.append(digest_of(raw))
    members, (outsider, w1, w2, offender, equivocator) = identities[:3], identities[3:]
    world = World(dev, deployment, members, outsider, [w1, w2], offender, equivocator,
                  manifest, blobs, honest, tampered, close, epoch=0)
    world.epoch = trio.run(_stake, world, Web3Chain(dev.w3, deployment, dev.funded_secret))
    return world


@pytest.fixture
def isolated(world: World) -> Iterator[World]:
    """The world, with every chain change of the test undone afterwards."""
    snapshot = world.dev.snapshot()
    try:
        yield world
    finally:
        world.dev.revert(snapshot)


@asynccontextmanager
async def desks(world: World, tmp_path: Path) -> AsyncIterator[list[SlashDesk]]:
    """Slash desks on libp2p nodes of the three members, then the outsider, all connected.

    The first member holds the manifest and every result blob, as a master would.
    """
    async with trio.open_nursery() as nursery:
        started: list[SlashDesk] = []
        for i, identity in enumerate([*world.members, world.outsider]):
            config = NodeConfig(data_dir=tmp_path / f"node{i}", control=False)
            node = Node(Libp2pNetwork(identity), identity, config, chain=world.chain(identity))
            desk = SlashDesk(node)
            node.add_role(desk.run)
            await nursery.start(node.run)
            started.append(desk)
        for i, desk in enumerate(started):
            for other in started[i + 1:]:
                await desk.node.network.connect(other.node.network.listen_addrs[0])
        store = started[0].node.store
        for digest, raw in world.blobs.items():
            store.put_verified(digest, raw)
            store.pin(digest)
        try:
            yield started
        finally:
            for desk in started:
                desk.node.stop()
            nursery.cancel_scope.cancel()


async def ask(sender: SlashDesk, receiver: SlashDesk, request: SlashRequest) -> SlashSignature:
    """Send one co-signing request as `sender` and return `receiver`'s answer."""
    node = sender.node
    raw = node.codec.seal(request, context=SLASH_PROTOCOL)
    reply = await node.network.request(receiver.node.peer_id, SLASH_PROTOCOL, raw, timeout=40)
    answer = node.codec.open(reply, context=SLASH_PROTOCOL, from_peer=receiver.node.peer_id)
    assert isinstance(answer.message, SlashSignature)
    return answer.message


async def slashable(world: World, identity: NodeIdentity) -> int:
    stake = await world.chain(world.outsider).stake_of(identity.address)
    return stake.active + stake.unbonding


async def test_an_equivocation_report_slashes_the_worker_and_pays_the_reporter(
    isolated: World, caplog: pytest.LogCaptureFixture
) -> None:
    world = isolated
    reporter = world.chain(world.outsider)
    cheat, manifest = world.equivocator, world.manifest
    a, b = world.honest[0], world.tampered[0]
    first, second = (a, sign_result(cheat, manifest, 0, a)), (b, sign_result(cheat, manifest, 0, b))
    params = await reporter.registry_params()
    treasury = NodeIdentity.from_secret(world.dev.funded_secret).address  # the deployer's
    staked = await slashable(world, cheat)
    reporter_before = await reporter.balance_of(reporter.address)
    treasury_before = await reporter.balance_of(treasury)

    tx = await report_equivocation(reporter, manifest, cheat.peer_id, 0, first, second)

    assert tx is not None and tx.startswith("0x")
    amount = staked * params.equivocation_slash_bps // 10_000
    reward = amount * params.reporter_share_bps // 10_000
    assert amount > 0 and reward > 0
    assert await slashable(world, cheat) == staked - amount
    assert await reporter.balance_of(reporter.address) - reporter_before == reward
    assert await reporter.balance_of(treasury) - treasury_before == amount - reward

    # The same evidence again: the registry refuses it, the report says so and returns None.
    with caplog.at_level(logging.WARNING, logger="ravenp2p.slashing"):
        again = await report_equivocation(reporter, manifest, cheat.peer_id, 0, second, first)
    assert again is None
    assert "EquivocationAlreadySlashed" in caplog.text

    # Evidence that cannot hold is refused before any gas is spent.
    forged = (b, sign_result(world.offender, manifest, 1, b))
    with pytest.raises(ValueError, match="second signature is not"):
        await report_equivocation(reporter, manifest, cheat.peer_id, 1,
                                  (a, sign_result(cheat, manifest, 1, a)), forged)
    with pytest.raises(ValueError, match="no equivocation"):
        await report_equivocation(reporter, manifest, cheat.peer_id, 0, first, first)


async def test_a_checked_slash_order_gets_a_committee_majority_and_executes(
    isolated: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = isolated
    offender = world.offender
    evidence = [world.record(0, world.tampered[0]), world.record(1, world.tampered[1])]
    before = await slashable(world, offender)
    async with desks(world, tmp_path) as (master, b, c, _outsider):
        with trio.fail_after(60):
            tx = await master.request_slash(world.manifest, offender.peer_id, evidence,
                                            [b.node.peer_id, c.node.peer_id])
        assert tx is not None and tx.startswith("0x")
        amount = before // 10  # the default policy: 10% of the slashable stake
        assert await slashable(world, offender) == before - amount

        # The same contradictions cannot be put into a second order (now for less stake).
        reuse = SlashRequest(job=world.manifest.job_id, offender=offender.peer_id,
                             epoch=world.epoch, amount=str((before - amount) // 10),
                             contradictions=tuple(evidence))
        with trio.fail_after(40):
            answer = await ask(master, b, reuse)
        assert not answer.signed
        assert "already in another slash order this member signed" in answer.reason
        with caplog.at_level(logging.WARNING, logger="ravenp2p.slashing"), trio.fail_after(40):
            assert await master.request_slash(world.manifest, offender.peer_id, evidence,
                                              [b.node.peer_id, c.node.peer_id]) is None
        assert "already in another slash order" in caplog.text
        assert await slashable(world, offender) == before - amount
    # A member remembers what it signed across restarts (its data folder).
    assert SlashDesk(b.node).signed_contradictions == b.signed_contradictions != {}


async def test_forged_slash_orders_are_refused_by_the_members_with_the_reason(
    isolated: World, tmp_path: Path
) -> None:
    world = isolated
    offender, manifest = world.offender, world.manifest
    before = await slashable(world, offender)
    allowed = before // 10
    good = (world.record(0, world.tampered[0]), world.record(1, world.tampered[1]))
    order = SlashRequest(job=manifest.job_id, offender=offender.peer_id, epoch=world.epoch,
                         amount=str(allowed), contradictions=good)
    impostor = world.equivocator
    cases = {
        "results that agree": (
            replace(order, contradictions=(world.record(0, world.close[0]),
                                           world.record(1, world.close[1]))),
            "calculation 0: the offender's result agrees with the accepted one",
        ),
        "offender's signature by another key": (
            replace(order, contradictions=(good[0],
                                           world.record(1, world.tampered[1], signer=impostor))),
            "calculation 1: the offender's signature of digest",
        ),
        "accepted signature by another key": (
            replace(order, contradictions=(
                good[0],
                replace(good[1], accepted=(
                    good[1].accepted[0],
                    AcceptedSigner(worker=world.workers[1].peer_id,
                                   signature=sign_result(impostor, manifest, 1,
                                                         world.honest[1])),
                )),
            )),
            "calculation 1: the signature of accepted worker",
        ),
        "too few contradictions": (
            replace(order, contradictions=good[:1]),
            "1 contradiction(s) on distinct calculations; an order needs at least 2",
        ),
        "too few accepted signers": (
            replace(order, contradictions=tuple(
                replace(r, accepted=r.accepted[:1]) for r in good)),
            "fewer than the job's redundancy 2",
        ),
        "too large an amount": (
            replace(order, amount=str(allowed + 1)),
            f"the amount {allowed + 1} exceeds the {allowed} allowed",
        ),
        "an epoch not begun": (
            replace(order, epoch=world.epoch + 1),
            f"epoch {world.epoch + 1} has not begun",
        ),
    }
    async with desks(world, tmp_path) as (master, b, c, outsider):
        with trio.fail_after(50):
            for name, (request, reason) in cases.items():
                answer = await ask(master, b, request)
                assert not answer.signed, name
                assert reason in answer.reason, (name, answer.reason)
            # A peer outside the committee may not ask, nor is it asked to sign.
            answer = await ask(outsider, b, order)
            assert not answer.signed
            assert "the requesting peer" in answer.reason
            assert "is not in the committee of epoch" in answer.reason
            answer = await ask(master, outsider, order)
            assert "this node" in answer.reason and "is not in the committee" in answer.reason
            # The requesting member vets its own order first and does not ask for a forged one.
            agreeing = [world.record(0, world.close[0]), world.record(1, world.close[1])]
            assert await master.request_slash(manifest, offender.peer_id, agreeing,
                                              [b.node.peer_id, c.node.peer_id]) is None
            assert b.signed_contradictions == c.signed_contradictions == {}
            # The genuine order is signed, by a member that checked it.
            answer = await ask(master, c, order)
            assert answer.signed and len(answer.signature) == 65
            # Two epochs later the committee of this one has left office.
            world.dev.advance_time(2 * 3600)
            answer = await ask(master, b, order)
            assert f"orders of epoch {world.epoch} have expired" in answer.reason
    assert await slashable(world, offender) == before


async def test_a_devnet_job_slashes_its_equivocating_and_contradicting_workers() -> None:
    """The master reports an equivocation at once and orders a committee slash at the end."""
    async with devnet.start_devnet(5, byzantine=1, masters=2, economy=True, equivocators=1,
                            seed=3) as net:
        money = net.economy
        assert money is not None
        spec = devnet.devnet_spec()
        await money.owner.mint(net.requester.node.identity.address, spec.budget)
        handle = await net.requester.submit(spec)
        result = await handle.wait(240)
        # The master orders slashes after it published the end of the job.
        with trio.fail_after(120):
            await net.master_named(handle.master).jobs[result.job_id].slashing_done.wait()
        credits = {row.worker: row for row in result.done.credits}
        stakes = {}
        for worker in net.workers:
            info = await money.owner.stake_of(worker.node.identity.address)
            stakes[worker.node.peer_id] = info.active + info.unbonding
    equivocators = [w.node.peer_id for w in net.workers if w.second_result is not None]
    assert len(equivocators) == 1 and len(net.byzantine) == 1
    (cheat,) = equivocators
    assert credits[cheat].excluded
    assert stakes[cheat] == 0  # the devnet's registry takes the whole stake for equivocation
    (liar,) = net.byzantine
    # Two contradictions are the committee's threshold; the order takes 10% of the stake.
    assert credits[liar].mismatches >= 2
    assert stakes[liar] == devnet.WORKER_STAKE - devnet.WORKER_STAKE // 10
    honest = set(stakes) - {cheat, liar}
    assert honest and all(stakes[peer] == devnet.WORKER_STAKE for peer in honest)
