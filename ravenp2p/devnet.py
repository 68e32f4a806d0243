"""`ravenp2p devnet`: a whole training network of real libp2p nodes on loopback, in one process.

It starts masters, a requester and N workers (K of them byzantine, if asked),
lets them discover each other, submits a training job, runs it to completion
and reports what happened: holdout accuracy, rounds, accepted calculations,
rejected results, and per worker what it was credited and refused.

With the economy on (what `ravenp2p devnet` runs), the contracts are deployed
on a chain (embedded by default), every node stakes, the masters stand as
candidates and the epoch's committee is elected; the requester deposits the
job's budget in escrow and submits to the master the escrow ranks first; that
master settles a merkle root of the payouts, and every worker claims its own.
The report then adds the payouts, the fees, the refund and the deposit, which
add up to the deposit to the wei.

With `kill_master_at`, the job's master is killed (its node stops at once,
without a word to anyone) once the job reaches that round: the next-ranked
committee member takes the job over from its replica and finishes it, and the
report lists each failover with the seconds it took to resume.
"""

from __future__ import annotations

import itertools
import logging
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ravenp2p.chain.base import Deployment, JobStatusOnChain
from ravenp2p.chain.deploy import deploy_contracts, save_deployment
from ravenp2p.chain.devchain import DevChain, EmbeddedChain
from ravenp2p.chain.pricing import current_quote, price_in_raven
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.identity import NodeIdentity, create_identity, load_or_create_identity
from ravenp2p.market.role import MarketConfig, ModelCatalog
from ravenp2p.network.libp2p import Libp2pNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.datadir import RESULTS_FOLDER, data_dir_lock
from ravenp2p.node.node import Node
from ravenp2p.roles.escrow import job_key, payout_plan, peer_address
from ravenp2p.roles.faults import ByzantineResults, FaultPool
from ravenp2p.roles.master import Master, MasterConfig
from ravenp2p.roles.requester import JobHandle, JobResult, Requester
from ravenp2p.roles.worker import Worker, WorkerConfig
from ravenp2p.training.spec import JobSpec, parse_job_spec

log = logging.getLogger("ravenp2p.devnet")

DEVNET_SPEC = """
name = "devnet-{name}"
model = "auto"
loss = "cross_entropy"
samples_per_calculation = {samples}
calculations_per_round = 2
redundancy = {redundancy}
calculation = "{calculation}"
batch_size = 32
[dataset]
source = "{source}"
[optimizer]
name = "adam"
lr = 0.003
[stop]
max_rounds = {rounds}
target_accuracy = {target}
evaluate_every = 4
[payment]
price_per_calculation = "0.001"
budget = "{budget}"
"""


RAVEN = 10**18
MASTER_STAKE = 1_000 * RAVEN
"""What each devnet master stakes (the registry's devnet minimum for candidates is 100 RAVEN)."""
WORKER_STAKE = 100 * RAVEN
GAS_MONEY = 10 * 10**18
"""Wei each devnet node gets for transaction fees."""
CLAIM_WAIT_S = 30.0


class DevnetError(RuntimeError):
    """The devnet did not reach the expected state in time."""


@dataclass
class DevnetEconomy:
    """The devnet's chain: the deployment, its owner, and every node's account on it."""

    backend: DevChain
    deployment: Deployment
    owner: Web3Chain
    accounts: dict[str, Web3Chain] = field(default_factory=dict)
    """Peer id -> that node's chain account."""
    balances_before: dict[str, int] = field(default_factory=dict)
    """Address -> token balance once staked, before the job: payouts are the growth."""

    async def fund(self, identity: NodeIdentity, tokens: int) -> None:
        """Give a node's address gas money and `tokens` RAVEN."""
        self.backend.fund(identity.address, GAS_MONEY)
        self.owner.resync_nonce()  # the backend's funder is the owner's account too
        if tokens:
            await self.owner.mint(identity.address, tokens)

    async def account(self, identity: NodeIdentity, tokens: int) -> Web3Chain:
        """A funded chain account for a node's key, with `tokens` RAVEN minted to it."""
        chain = Web3Chain(self.backend.w3, self.deployment, identity.private_key.secret)
        await self.fund(identity, tokens)
        self.accounts[identity.peer_id] = chain
        return chain


