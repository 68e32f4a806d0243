"""The simulated world: real nodes and roles on a `MemoryHub`, a model chain, churn and attacks.

Every peer is a `ravenp2p.node.Node` with the roles its kind runs in the
daemon (`Master` for masters, `Requester` for requesters, `Worker` for
workers) over a `MemoryNetwork`, with a `ModelChain` account. Nothing of the
protocol is re-implemented here: the world only decides who exists, how they
are linked, when they leave or crash, which workers lie, and when jobs are
submitted; it watches the roles' own state for the metrics.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ravenp2p.chain.deploy import DeployParams
from ravenp2p.clock import TrioClock
from ravenp2p.identity import NodeIdentity
from ravenp2p.network.memory import LinkModel, MemoryHub, MemoryNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.node import Node
from ravenp2p.roles.faults import FAULT_KINDS, ByzantineResults, FaultPool
from ravenp2p.roles.master import Master, MasterConfig
from ravenp2p.roles.requester import JobHandle, Requester
from ravenp2p.roles.worker import Tensors, Worker, WorkerConfig
from ravenp2p.topics import TopicConfig
from ravenp2p.wire.job_messages import CalculationOrder
from sims.compute import ComputeLedger, SimCalculator
from sims.model_chain import ChainState, ModelChain
from sims.scenario import Device, Distribution, JobEntry, Scenario

log = logging.getLogger("ravenp2p.sims")

RAVEN = 10**18
START_EPOCH = 1_700_000_000.0
"""Unix time at virtual time zero (what signatures and the chain see)."""
MBIT = 1_000_000 / 8
JOIN_SPREAD_S = 5.0
"""Workers of the initial population start within this many virtual seconds."""


@dataclass(frozen=True)
class FailoverEvent:
    """A master crash and, if it came, the takeover of the job it ran."""

    crashed_at: float
    master: str
    job: str | None = None


@dataclass
class SimPeer:
    """One simulated peer: its node, its role object and its fate."""

    index: int
    kind: str
    identity: NodeIdentity
    node: Node
    role: Master | Requester | Worker
    device: Device | None = None
    byzantine: bool = False
    joined_at: float = 0.0
    left_at: float | None = None
    first_bad_at: float | None = None
    """When this (byzantine) worker first signed a wrong result."""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stake: int = 0

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def alive(self) -> bool:
        return self.left_at is None


class Colluding:
    """A byzantine group's tamperer: every member returns minus the honest result.

    Members' results agree with each other (within the low-bit differences of
    honest compute) and contradict honest workers: a group that gets R seats
    of one calculation has its result accepted. Gradient ascent, the most
    harmful of simple lies.
    """

    def __call__(self, order: CalculationOrder, gradient: Tensors) -> Tensors:
        return {name: -tensor for name, tensor in gradient.items()}


class World:
    """Builds and runs the peers of a scenario inside one trio run (virtual time)."""

    def __init__(self, scenario: Scenario, data_dir: Path) -> None:
        self.scenario = scenario
        self.data_dir = data_dir
        self.rng = random.Random(scenario.seed)
        self.hub = MemoryHub(seed=self.rng.getrandbits(32), dht_k=scenario.network.dht_k,
                             hop_resolution_s=scenario.network.hop_resolution_ms / 1000)
        self.clock = TrioClock(START_EPOCH)
        """Unix time following trio's (virtual) clock; the world is built at virtual time 0."""
        treasury = NodeIdentity.from_secret(hashlib.sha256(b"ravenp2p sim treasury").digest())
        params = DeployParams(
            master_timeout=scenario.master_timeout_s,
            committee_size=min(3, scenario.network.masters),
            epoch_length=max(3600, int(scenario.duration_s) + 3600),
        )
        self.chain = ChainState.from_deploy_params(
            self.clock.now, treasury.address, params, with_price_feed=False
        )
        self.ledger = ComputeLedger()
        self.pool = FaultPool()
        self.peers: list[SimPeer] = []
        self.masters: list[SimPeer] = []
        self.requesters: list[SimPeer] = []
        self.workers: list[SimPeer] = []
        self.jobs: list[JobHandle] = []
        self.submit_errors: list[str] = []
        self.crashes: list[FailoverEvent] = []
        self.departures = {"graceful": 0, "crash": 0}
        self.arrivals = 0
        self._nursery: trio.Nursery | None = None
        self._device_weights = [d.weight for d in scenario.compute.devices]

    # --- building peers ------------------------------------------------------------
    def _identity(self) -> NodeIdentity:
        secret = hashlib.sha256(f"ravenp2p sim {self.scenario.seed} peer "
                                f"{len(self.peers)}".encode()).digest()
        return NodeIdentity.from_secret(secret)

    def _link(self) -> LinkModel:
        net = self.scenario.network
        return LinkModel(
            latency=net.latency_ms.sample(self.rng) / 1000.0,
            bandwidth=net.bandwidth_mbps.sample(self.rng) * MBIT,
            loss=min(1.0, net.loss.sample(self.rng)),
        )

    def _bootstrap(self) -> tuple[str, ...]:
        """A live master to join through (new peers spread over them), or none for the first."""
        alive = [m for m in self.masters if m.alive and m.node.network.listen_addrs]
        if not alive:
            return ()
        return (alive[len(self.peers) % len(alive)].node.network.listen_addrs[0],)

    def _node(self, identity: NodeIdentity, kind: str, share: int) -> Node:
        net = self.scenario.network
        config = NodeConfig(
            data_dir=self.data_dir / f"peer{len(self.peers)}", share=share,
            bootstrap=self._bootstrap(),
            consent=share > 0, control=False, announce_interval_s=net.announce_interval_s,
            peer_expiry_s=max(90.0, 4.5 * net.announce_interval_s),
            follow_peers=kind != "worker" or net.worker_directory,
            topics=TopicConfig(sync_interval_s=net.topic_sync_interval_s,
                               max_sync_interval_s=net.topic_sync_max_interval_s,
                               sync_fanout=net.topic_sync_fanout),
        )
        network = MemoryNetwork(self.hub, identity)
        self.hub.set_access_link(identity.peer_id, self._link())
        chain = self.chain.account(identity)
        return Node(network, identity, config, clock=self.clock,
                    chain=chain, rng=random.Random(self.rng.getrandbits(64)))

    async def add_master(self) -> SimPeer:
        """A master candidate: staked, standing for the committee, running `Master`."""
        identity = self._identity()
        node = self._node(identity, "master", 0)
        stake = self._stake(self.scenario.stake.master)
        self.chain.mint(identity.address, stake)
        chain = node.chain
        assert isinstance(chain, ModelChain)
        await chain.stake(stake)
        await chain.become_candidate()
        config = MasterConfig(result_deadline_s=self.scenario.result_deadline_s,
                              worker_wait_s=300.0,
                              heartbeat_interval_s=self.scenario.master_heartbeat_s)
        peer = SimPeer(len(self.peers), "master", identity, node, Master(node, config),
                       stake=stake)
        await self._start(peer)
        self.masters.append(peer)
        return peer

    async def add_requester(self) -> SimPeer:
        """A requester with tokens for twice the budget of the jobs it may submit."""
        identity = self._identity()
        node = self._node(identity, "requester", 0)
        budget = sum(entry.spec.budget * entry.count for entry in self.scenario.jobs)
        self.chain.mint(identity.address, budget * 2 + RAVEN)
        peer = SimPeer(len(self.peers), "requester", identity, node, Requester(node))
        await self._start(peer)
        self.requesters.append(peer)
        return peer

    async def add_worker(self, byzantine: bool) -> SimPeer:
        """A consenting worker with a drawn device, share and stake; a liar if `byzantine`."""
        compute = self.scenario.compute
        identity = self._identity()
        share = max(1, min(100, round(compute.share.sample(self.rng))))
        node = self._node(identity, "worker", share)
        device = self.rng.choices(compute.devices, weights=self._device_weights)[0]
        stake = self._stake(self.scenario.stake.worker)
        if stake:
            self.chain.mint(identity.address, stake)
            assert node.chain is not None
            await node.chain.stake(stake)
        strategy = self.scenario.byzantine.strategy
        seed = self.rng.getrandbits(64)
        calculator = SimCalculator(
            self.ledger, speed=device.speed, jitter=compute.jitter, mode=compute.mode,
            honest_noise=compute.honest_noise, seed=seed,
            withhold=byzantine and strategy == "withholding",
        )
        worker = Worker(node, WorkerConfig(fetch_timeout_s=120.0), calculator=calculator)
        peer = SimPeer(len(self.peers), "worker", identity, node, worker, device=device,
                       byzantine=byzantine, stake=stake)
        if byzantine and strategy != "withholding":
            worker.tamper = self._tamperer(peer, strategy, seed)
        await self._start(peer)
        self.workers.append(peer)
        return peer

    def _tamperer(
        self, peer: SimPeer, strategy: str, seed: int
    ) -> Callable[[CalculationOrder, Tensors], Tensors]:
        if strategy == "colluding":
            lie: Callable[[CalculationOrder, Tensors], Tensors] = Colluding()
        else:
            kinds = FAULT_KINDS if strategy == "mixed" else (strategy,)
            lie = ByzantineResults(seed=seed, pool=self.pool, kinds=kinds)

        def tamper(order: CalculationOrder, gradient: Tensors) -> Tensors:
            if peer.first_bad_at is None:
                peer.first_bad_at = trio.current_time()
            return lie(order, gradient)

        return tamper

    def _stake(self, distribution: Distribution) -> int:
        return int(distribution.sample(self.rng) * 1000) * RAVEN // 1000

    async def _start(self, peer: SimPeer) -> None:
        assert self._nursery is not None
        peer.node.add_role(peer.role.run)
        peer.joined_at = trio.current_time()
        self.peers.append(peer)
        await self._nursery.start(self._run_peer, peer)
        self._nursery.start_soon(self._connect, peer)

    async def _run_peer(self, peer: SimPeer, *, task_status: trio.TaskStatus[None]) -> None:
        with peer.scope:  # cancelled: a crash
            await peer.node.run(task_status=task_status)

    async def _connect(self, peer: SimPeer) -> None:
        """Dial a few random live peers; a worker also dials every master, or
        `master_links` of them (they assign to the workers they are connected to). The
        node itself joins through its bootstrap master and announces itself there.

        Masters and requesters link up with `degree` others of their kind, not all:
        they relay the peers topic, and a clique would carry every announcement over
        each of its edges.
        """
        degree = self.scenario.network.degree
        if peer.kind == "worker":
            targets = [m for m in self.masters if m.alive]
            links = self.scenario.network.master_links
            if links and len(targets) > links:
                targets = self.rng.sample(targets, links)
            pool = self.workers
        else:
            targets = []
            pool = [*self.masters, *self.requesters]
        # A few draws from the whole list (dead or self are skipped): O(degree), not O(N).
        picks = self.rng.sample(range(len(pool)), min(2 * degree, len(pool)))
        targets += [p for p in (pool[i] for i in picks) if p.alive and p is not peer][:degree]
        for target in targets:
            addrs = target.node.network.listen_addrs
            if not addrs:
                continue
            try:
                await peer.node.network.connect(addrs[0], timeout=10.0)
            except Exception as exc:  # a peer that left meanwhile; churn is expected
                log.debug("Could not connect %d to %d: %s", peer.index, target.index, exc)

    # --- running ----------------------------------------------------------------------
    async def populate(self, nursery: trio.Nursery) -> None:
        """Start the masters, requesters and workers of the scenario; elect the committee."""
        self._nursery = nursery
        scenario = self.scenario
        for _ in range(scenario.network.masters):
            await self.add_master()
        for _ in range(scenario.network.requesters):
            await self.add_requester()
        count = scenario.network.workers
        bad = round(count * scenario.byzantine.fraction)
        liars = set(self.rng.sample(range(count), bad))
        for i in range(count):
            await self.add_worker(i in liars)
            await trio.sleep(JOIN_SPREAD_S / count)
        owner = self.masters[0].node.chain
        assert owner is not None
        await owner.elect()

    async def submit_jobs(self) -> None:
        """Submit every job of the scenario at its time, round-robin over the requesters."""
        schedule = []
        for entry in self.scenario.jobs:
            for k in range(entry.count):
                schedule.append((entry.submit_at_s + k * entry.every_s, len(schedule), entry))
        schedule.sort(key=lambda item: (item[0], item[1]))
        assert self._nursery is not None
        for at, number, entry in schedule:
            await trio.sleep_until(max(at, trio.current_time()))
            requester = self.requesters[number % len(self.requesters)]
            self._nursery.start_soon(self._submit, requester, entry, number)

    async def _submit(self, peer: SimPeer, entry: JobEntry, number: int) -> None:
        assert isinstance(peer.role, Requester)
        spec = entry.spec
        try:
            handle = await peer.role.submit(spec, timeout=120.0)
        except Exception as exc:  # every refusal is a result of the simulation, not a crash
            self.submit_errors.append(f"job {number} ({spec.name}): {exc}")
            log.warning("Job %d (%s) was not accepted: %s", number, spec.name, exc)
            return
        self.ledger.reference_seconds[handle.job_id] = entry.reference_seconds
        self.jobs.append(handle)

    async def churn(self) -> None:
        """Workers leave and join as Poisson processes (rates per worker per hour)."""
        churn = self.scenario.churn
        population = self.scenario.network.workers
        leave_rate = churn.leave_per_hour * population / 3600.0
        join_rate = churn.join_per_hour * population / 3600.0
        total = leave_rate + join_rate
        if total <= 0:
            return
        await trio.sleep(churn.start_s)
        while True:
            await trio.sleep(self.rng.expovariate(total))
            if self.rng.random() < leave_rate / total:
                honest_alive = [p for p in self.workers if p.alive]
                if len(honest_alive) <= 1:
                    continue
                victim = self.rng.choice(honest_alive)
                self.leave(victim, crash=self.rng.random() < churn.crash_fraction)
            else:
                byzantine = self.rng.random() < self.scenario.byzantine.fraction
                self.arrivals += 1
                await self.add_worker(byzantine)

    def leave(self, peer: SimPeer, crash: bool) -> None:
        """Take a peer off the network: a graceful stop, or a crash without goodbye."""
        if not peer.alive:
            return
        peer.left_at = trio.current_time()
        self.departures["crash" if crash else "graceful"] += 1
        if crash:
            peer.scope.cancel()
        else:
            peer.node.stop()

    async def crash_masters(self) -> None:
        """Kill masters at the scenario's times (a job's current master, or any)."""
        for crash in sorted(self.scenario.master_crashes, key=lambda c: c.at_s):
            await trio.sleep_until(max(crash.at_s, trio.current_time()))
            victim, job = self._crash_target(crash.target)
            if victim is None:
                log.warning("No live master to crash at %.0f s", crash.at_s)
                continue
            self.leave(victim, crash=True)
            self.crashes.append(FailoverEvent(trio.current_time(), victim.peer_id, job))

    def _crash_target(self, target: str) -> tuple[SimPeer | None, str | None]:
        alive = [m for m in self.masters if m.alive]
        if target == "job-master":
            for handle in self.jobs:
                if handle.result is None:
                    for master in alive:
                        if master.peer_id == handle.master:
                            return master, handle.job_id
        return (self.rng.choice(alive), None) if alive else (None, None)

    # --- observations ----------------------------------------------------------------
    def live_workers(self) -> list[SimPeer]:
        """Workers that have not left."""
        return [p for p in self.workers if p.alive]


def gini(values: list[float]) -> float:
    """The Gini coefficient of non-negative amounts: 0 equal, towards 1 concentrated."""
    if not values:
        return 0.0
    ordered = sorted(values)
    total = sum(ordered)
    if total <= 0:
        return 0.0
    n = len(ordered)
    weighted = sum((i + 1) * v for i, v in enumerate(ordered))
    return (2 * weighted) / (n * total) - (n + 1) / n


def finite(value: float | None) -> float | None:
    """`value` unless it is None, NaN or infinite (JSON has no NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)

