"""`ravenp2p devnet`: a whole training network of real libp2p nodes on loopback, in one process.

It starts a master, a requester and N workers (K of them byzantine, if asked),
lets them discover each other, submits a training job, runs it to completion
and reports what happened: holdout accuracy, rounds, accepted calculations,
rejected results, and per worker what it was credited and refused.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ravenp2p.identity import create_identity
from ravenp2p.network.libp2p import Libp2pNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.node import Node
from ravenp2p.roles.faults import ByzantineResults, FaultPool
from ravenp2p.roles.master import Master, MasterConfig
from ravenp2p.roles.requester import JobResult, Requester
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


class DevnetError(RuntimeError):
    """The devnet did not reach the expected state in time."""


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


@dataclass
class WorkerProcess:
    """A worker running as its own `ravenp2p node` process (true parallelism on many cores)."""

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

    master: Master
    requester: Requester
    workers: list[Worker]
    byzantine: set[str] = field(default_factory=set)
    nodes: list[Node] = field(default_factory=list)
    processes: list[WorkerProcess] = field(default_factory=list)

    async def start_worker_process(self, data_dir: Path, share: int = 10) -> WorkerProcess:
        """Start a consenting worker daemon that joins through the master."""
        identity = create_identity(data_dir)
        log_path = data_dir / "node.log"
        command = [
            sys.executable, "-m", "ravenp2p.cli", "node", "--data-dir", str(data_dir),
            "--bootstrap", self.master.node.network.listen_addrs[0],
            "--share", str(share), "--i-consent", "--log-level", "info",
        ]
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command, stdout=log_file, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(identity.peer_id, process, log_path)
        self.processes.append(worker)
        return worker


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
) -> AsyncIterator[Devnet]:
    """Start a master, a requester and `workers` workers; stop them all on exit.

    With `worker_processes`, that many of the (honest) workers run as separate
    `ravenp2p node` processes instead of in this process: computations then
    run in parallel on several cores (in one process, torch's small operations
    serialise on the interpreter lock).
    """
    if workers < 1:
        raise ValueError("a devnet needs at least 1 worker")
    if not 0 <= worker_processes <= workers - byzantine:
        raise ValueError("worker_processes must be between 0 and the number of honest workers")
    if not 0 <= byzantine <= workers:
        raise ValueError(f"--byzantine must be between 0 and the number of workers ({workers})")
    rng = random.Random(seed)
    faulty = set(rng.sample(range(workers - worker_processes), byzantine))
    pool = FaultPool()
    with tempfile.TemporaryDirectory(prefix="ravenp2p-devnet-") as tmp:
        async with trio.open_nursery() as nursery:
            nodes: list[Node] = []

            def make_node(name: str, consent: bool) -> Node:
                data_dir = Path(tmp) / name
                identity = create_identity(data_dir)
                bootstrap = tuple(nodes[0].network.listen_addrs[:1]) if nodes else ()
                config = NodeConfig(
                    data_dir=data_dir, bootstrap=bootstrap, share=share if consent else 0,
                    consent=consent, control=False, announce_interval_s=5.0,
                    peer_expiry_s=30.0,
                )
                return Node(Libp2pNetwork(identity), identity, config)

            async def start(node: Node) -> None:
                await nursery.start(node.run)
                nodes.append(node)

            master_node = make_node("master", consent=False)
            master = Master(master_node, master_config)
            master_node.add_role(master.run)
            await start(master_node)
            requester_node = make_node("requester", consent=False)
            requester = Requester(requester_node)
            requester_node.add_role(requester.run)
            await start(requester_node)
            net = Devnet(master=master, requester=requester, workers=[], nodes=nodes)
            in_process = workers - worker_processes
            for i in range(worker_processes):
                await net.start_worker_process(Path(tmp) / f"process{i}", share)
            for i in range(in_process):
                node = make_node(f"worker{i}", consent=True)
                faulty_here = i in faulty
                tamper = ByzantineResults(seed=seed + i, pool=pool) if faulty_here else None
                worker = Worker(node, worker_config, tamper)
                node.add_role(worker.run)
                await start(node)
                net.workers.append(worker)
                if tamper is not None:
                    net.byzantine.add(node.peer_id)
            try:
                with trio.fail_after(timeout):
                    await master_node.wait_for_peers(workers + 1)
            except trio.TooSlowError:
                raise DevnetError(
                    f"the master discovered {len(master_node.directory)} of {workers + 1} "
                    f"peers within {timeout:.0f} s"
                ) from None
            try:
                yield net
            finally:
                with trio.CancelScope(shield=True):
                    for worker_process in net.processes:
                        await worker_process.stop()
                for node in nodes:
                    node.stop()
                nursery.cancel_scope.cancel()


def summarize(net: Devnet, result: JobResult, seconds: float) -> dict[str, Any]:
    """The devnet's JSON report."""
    credits = {row.worker: row for row in result.done.credits}
    rows = []
    for process in net.processes:
        credit = credits.get(process.peer_id)
        rows.append({
            "peer_id": process.peer_id,
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
) -> dict[str, Any]:
    """Start a devnet, train `spec` (default: digits) to completion, return the report."""
    spec = spec or devnet_spec()
    async with start_devnet(
        workers, byzantine, seed=seed, worker_processes=worker_processes
    ) as net:
        log.info("Devnet up: 1 master, 1 requester, %d workers (%d byzantine)",
                 workers, byzantine)
        begin = time.monotonic()
        handle = await net.requester.submit(spec, net.master.node.peer_id)
        try:
            result = await handle.wait(timeout)
        except trio.TooSlowError:
            raise DevnetError(f"the job did not finish within {timeout:.0f} s") from None
        return summarize(net, result, time.monotonic() - begin)