def devnet_spec(
    dataset: str = "digits", redundancy: int = 3, calculation: str = "local_steps"
) -> JobSpec:
    """The job a devnet runs when no spec file is given: `dataset` with an automatic model.

    With `local_steps` (the default) each calculation is 16 optimizer steps on a
    512-sample shard; with `gradient` it is one gradient on a 64-sample shard
    (digits) and the master steps the optimizer: many more, smaller rounds.
    """
    is_digits = dataset == "digits"
    rounds = 400
    budget = rounds * 2 * redundancy * 0.001 * 1.1 + 1
    text = DEVNET_SPEC.format(
        name="digits" if is_digits else Path(dataset).stem.split(".")[0][:40],
        samples=(64 if is_digits else 256) if calculation == "gradient" else 512,
        redundancy=redundancy, calculation=calculation,
        source=dataset.replace("\\", "\\\\").replace('"', '\\"'), rounds=rounds,
        target=0.95, budget=f"{budget:.3f}",
    )
    return parse_job_spec(text, source="devnet")


@dataclass(frozen=True)
class Placement:
    """Where a master process runs: a command prefix (such as `ip netns exec NS`) and its host.

    `host` is the IPv4 address its node listens on.
    """

    prefix: tuple[str, ...] = ()
    host: str = "127.0.0.1"


@dataclass
class NodeProcess:
    """A node running as its own `ravenp2p node` process (a worker, or a master to kill)."""

    peer_id: str
    process: trio.Process
    log_path: Path

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(timeout):
                await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            with trio.move_on_after(timeout):
                await self.process.wait()


@dataclass
class Devnet:
    """The nodes of a running devnet and their roles."""

    masters: list[Master]
    requester: Requester
    workers: list[Worker]
    byzantine: set[str] = field(default_factory=set)
    nodes: list[Node] = field(default_factory=list)
    processes: list[NodeProcess] = field(default_factory=list)
    """Worker processes."""
    economy: DevnetEconomy | None = None
    kill_scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    """Peer id -> the cancel scope that kills that in-process master's node."""
    master_processes: list[NodeProcess] = field(default_factory=list)
    """Masters running as `ravenp2p node --candidate` processes."""
    catalogs: dict[str, ModelCatalog] = field(default_factory=dict)
    """Peer id -> that node's model marketplace (with `start_devnet(market=...)`)."""

    @property
    def master_ids(self) -> list[str]:
        """Every master's peer id, in-process or not."""
        return ([m.node.peer_id for m in self.masters]
                + [p.peer_id for p in self.master_processes])

    def kill_master(self, peer_id: str) -> None:
        """Stop a master at once: no goodbye, no end of job (SIGKILL for a process)."""
        for process in self.master_processes:
            if process.peer_id == peer_id:
                process.process.kill()
                return
        self.kill_scopes[peer_id].cancel()

    @property
    def master(self) -> Master:
        """The first in-process master: unpaid jobs go to it."""
        return self.masters[0]

    def master_named(self, peer_id: str) -> Master:
        """The devnet's master with this peer id."""
        for master in self.masters:
            if master.node.peer_id == peer_id:
                return master
        raise KeyError(f"{peer_id} is not a master of this devnet")

    async def start_worker_process(self, data_dir: Path, share: int = 10) -> NodeProcess:
        """Start a consenting worker daemon that joins through the master.

        It runs without a chain account (an embedded chain lives in this
        process only): when it is paid, the devnet claims for it, which the
        escrow allows anyone to do.
        """
        identity = create_identity(data_dir)
        log_path = data_dir / "node.log"
        command = [
            sys.executable, "-m", "ravenp2p.cli", "node", "--data-dir", str(data_dir),
            "--bootstrap", self.nodes[0].network.listen_addrs[0],
            "--share", str(share), "--i-consent", "--log-level", "info",
        ]
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command, stdout=log_file, stderr=subprocess.STDOUT
            )
        worker = NodeProcess(identity.peer_id, process, log_path)
        self.processes.append(worker)
        return worker

    async def start_master_process(self, data_dir: Path, placement: Placement) -> NodeProcess:
        """Start a master candidate daemon on the devnet's chain (which must have a URL).

        It stakes `MASTER_STAKE` and stands as candidate itself; it joins
        through the devnet's first node.
        """
        money = self.economy
        url = getattr(money.backend, "url", None) if money is not None else None
        if money is None or url is None:
            raise ValueError("master processes need the economy on a chain with a URL (anvil)")
        identity = create_identity(data_dir)
        await money.fund(identity, MASTER_STAKE)
        contracts = data_dir / "contracts.json"
        save_deployment(money.deployment, contracts)
        log_path = data_dir / "node.log"
        command = [
            *placement.prefix, sys.executable, "-m", "ravenp2p.cli", "node",
            "--data-dir", str(data_dir), "--listen", f"/ip4/{placement.host}/tcp/0",
            "--bootstrap", self.nodes[0].network.listen_addrs[0], "--chain", url,
            "--contracts", str(contracts), "--stake", str(MASTER_STAKE // RAVEN), "--candidate",
            "--log-level", "info",
        ]
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command, stdout=log_file, stderr=subprocess.STDOUT
            )
        master = NodeProcess(identity.peer_id, process, log_path)
        self.master_processes.append(master)
        return master


@asynccontextmanager
async def start_devnet(
    workers: int,
    byzantine: int = 0,
    *,
    master_config: MasterConfig | None = None,
    worker_config: WorkerConfig | None = None,
    share: int = 10,
    seed: int = 0,
    timeout: float = 60.0,
    worker_processes: int = 0,
    masters: int = 1,
    economy: bool = False,
    chain_backend: DevChain | None = None,
    master_processes: tuple[Placement, ...] = (),
    listen_host: str = "127.0.0.1",
    equivocators: int = 0,
    requester_dir: Path | None = None,
    market: MarketConfig | None = None,
) -> AsyncIterator[Devnet]:
    """Start masters, a requester and `workers` workers; stop them all on exit.

    With `worker_processes`, that many of the (honest) workers run as separate
    `ravenp2p node` processes instead of in this process: computations then
    run in parallel on several cores (in one process, torch's small operations
    serialise on the interpreter lock).

    With `economy`, contracts are deployed on `chain_backend` (default: a new
    embedded chain), every node stakes, the masters stand as candidates and
    the committee of the epoch is elected before the devnet is handed over.

    With `master_processes` (one `Placement` per master, on a chain with a
    URL), the masters run as `ravenp2p node --candidate` processes instead,
    which `Devnet.kill_master` SIGKILLs. In-process nodes listen on
    `listen_host`. The first `equivocators` honest in-process workers also
    sign a second, different result for each calculation (slashable).

    With `requester_dir`, the requester keeps its key there, serves its
    control socket there (so `ravenp2p.Client(requester_dir)` and `ravenp2p
    submit --data-dir requester_dir` can submit jobs to the devnet) and saves
    the results of its jobs in its `results` folder. With `market`, every
    in-process node runs the model marketplace (`Devnet.catalogs`).
    """
    if workers < 1:
        raise ValueError("a devnet needs at least 1 worker")
    if masters < 1:
        raise ValueError("a devnet needs at least 1 master")
    if not 0 <= worker_processes <= workers - byzantine:
        raise ValueError("worker_processes must be between 0 and the number of honest workers")
    if not 0 <= byzantine <= workers:
        raise ValueError(f"--byzantine must be between 0 and the number of workers ({workers})")
    if master_processes and (len(master_processes) != masters or not economy):
        raise ValueError("master_processes needs the economy and one placement per master")
    if not 0 <= equivocators <= workers - worker_processes - byzantine:
        raise ValueError("equivocators must be between 0 and the honest in-process workers")
    rng = random.Random(seed)
    faulty = set(rng.sample(range(workers - worker_processes), byzantine))
    pool = FaultPool()
    money = await _open_economy(chain_backend) if economy else None
    lock = data_dir_lock(requester_dir) if requester_dir is not None else nullcontext()
    with tempfile.TemporaryDirectory(prefix="ravenp2p-devnet-") as tmp, lock:
        async with trio.open_nursery() as nursery:
            nodes: list[Node] = []

            async def make_node(
                name: str, consent: bool, stake: int = 0, data_dir: Path | None = None
            ) -> Node:
                control = data_dir is not None
                data_dir = data_dir or Path(tmp) / name
                identity, _ = load_or_create_identity(data_dir)
                bootstrap = tuple(nodes[0].network.listen_addrs[:1]) if nodes else ()
                config = NodeConfig(
                    data_dir=data_dir, bootstrap=bootstrap, share=share if consent else 0,
                    consent=consent, control=control, announce_interval_s=5.0,
                    peer_expiry_s=30.0, listen=(f"/ip4/{listen_host}/tcp/0",),
                )
                chain = await money.account(identity, stake) if money else None
                if chain is not None and stake:
                    await chain.stake(stake)
                node = Node(Libp2pNetwork(identity, config.listen), identity, config, chain=chain)
                if market is not None:
                    catalog = ModelCatalog(node, results_dir=data_dir / RESULTS_FOLDER,
                                           config=market)
                    catalogs[node.peer_id] = catalog
                    node.add_role(catalog.run)
                return node

            kill_scopes: dict[str, trio.CancelScope] = {}
            catalogs: dict[str, ModelCatalog] = {}

            async def start(node: Node) -> None:
                await nursery.start(node.run)
                nodes.append(node)

            async def run_killable(node: Node, *, task_status: trio.TaskStatus[Node]) -> None:
                with trio.CancelScope() as scope:
                    kill_scopes[node.peer_id] = scope
                    await node.run(task_status=task_status)

            master_roles = []
            for i in range(0 if master_processes else masters):
                master_node = await make_node(f"master{i}", consent=False, stake=MASTER_STAKE)
                if master_node.chain is not None:
                    await master_node.chain.become_candidate()
                master = Master(master_node, master_config)
                master_node.add_role(master.run)
                await nursery.start(run_killable, master_node)
                nodes.append(master_node)
                master_roles.append(master)
            requester_node = await make_node("requester", consent=False,
                                             data_dir=requester_dir)
            requester = Requester(
                requester_node,
                results_dir=requester_dir / RESULTS_FOLDER if requester_dir else None,
            )
            requester_node.add_role(requester.run)
            await start(requester_node)
            net = Devnet(masters=master_roles, requester=requester, workers=[], nodes=nodes,
                         economy=money, kill_scopes=kill_scopes, catalogs=catalogs)
            try:
                for i, placement in enumerate(master_processes):
                    await net.start_master_process(Path(tmp) / f"master{i}", placement)
                in_process = workers - worker_processes
                for i in range(worker_processes):
                    await net.start_worker_process(Path(tmp) / f"process{i}", share)
                for i in range(in_process):
                    node = await make_node(f"worker{i}", consent=True, stake=WORKER_STAKE)
                    faulty_here = i in faulty
                    tamper = ByzantineResults(seed=seed + i, pool=pool) if faulty_here else None
                    honest_rank = i - sum(1 for f in faulty if f < i)
                    second = (ByzantineResults(seed=seed + i, kinds=("scaled",))
                              if not faulty_here and honest_rank < equivocators else None)
                    worker = Worker(node, worker_config, tamper, second)
                    node.add_role(worker.run)
                    await start(node)
                    net.workers.append(worker)
                    if tamper is not None:
                        net.byzantine.add(node.peer_id)
                if money is not None:
                    await _wait_for_candidates(money, masters, timeout)
                    await money.owner.elect()
                    nursery.start_soon(money.backend.keep_time)
                    for peer, chain in money.accounts.items():
                        money.balances_before[peer_address(peer)] = await chain.balance_of(
                            chain.address
                        )
                expected = workers + masters
                try:
                    with trio.fail_after(timeout):
                        for master in master_roles:
                            await master.node.wait_for_peers(expected)
                        await requester_node.wait_for_peers(expected)
                except trio.TooSlowError:
                    raise DevnetError(
                        f"the masters and the requester did not discover all {expected} other "
                        f"peers within {timeout:.0f} s"
                    ) from None
                yield net
            finally:
                with trio.CancelScope(shield=True):
                    for process in (*net.processes, *net.master_processes):
                        await process.stop()
                for node in nodes:
                    node.stop()
                nursery.cancel_scope.cancel()


async def _wait_for_candidates(money: DevnetEconomy, count: int, timeout: float) -> None:
    """Wait until `count` masters stand as candidates (processes stake on their own)."""
    with trio.move_on_after(timeout):
        for _poll in itertools.count():
            if len(await money.owner.candidates()) >= count:
                return
            await trio.sleep(0.2)
    raise DevnetError(f"fewer than {count} masters stood as candidates within {timeout:.0f} s")


async def _open_economy(backend: DevChain | None) -> DevnetEconomy:
    """Deploy the contracts on `backend` (a new embedded chain by default)."""
    backend = backend or EmbeddedChain()
    deployment = deploy_contracts(backend.w3, backend.funded_secret)
    owner = Web3Chain(backend.w3, deployment, backend.funded_secret)
    log.info("Contracts deployed on chain %d: registry %s, escrow %s",
             deployment.chain_id, deployment.registry, deployment.escrow)
    return DevnetEconomy(backend, deployment, owner)


async def settle_report(net: Devnet, result: JobResult) -> dict[str, Any]:
    """Wait for every payout to be claimed (claiming for worker processes); the money figures.

    Returns `payouts` (worker address -> base units received), `fees`,
    `refund`, `deposit` and `settle_tx`; raises `DevnetError` when the job did
    not settle, or when what was paid differs from `consensus.settlement`.
    """
    money = net.economy
    assert money is not None
    key = job_key(result.job_id)
    job = await money.owner.job(key)
    if job.status is not JobStatusOnChain.SETTLED:
        raise DevnetError(f"the job ended {job.status.name.lower()} on-chain: "
                          f"{result.done.reason}")
    manifest = net.requester.jobs[result.job_id].manifest
    plan = payout_plan(manifest, result.done.credits, job.deposit)
    if plan.root != job.root:
        raise DevnetError("the settled root is not the root of the master's credits")
    with trio.move_on_after(CLAIM_WAIT_S):
        for _poll in itertools.count():  # the workers claim on their own: give them time
            if all([await money.owner.has_claimed(key, a) for a in plan.leaves]):
                break
            await trio.sleep(0.2)
    for address, amount in plan.leaves.items():
        if not await money.owner.has_claimed(key, address):
            log.info("Claiming %d for %s (a worker without a chain account)", amount, address)
            await money.owner.claim(key, address, amount, plan.proof(address))
    payouts = {}
    for credit in result.done.credits:
        address = peer_address(credit.worker)
        balance = await money.owner.balance_of(address)
        payouts[address] = balance - money.balances_before.get(address, 0)
        if payouts[address] != plan.worker_payouts.get(address, 0):
            raise DevnetError(f"{address} received {payouts[address]}, the settlement says "
                              f"{plan.worker_payouts.get(address, 0)}")
    settled = await money.owner.settlement(key)
    assert settled is not None
    return {
        "payouts": payouts,
        "fees": {"master": settled.master_fee, "partner": settled.partner_total,
                 "protocol": settled.protocol_fee},
        "refund": settled.refund,
        "deposit": job.deposit,
        "settle_tx": settled.tx_hash,
    }


def summarize(net: Devnet, result: JobResult, seconds: float) -> dict[str, Any]:
    """The devnet's JSON report (without the money: see `settle_report`)."""
    credits = {row.worker: row for row in result.done.credits}
    rows = []
    for process in net.processes:
        credit = credits.get(process.peer_id)
        rows.append({
            "peer_id": process.peer_id,
            "address": peer_address(process.peer_id),
            "accepted": credit.accepted if credit else 0,
            "rejected": credit.mismatches if credit else 0,
            "excluded": bool(credit and credit.excluded),
            "byzantine": False,
            "computed": None,
        })
    for worker in net.workers:
        peer = worker.node.peer_id
        credit = credits.get(peer)
        rows.append({
            "peer_id": peer,
            "address": worker.node.identity.address,
            "accepted": credit.accepted if credit else 0,
            "rejected": (credit.mismatches if credit else 0) + worker.stats.refused,
            "excluded": bool(credit and credit.excluded),
            "byzantine": peer in net.byzantine,
            "computed": worker.stats.computed,
        })
    manifest = net.requester.jobs[result.job_id].manifest
    return {
        "job_id": result.job_id,
        "model": manifest.spec.model.chosen or "custom",
        "test_accuracy": result.evaluation.accuracy,
        "test_loss": result.evaluation.loss,
        "rounds": result.done.rounds,
        "reason": result.done.reason,
        "calculations_accepted": result.done.calculations_accepted,
        "results_rejected": result.done.results_rejected,
        "seconds": round(seconds, 3),
        "master": net.requester.jobs[result.job_id].master,
        "workers": rows,
    }


async def run_devnet(
    workers: int = 4,
    byzantine: int = 0,
    spec: JobSpec | None = None,
    *,
    timeout: float = 600.0,
    seed: int = 0,
    worker_processes: int = 0,
    masters: int = 2,
    economy: bool = True,
    chain_backend: DevChain | None = None,
    kill_master_at: int | None = None,
    watch: Callable[[JobHandle], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Start a devnet, train `spec` (default: digits) to completion, return the report.

    With `kill_master_at`, the job's master is killed when round `kill_master_at`
    is recorded and the report gains `failovers`. `watch` is started with the
    job's handle once it is submitted (a progress display) and cancelled at its end.
    """
    spec = spec or devnet_spec()
    if kill_master_at is not None:
        if not economy or masters < 2:
            raise ValueError("--kill-master-at needs the economy and at least 2 masters: "
                             "failover goes to the next master of the job's committee")
        if not 0 <= kill_master_at < spec.stop.max_rounds:
            raise ValueError(f"--kill-master-at must be a round below max_rounds "
                             f"({spec.stop.max_rounds}), not {kill_master_at}")
    async with start_devnet(
        workers, byzantine, seed=seed, worker_processes=worker_processes, masters=masters,
        economy=economy, chain_backend=chain_backend,
    ) as net:
        log.info("Devnet up: %d masters, 1 requester, %d workers (%d byzantine)%s",
                 masters, workers, byzantine, ", paid on-chain" if economy else "")
        if net.economy is not None:
            budget = spec.budget
            if spec.currency == "USD":  # what the requester will deposit at the feed's price
                budget = price_in_raven(spec, await current_quote(net.economy.owner)).budget
            await net.economy.owner.mint(net.requester.node.identity.address, budget)
        begin = time.monotonic()
        master = None if economy else net.master.node.peer_id
        handle = await net.requester.submit(spec, master)
        killed: list[tuple[str, float]] = []
        try:
            async with trio.open_nursery() as nursery:
                if kill_master_at is not None:
                    nursery.start_soon(kill_master_at_round, net, handle, kill_master_at, killed)
                if watch is not None:
                    nursery.start_soon(watch, handle)
                result = await handle.wait(timeout)
                nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            raise DevnetError(f"the job did not finish within {timeout:.0f} s") from None
        report = summarize(net, result, time.monotonic() - begin)
        if kill_master_at is not None:
            report["failovers"] = failover_report(handle, killed)
        if net.economy is not None:
            report.update(await settle_report(net, result))
        return report


async def kill_master_at_round(
    net: Devnet,
    handle: JobHandle,
    round_: int,
    killed: list[tuple[str, float]],
    kill: Callable[[str], None] | None = None,
) -> None:
    """Kill the job's master once it has recorded round `round_`; note (peer id, when).

    `kill` does it (default: `Devnet.kill_master`); a test may cut the master off instead.
    """
    while not any(record.round >= round_ for record in handle.rounds):
        await handle.progress.wait()
    victim = handle.master
    log.warning("Killing the job's master %s after round %d", victim, round_)
    killed.append((victim, trio.current_time()))
    (kill or net.kill_master)(victim)


def failover_report(handle: JobHandle, killed: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """The job's takeovers: round, old and new master, and seconds from the kill to the resume."""
    kill_times = dict(killed)
    rows = []
    for failover in handle.failovers:
        since = kill_times.get(failover.old_master, failover.at - failover.silent_s)
        rows.append({
            "round": failover.round,
            "old_master": failover.old_master,
            "new_master": failover.new_master,
            "seconds_to_resume": round(failover.at - since, 3),
        })
    return rows


SERVE_FUNDS = 1_000 * RAVEN
"""RAVEN minted to the requester of a devnet that serves clients: its jobs' budgets."""


async def serve_devnet(
    workers: int,
    byzantine: int,
    requester_dir: Path,
    *,
    masters: int = 2,
    seed: int = 0,
    ready: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Keep a paid devnet up for clients until cancelled (SIGINT or SIGTERM in the CLI).

    The requester's node serves its control socket in `requester_dir` with
    `SERVE_FUNDS` RAVEN to spend; `ready` is called once with what a client
    needs (data dir, bootstrap address, chain id, peers).
    """
    async with start_devnet(
        workers, byzantine, seed=seed, masters=masters, economy=True,
        requester_dir=requester_dir, timeout=120.0, market=MarketConfig(),
    ) as net:
        assert net.economy is not None
        requester = net.requester.node
        await net.economy.owner.mint(requester.identity.address, SERVE_FUNDS)
        info = {
            "data_dir": str(requester_dir),
            "requester": requester.peer_id,
            "bootstrap": net.nodes[0].network.listen_addrs[0],
            "chain_id": net.economy.deployment.chain_id,
            "masters": net.master_ids,
            "workers": [worker.node.peer_id for worker in net.workers],
            "byzantine": sorted(net.byzantine),
            "funds": SERVE_FUNDS,
        }
        if ready is not None:
            ready(info)
        await trio.sleep_forever()
