"""The master (the whitepaper's distribution server and gradient collector).

It keeps a request queue of jobs; for each job it runs rounds:

1. the calculation queue: `calculations_per_round` calculations, each naming
   the job, the round, the weights digest, a shard digest and the kind;
2. each calculation is assigned to R distinct workers chosen by advertised
   capacity and load (`consensus.assignment`), in one signed assignment on the
   job's reliable topic;
3. the gradient collector takes signed results over streams, checks them and
   votes on them (`consensus.voting`); a calculation whose workers miss their
   deadline, or whose results disagree, gets extra workers;
4. accepted results are averaged, the optimizer steps, the new weights are
   stored by digest and a signed round record names what was accepted and who
   is credited; a checkpoint is written so the job survives a restart;
5. the job stops on its stop condition (rounds, or the requester's signed
   evaluation on its holdout reaching the target); a paid job is settled in
   its escrow (a merkle root of the payouts, `ravenp2p.roles.escrow`) and a
   signed `JobDone` carries the credits and the settlement transaction.

A paid job is only admitted when its escrow is open, matches the spec and
names this node as the job's master; while it runs, the master heartbeats it
on-chain so that no other committee member takes it over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import trio

from consensus.agreement import compare_tensors
from consensus.assignment import Candidate, choose_workers, in_job_sample, sample_fraction
from consensus.mastership import Mastership, rank_after
from consensus.voting import AddOutcome, CalculationVote, SignedResult, VoteState, WorkerLedger
from ravenp2p.blocking import run_blocking
from ravenp2p.chain.base import ChainError, ContractReverted, Settled
from ravenp2p.data.blobs import BlobError
from ravenp2p.network.base import NetworkError, Stream
from ravenp2p.network.framing import read_exactly, read_frame, write_frame
from ravenp2p.node.node import Node, short
from ravenp2p.roles.checkpoint import CHECKPOINT_FILE, checkpoint_problem
from ravenp2p.roles.committee import CommitteeView
from ravenp2p.roles.escrow import (
    check_escrow,
    confirmed_master,
    job_key,
    payout_plan,
    peer_address,
    result_signed_by,
    with_partners,
)
from ravenp2p.roles.protocol import (
    JOBS_TOPIC,
    REPLICA_PROTOCOL,
    RESULT_PROTOCOL,
    SUBMIT_PROTOCOL,
    job_topic,
)
from ravenp2p.roles.slashing import SlashDesk, report_equivocation
from ravenp2p.roles.standby import Standby
from ravenp2p.training.compute import ModelRuntime, Trainer
from ravenp2p.training.manifest import JobManifest, ManifestError
from ravenp2p.training.models import build_model
from ravenp2p.training.tensors import TensorFormatError, decode_tensors, digest_of, encode_tensors
from ravenp2p.wire import WireError
from ravenp2p.wire.job_messages import (
    AcceptedCalculation,
    Assignment,
    CalculationOrder,
    Evaluation,
    JobAnnounce,
    JobCancel,
    JobDone,
    JobReceipt,
    JobSubmit,
    MasterHeartbeat,
    MasterTakeover,
    ReplicaAck,
    ReplicaOffer,
    ResultAck,
    ResultHeader,
    RoundRecord,
    WorkerCredit,
)
from ravenp2p.wire.slash_messages import AcceptedSigner, ContradictionRecord

log = logging.getLogger("ravenp2p.master")

MAX_HEADER_BYTES = 64 * 1024
MAX_TIMINGS = 100_000
SETTLE_ATTEMPTS = 5
MAX_CONTRADICTIONS_KEPT = 8
"""Contradictions kept per worker and job: enough for a slash order, bounded memory."""
SLASH_ORDER_TIMEOUT_S = 180.0
"""All slash orders of one job, together."""


class JobFailed(RuntimeError):
    """A job could not go on (no workers, votes that never settle, ...)."""


@dataclass(frozen=True)
class MasterConfig:
    """How a master runs jobs."""

    result_deadline_s: float = 30.0
    """A worker that has not delivered by then is replaced by another."""
    max_extra_workers: int = 4
    """Extra workers a calculation may get beyond R (disagreements, timeouts)."""
    max_vote_attempts: int = 3
    """A calculation whose vote fails this often ends the job."""
    worker_wait_s: float = 60.0
    """How long a job waits for enough eligible workers before it fails."""
    max_queued_jobs: int = 16
    threads: int = 1
    """The pinned compute profile: torch threads per calculation."""
    max_result_bytes: int = 512 * 1024 * 1024
    mismatch_tolerance: int = 1
    chain_heartbeat_s: float = 10.0
    """How often a paid job's master tells the escrow it is alive (well below its timeout)."""
    min_escrow_time_s: float = 600.0
    """A paid job whose escrow deadline is nearer than this at submission is refused."""
    settle_margin_s: float = 120.0
    """Training stops this long before the escrow's deadline, so the settlement lands in time."""
    heartbeat_interval_s: float = 1.0
    """How often a paid job's master says it is alive on the job's topic (failover watches it)."""
    replica_timeout_s: float = 30.0
    """How long a round waits for a committee member to store its replica before going on."""
    seats_per_calculation: int = 4
    """Workers a job draws per calculation of a round and per unit of redundancy: a job of
    4 calculations with R = 3 draws about 48 of the known workers (all when fewer)."""

    def __post_init__(self) -> None:
        if self.result_deadline_s <= 0 or self.worker_wait_s <= 0:
            raise ValueError("result_deadline_s and worker_wait_s must be positive")
        if min(self.chain_heartbeat_s, self.settle_margin_s, self.heartbeat_interval_s,
               self.replica_timeout_s) <= 0:
            raise ValueError("chain_heartbeat_s, settle_margin_s, heartbeat_interval_s and "
                             "replica_timeout_s must be positive")
        if self.min_escrow_time_s <= self.settle_margin_s:
            raise ValueError("min_escrow_time_s must be longer than settle_margin_s")
        if self.max_extra_workers < 0 or self.max_vote_attempts < 1:
            raise ValueError("max_extra_workers must be >= 0 and max_vote_attempts >= 1")


@dataclass
class _Calculation:
    order: CalculationOrder
    vote: CalculationVote
    attempt: int = 1
    assigned: dict[str, float] = field(default_factory=dict)
    """Worker -> time its order was sent; removed when its result arrives or it times out."""
    answered: set[str] = field(default_factory=set)
    signed: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    """Worker -> the first digest it signed here and its EIP-712 signature: evidence."""
    bodies: dict[str, bytes] = field(default_factory=dict)
    """Digest -> result bytes, while the round is open (contradictions keep theirs)."""
    compute_ms: dict[str, float] = field(default_factory=dict)
    timing: CalculationTiming | None = None
    timed_out: set[str] = field(default_factory=set)
    """Workers that missed their deadline: asked again only when nobody else is left."""
    starved_since: float | None = None
    """When the vote last needed workers that nobody could provide."""


@dataclass
class CalculationTiming:
    """When a calculation was ordered and accepted, and what its workers spent computing."""

    calc: int
    opened_at: float
    latency_s: float = 0.0
    compute_s: float = 0.0
    result_bytes: int = 0
    accepted: bool = False


@dataclass
class JobStatus:
    """What a master reports about one job."""

    job_id: str
    state: str = "queued"
    round: int = 0
    weights: str = ""
    reason: str = ""
    calculations_accepted: int = 0
    results_rejected: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    settlement: Settled | None = None
    """What the escrow paid when a paid job settled."""
    done: trio.Event = field(default_factory=trio.Event)
    slashing_done: trio.Event = field(default_factory=trio.Event)
    """Set once the slash orders the job's evidence called for were made (or not)."""


class _JobRun:
    """One job in progress at this master: the model, the optimizer, the votes, the ledger."""

    def __init__(self, master: Master, manifest: JobManifest, status: JobStatus) -> None:
        self.master = master
        self.manifest = manifest
        self.spec = manifest.spec
        self.job_id = manifest.job_id
        self.topic = job_topic(self.job_id)
        self.status = status
        self.runtime = ModelRuntime(self.spec.model, manifest.data, self.spec.loss)
        self.trainer: Trainer | None = None
        self.round = 0
        self.weights_digest = manifest.initial_weights
        self.next_calc = 0
        self.calcs: dict[int, _Calculation] = {}
        self.results: dict[str, dict[str, np.ndarray]] = {}
        self.ledger = WorkerLedger(master.config.mismatch_tolerance)
        self.credits: dict[str, int] = {}
        self.mismatches: dict[str, int] = {}
        self.excluded: set[str] = set()
        self.rejected = 0
        self.accepted_total = 0
        self.target_round: tuple[int, str] | None = None
        self.cancelled = ""
        """The requester's reason, once it cancelled the job ("" until then)."""
        self.losses: dict[int, float] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.optimizer_digest: str | None = None
        self.changed = trio.Event()
        self.training = trio.CancelScope()
        """Training of this job: its deadline is the escrow's, less the time to settle."""
        self.escrow_lost = ""
        """Why the escrow stopped this master from running the job, if it did."""
        self.replaced = False
        """Another committee member took the job over: this master must not speak for it."""
        self.mastership: Mastership | None = None
        """A paid job's masters and which of them runs it (None: unpaid, no failover)."""
        self.takeover: MasterTakeover | None = None
        """Set when this master took the job over: published before it resumes."""
        self.last_record: RoundRecord | None = None
        self.checkpoint_blob: tuple[str, int] | None = None
        """Digest and size of the newest checkpoint blob (paid jobs: what replicas fetch)."""
        self.nursery: trio.Nursery | None = None
        self.sample = 1.0
        """The share of known workers this job draws (`consensus.assignment.in_job_sample`)."""
        self.drawn: dict[str, int] = {}
        self.drawn_key: tuple[int, float] | None = None
        self._agree_cache: dict[tuple[str, str], bool] = {}
        self.contradictions: dict[str, list[ContradictionRecord]] = {}
        """Worker -> its signed results that contradicted an accepted majority (paid jobs)."""
        self.evidence_blobs: list[str] = []
        """Pins held on the result bytes of those contradictions."""

    # --- shards and seeds --------------------------------------------------------
    def shard_for(self, calc: int) -> str:
        """Shards are visited epoch by epoch in an order fixed by the job id."""
        count = len(self.manifest.shards)
        epoch, index = divmod(calc, count)
        seed = int.from_bytes(hashlib.sha256(f"{self.job_id}:{epoch}".encode()).digest()[:8])
        order = np.random.default_rng(seed).permutation(count)
        return self.manifest.shards[int(order[index])].digest

    def seed_for(self, calc: int) -> int:
        digest = hashlib.sha256(f"{self.job_id}:calc:{calc}".encode()).digest()
        return int.from_bytes(digest[:8]) >> 1

    # --- agreement ---------------------------------------------------------------
    def agree(self, a: str, b: str) -> bool:
        if a == b:
            return True
        key = (a, b) if a < b else (b, a)
        verdict = self._agree_cache.get(key)
        if verdict is None:
            verdict = compare_tensors(self.results[a], self.results[b]).agree
            self._agree_cache[key] = verdict
        return verdict

    def forget_results(self) -> None:
        """Drop a finished round's result tensors and the comparisons made between them."""
        self.results = {}
        self._agree_cache.clear()

    def is_excluded(self, worker: str) -> bool:
        return worker in self.excluded or self.ledger.excluded(worker)

    def credit_rows(self) -> list[WorkerCredit]:
        credits = dict(self.credits)
        for worker, count in self.ledger.credits().items():
            credits[worker] = credits.get(worker, 0) + count
        mismatches = dict(self.mismatches)
        for worker, record in self.ledger.records().items():
            mismatches[worker] = mismatches.get(worker, 0) + record.mismatches
        workers = sorted(set(credits) | set(mismatches) | self.excluded)
        return [
            WorkerCredit(
                worker=w,
                accepted=credits.get(w, 0),
                mismatches=mismatches.get(w, 0),
                excluded=self.is_excluded(w),
            )
            for w in workers
        ]


class Master:
    """Runs submitted jobs on the workers this node knows; see the module docstring."""

    def __init__(
        self, node: Node, config: MasterConfig | None = None,
        committee: CommitteeView | None = None,
    ) -> None:
        self.node = node
        self.config = config or MasterConfig()
        self.jobs: dict[str, JobStatus] = {}
        self._runs: dict[str, _JobRun] = {}
        self._queue_send, self._queue_receive = trio.open_memory_channel[JobManifest](
            self.config.max_queued_jobs
        )
        self._queued = 0
        self.calculation_timings: list[CalculationTiming] = []
        """The most recent calculations' timings (bounded), for operators and benchmarks."""
        self.round_seconds: list[float] = []
        """The most recent rounds' durations, from orders out to record published (bounded)."""
        self.rounds_completed = 0
        """Rounds this master completed, over all its jobs."""
        self._follows_epochs = committee is None and node.chain is not None
        """Whether this role runs its own view of the epochs (the node has none to share)."""
        self.committee = committee or (CommitteeView(node.chain) if node.chain else None)
        self.standby = Standby(self)
        self.slash_desk = SlashDesk(node) if node.chain is not None else None
        self._nursery: trio.Nursery | None = None

    def excluded_workers(self, job_id: str) -> frozenset[str]:
        """Workers this master stopped assigning to in a job it runs (they lied too often)."""
        run = self._runs.get(job_id)
        if run is None:
            return frozenset()
        return frozenset(run.excluded | {w for w in run.ledger.records() if run.is_excluded(w)})

    @property
    def jobs_dir(self) -> Path:
        return Path(self.node.config.data_dir) / "jobs"

    # --- lifecycle ---------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Master] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve submissions and results, resume checkpointed jobs, run the queue in order."""
        network = self.node.network
        network.set_request_handler(SUBMIT_PROTOCOL, self._serve_submit)
        network.set_stream_handler(RESULT_PROTOCOL, self._serve_result)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.committee is not None and self._follows_epochs:
                nursery.start_soon(self.committee.run)
            await nursery.start(self.standby.run)
            if self.slash_desk is not None:
                await nursery.start(self.slash_desk.run)
            for manifest in self._checkpointed_jobs():
                self._enqueue(manifest)
            nursery.start_soon(self._run_queue)
            task_status.started(self)
            await trio.sleep_forever()

    def _enqueue(self, manifest: JobManifest) -> int:
        job_id = manifest.job_id
        self.jobs.setdefault(job_id, JobStatus(job_id))
        self._queue_send.send_nowait(manifest)
        self._queued += 1
        return self._queued - 1

    async def _run_queue(self) -> None:
        async for manifest in self._queue_receive:
            self._queued -= 1
            await self._run_tracked(_JobRun(self, manifest, self.jobs[manifest.job_id]))

    async def _run_tracked(self, run: _JobRun, release: tuple[str, ...] = ()) -> None:
        self._runs[run.job_id] = run
        try:
            await self._run_job(run, release)
        finally:
            del self._runs[run.job_id]
            run.status.done.set()

    def resume_taken_over(
        self, manifest: JobManifest, mastership: Mastership, replaced_rank: int,
        replica: tuple[str, ...],
    ) -> None:
        """Run a paid job this node just took over on-chain, from its replica (now its checkpoint).

        `replica` names the blobs the standby pinned; they are released once loaded.
        """
        assert self._nursery is not None
        status = self.jobs[manifest.job_id] = JobStatus(manifest.job_id)
        run = _JobRun(self, manifest, status)
        run.mastership = mastership
        run.takeover = MasterTakeover(
            job=manifest.job_id, rank=mastership.current_rank, replaced_rank=replaced_rank,
            round=0, weights=manifest.initial_weights,
        )
        self._nursery.start_soon(self._run_tracked, run, replica)

    # --- the request queue -------------------------------------------------------
    async def _serve_submit(self, peer: str, request: bytes) -> bytes:
        envelope = self.node.codec.open(request, context=SUBMIT_PROTOCOL, from_peer=peer)
        message = envelope.message
        if not isinstance(message, JobSubmit):
            raise WireError("type", f"expected {JobSubmit.TYPE}, got {message.TYPE}")
        receipt = await self._admit(peer, message)
        return self.node.codec.seal(receipt, context=SUBMIT_PROTOCOL)

    async def _admit(self, requester: str, submit: JobSubmit) -> JobReceipt:
        job_id = submit.manifest

        def refuse(reason: str) -> JobReceipt:
            log.warning("Refused job %s from %s: %s", short(job_id), short(requester), reason)
            return JobReceipt(job=job_id, accepted=False, reason=reason)

        if job_id in self.jobs:
            status = self.jobs[job_id]
            return JobReceipt(job=job_id, accepted=True, reason=f"already {status.state}")
        if self._queued >= self.config.max_queued_jobs:
            return refuse("the job queue is full; try again later")
        try:
            with trio.fail_after(30):
                raw = await self.node.blobs.fetch(
                    job_id, providers=[requester], size=submit.manifest_size
                )
            manifest = JobManifest.decode(raw)
        except (BlobError, NetworkError, trio.TooSlowError) as exc:
            return refuse(f"could not fetch the manifest from the requester: {exc}")
        except ManifestError as exc:
            return refuse(str(exc))
        if manifest.requester != requester:
            return refuse("manifest.requester: names another peer than the one submitting it")
        if manifest.chain is not None:
            reason = await self._escrow_refusal(manifest)
            if reason:
                return refuse(reason)
        try:
            info = manifest.data
            build_model(
                manifest.spec.model, info.input_shape,
                num_classes=info.num_classes, vocab_size=info.vocab_size,
            )
        except ValueError as exc:
            return refuse(str(exc))
        self.node.store.pin(job_id)
        position = self._enqueue(manifest)
        log.info(
            "Accepted job %s (%s) from %s: %d shards, R=%d, up to %d rounds",
            short(job_id), manifest.spec.name, short(requester), len(manifest.shards),
            manifest.spec.redundancy, manifest.spec.stop.max_rounds,
        )
        return JobReceipt(job=job_id, accepted=True, queue_position=position)

    async def _escrow_refusal(self, manifest: JobManifest) -> str:
        """Why this master must not run a paid job, or ""."""
        chain = self.node.chain
        if chain is None or chain.deployment != manifest.chain:
            return "escrow: this master is not connected to the chain that holds the job's escrow"
        try:
            job = await chain.job(job_key(manifest.job_id))
            reason = check_escrow(manifest, job)
            if reason:
                return reason
            master = await chain.master_of(job_key(manifest.job_id))
            left = job.deadline - await chain.now()
        except ChainError as exc:
            return f"escrow: cannot read the job on-chain ({exc})"
        if left < self.config.min_escrow_time_s:
            return (f"escrow: the deadline is {left} s away; this master needs at least "
                    f"{self.config.min_escrow_time_s:.0f} s to train and settle")
        if master != chain.address:
            return f"escrow: the job's master on-chain is {master}, not this node ({chain.address})"
        return ""

    async def _heartbeat_escrow(self, run: _JobRun) -> None:
        """Tell the escrow, now and then, that this master still runs the job.

        When the escrow refuses (another master took the job over, it was
        refunded), the job is lost to this master: training stops at once.
        """
        chain = self.node.chain
        assert chain is not None and run.mastership is not None
        # Three beats per master timeout: one lost transaction never lets a standby in.
        interval = min(self.config.chain_heartbeat_s, run.mastership.timeout_s / 3)
        isolated_since: float | None = None
        while True:
            if self.node.network.connected_peers():
                isolated_since = None
            elif isolated_since is None:
                isolated_since = trio.current_time()
            if (isolated_since is not None
                    and trio.current_time() - isolated_since >= run.mastership.timeout_s / 2):
                # Cut off from every peer: let the escrow's timeout run out, so that a member
                # the workers can reach takes the job over, rather than hold it unreachable.
                log.warning("Job %s: no peer reachable for %.0f s; not heartbeating the escrow",
                            short(run.job_id), trio.current_time() - isolated_since)
                await trio.sleep(interval)
                continue
            try:
                await chain.heartbeat(job_key(run.job_id))
                if await self._time_left(run) <= 0:  # the chain's clock ran faster than ours
                    run.training.cancel()
            except ContractReverted as exc:
                run.escrow_lost = f"the escrow no longer lets this master run it ({exc.reason})"
                run.replaced = "NotJobMaster" in exc.reason
                run.training.cancel()
                return
            except ChainError as exc:
                log.warning("Escrow heartbeat for job %s failed: %s", short(run.job_id), exc)
            await trio.sleep(interval)

    async def _heartbeat_topic(self, run: _JobRun) -> None:
        """Say on the job's topic, every `heartbeat_interval_s`, that this master runs the job."""
        assert run.mastership is not None
        while True:
            beat = MasterHeartbeat(job=run.job_id, rank=run.mastership.current_rank,
                                   round=run.round, weights=run.weights_digest)
            try:
                await self.node.topics.publish(run.topic, beat)
            except (NetworkError, WireError) as exc:
                log.debug("Heartbeat of job %s not sent: %s", short(run.job_id), exc)
            await trio.sleep(self.config.heartbeat_interval_s)

    async def _job_mastership(self, run: _JobRun) -> Mastership:
        """The paid job's ranked masters as the escrow has them; this node must be the current."""
        chain, committee = self.node.chain, self.committee
        if chain is None or committee is None:
            raise JobFailed("the job is paid but this master follows no chain")
        key = job_key(run.job_id)
        try:
            ranked = await committee.job_masters(key)
            job = await chain.job(key)
            timeout = await committee.master_timeout()
        except ChainError as exc:
            raise JobFailed(f"cannot read the job's masters on-chain: {exc}") from None
        view = Mastership(tuple(ranked), float(timeout), current_rank=job.master_rank,
                          last_heard=trio.current_time())
        if view.current.lower() != chain.address.lower():
            mine = view.rank_of(chain.address)
            run.replaced = mine is not None and mine < view.current_rank
            raise JobFailed(f"the escrow names {view.current} as the job's master, not this node")
        return view

    async def _check_takeover(self, run: _JobRun, sender: str, message: MasterTakeover) -> None:
        """Step down when a master ranked after this one took the job over (the escrow agrees)."""
        view, chain = run.mastership, self.node.chain
        if view is None or chain is None or run.replaced:
            return
        address = peer_address(sender)
        if view.rank_of(address) != message.rank or message.rank <= view.current_rank:
            return
        try:
            confirmed = await confirmed_master(chain, run.job_id, address)
        except ChainError as exc:
            log.warning("Cannot check a takeover of job %s: %s", short(run.job_id), exc)
            return
        if not confirmed:
            log.warning("Ignored a takeover of job %s by %s that the escrow does not confirm",
                        short(run.job_id), short(sender))
            return
        run.escrow_lost = f"taken over by {short(sender)} (rank {message.rank})"
        run.replaced = True
        run.training.cancel()

    async def _time_left(self, run: _JobRun) -> float:
        """Seconds of training a paid job has left before it must stop to settle by its deadline.

        Judged by the chain's clock, which is the one the escrow goes by.
        """
        chain = self.node.chain
        assert chain is not None
        job = await chain.job(job_key(run.job_id))
        return job.deadline - await chain.now() - self.config.settle_margin_s

    async def _training_time(self, run: _JobRun) -> float:
        """`_time_left` at the start of training: JobFailed when there is none."""
        try:
            left = await self._time_left(run)
        except ChainError as exc:
            raise JobFailed(f"cannot read the job's escrow: {exc}") from None
        if left <= 0:
            raise JobFailed("the escrow's deadline is too near to train and settle")
        return left

    # --- one job -------------------------------------------------------------------
    async def _run_job(self, run: _JobRun, release: tuple[str, ...] = ()) -> None:
        run.status.state = "running"
        topics = self.node.topics
        channel = await topics.subscribe(run.topic)
        async with trio.open_nursery() as nursery:
            run.nursery = nursery
            nursery.start_soon(self._read_job_topic, run, channel)
            try:
                try:
                    await self._prepare(run)
                finally:
                    for digest in release:
                        self.node.store.unpin(digest)
                with run.training:
                    if run.manifest.chain is not None:
                        if run.mastership is None:
                            run.mastership = await self._job_mastership(run)
                        run.training.deadline = (trio.current_time()
                                                 + await self._training_time(run))
                        nursery.start_soon(self._heartbeat_escrow, run)
                        nursery.start_soon(self._heartbeat_topic, run)
                    reason = await self._train_announced(run)
                if run.escrow_lost:
                    raise JobFailed(run.escrow_lost)
                if run.training.cancelled_caught:
                    reason = "stopped before the escrow's deadline, to settle in time"
                run.status.state = "done"
            except JobFailed as exc:
                if run.replaced:
                    log.warning("Job %s: %s; this master steps down", short(run.job_id), exc)
                    run.status.state = "replaced"
                else:
                    log.error("Job %s failed: %s", short(run.job_id), exc)
                    run.status.state = "failed"
                reason = f"failed: {exc}"
            await self._finish(run, reason)
            nursery.cancel_scope.cancel()

    async def _train_announced(self, run: _JobRun) -> str:
        """Announce the job (and a takeover) to compute nodes, then train it to its end."""
        if run.takeover is not None:
            run.takeover = dataclasses.replace(run.takeover, round=run.round,
                                               weights=run.weights_digest)
            await self.node.topics.publish(run.topic, run.takeover)
            if run.last_record is not None:  # its first publication may have died with the master
                await self.node.topics.publish(run.topic, run.last_record)
            log.info("Job %s resumed at round %d by this master (rank %d)", short(run.job_id),
                     run.round, run.takeover.rank)
        connected = set(self.node.network.connected_peers())
        reachable = sum(1 for worker in self._known_workers(run) if worker in connected)
        run.sample = sample_fraction(self._seats(run), reachable)
        await self._announce(run)
        return await self._train(run)

    async def _announce(self, run: _JobRun) -> None:
        """Tell compute nodes about the job, and which share of them it draws."""
        view = run.mastership
        announce = JobAnnounce(
            job=run.job_id,
            requester=run.manifest.requester,
            manifest_size=len(run.manifest.encode()),
            masters=view.ranked if view is not None else (),
            rank=view.current_rank if view is not None else 0,
            sample=run.sample,
        )
        await self.node.topics.publish(JOBS_TOPIC, announce)

    def _seats(self, run: _JobRun) -> int:
        spec = run.spec
        return max(self.config.seats_per_calculation * spec.calculations_per_round
                   * spec.redundancy, spec.redundancy + self.config.max_extra_workers)

    async def _widen_if_short(self, run: _JobRun) -> None:
        """Draw twice the share of workers when churn left the job short of seats."""
        if run.sample < 1.0 and len(self._candidates(run)) < self._seats(run) // 2:
            run.sample = min(1.0, run.sample * 2)
            log.info("Job %s draws %.1f%% of the workers now", short(run.job_id),
                     100 * run.sample)
            await self._announce(run)

    async def _prepare(self, run: _JobRun) -> None:
        """Load the starting point: the last checkpoint, or the requester's initial weights."""
        checkpoint = self._load_checkpoint(run.job_id)
        providers = [run.manifest.requester]
        if checkpoint is not None:
            weights = await self._fetch_tensors(checkpoint["weights"], providers)
            optimizer = await self._fetch_tensors(checkpoint["optimizer"], [])
            run.trainer = Trainer(run.runtime, weights, run.spec.optimizer)
            try:
                run.trainer.load_optimizer_state(optimizer)
            except ValueError as exc:
                raise JobFailed(f"the checkpoint cannot be resumed: {exc}") from None
            run.round = checkpoint["round"]
            run.weights_digest = checkpoint["weights"]
            run.next_calc = checkpoint["next_calc"]
            run.credits = dict(checkpoint["credits"])
            run.mismatches = dict(checkpoint["mismatches"])
            run.excluded = set(checkpoint["excluded"])
            run.rejected = checkpoint["rejected"]
            run.accepted_total = checkpoint["accepted_total"]
            run.status.evaluations = list(checkpoint["evaluations"])
            if checkpoint.get("record"):
                try:
                    run.last_record = RoundRecord.from_body(checkpoint["record"])
                    run.last_record.validate()
                except WireError as exc:
                    raise JobFailed(f"the checkpoint's round record is malformed: {exc}") from None
            log.info("Resuming job %s at round %d", short(run.job_id), run.round)
        else:
            weights = await self._fetch_tensors(run.manifest.initial_weights, providers)
            run.trainer = Trainer(run.runtime, weights, run.spec.optimizer)
        self.node.store.pin(run.weights_digest)
        run.param_shapes = {name: a.shape for name, a in run.trainer.weights().items()}
        run.status.round, run.status.weights = run.round, run.weights_digest

    async def _fetch_tensors(self, digest: str, providers: list[str]) -> dict[str, np.ndarray]:
        try:
            with trio.fail_after(60):
                raw = await self.node.blobs.fetch(digest, providers=providers)
            return decode_tensors(raw)
        except (BlobError, NetworkError, trio.TooSlowError, TensorFormatError) as exc:
            raise JobFailed(f"could not load tensors {digest[:12]}: {exc}") from None

    async def _train(self, run: _JobRun) -> str:
        spec = run.spec
        while True:
            if run.target_round is not None:
                target_round, weights = run.target_round
                run.weights_digest = weights
                return f"target reached at round {target_round}"
            if run.cancelled:
                return f"cancelled by the requester after {run.round} rounds ({run.cancelled})"
            if run.round >= spec.stop.max_rounds:
                return f"max_rounds ({spec.stop.max_rounds}) done"
            await self._wait_for_workers(run)
            if not run.cancelled:
                await self._run_round(run)

    def _known_workers(self, run: _JobRun) -> dict[str, int]:
        """Consenting workers this node knows (peer id -> share), bar the job's own peers."""
        workers = {}
        for peer_id, known in self.node.directory.items():
            cap = known.capability
            if cap is None or not cap.consent or cap.share < 1:
                continue
            if peer_id in (self.node.peer_id, run.manifest.requester):
                continue
            workers[peer_id] = cap.share
        return workers

    def _drawn(self, run: _JobRun) -> dict[str, int]:
        """The known workers the job's sample draws; recomputed only when either changed."""
        key = (self.node.directory_version, run.sample)
        if run.drawn_key != key:
            run.drawn = {peer_id: share for peer_id, share in self._known_workers(run).items()
                         if in_job_sample(run.job_id, peer_id, run.sample)}
            run.drawn_key = key
        return run.drawn

    def _candidates(self, run: _JobRun) -> dict[str, Candidate]:
        """Drawn, connected, consenting workers, with their outstanding assignments."""
        outstanding: dict[str, int] = {}
        for calc in run.calcs.values():
            for worker in calc.assigned:
                outstanding[worker] = outstanding.get(worker, 0) + 1
        connected = set(self.node.network.connected_peers())
        return {
            peer_id: Candidate(share, outstanding.get(peer_id, 0))
            for peer_id, share in self._drawn(run).items()
            if peer_id in connected and not run.is_excluded(peer_id)
        }

    async def _wait_for_workers(self, run: _JobRun) -> None:
        await self._widen_if_short(run)
        needed = run.spec.redundancy
        if len(self._candidates(run)) >= needed:
            return
        log.info("Job %s waits for %d eligible workers", short(run.job_id), needed)
        with trio.move_on_after(self.config.worker_wait_s):
            while len(self._candidates(run)) < needed and not run.cancelled:
                # A new peer, or a re-check of connections and consent twice a second.
                with trio.move_on_after(0.5):
                    await self.node.wait_for_peers(len(self.node.directory) + 1)
                await self._widen_if_short(run)
            return
        raise JobFailed(
            f"fewer than {needed} consenting workers available after "
            f"{self.config.worker_wait_s:.0f} s (have {len(self._candidates(run))})"
        )

    def _new_calculation(self, run: _JobRun, calc_id: int, attempt: int = 1) -> _Calculation:
        order = CalculationOrder(
            calc=calc_id, round=run.round, kind=run.spec.calculation, weights=run.weights_digest,
            shard=run.shard_for(calc_id), seed=run.seed_for(calc_id),
            threads=self.config.threads, workers=(),
            deadline_s=self.config.result_deadline_s,
        )
        max_results = run.spec.redundancy + self.config.max_extra_workers
        vote = CalculationVote(run.spec.redundancy, max_results, run.agree)
        timing = CalculationTiming(calc=calc_id, opened_at=trio.current_time())
        self.calculation_timings.append(timing)
        del self.calculation_timings[:-MAX_TIMINGS]
        return _Calculation(order=order, vote=vote, attempt=attempt, timing=timing)

    def _staff(self, run: _JobRun, calc: _Calculation, count: int) -> CalculationOrder | None:
        """Assign `count` more workers to `calc`; the order to publish, or None if none free."""
        used = set(calc.assigned) | calc.answered
        salt = f"{run.job_id}:{calc.order.calc}:{calc.attempt}:{len(used)}".encode()
        candidates = self._candidates(run)
        chosen = choose_workers(candidates, count, salt, exclude=used | calc.timed_out)
        if len(chosen) < count:  # a second chance for workers that were only late
            chosen += choose_workers(candidates, count - len(chosen), salt,
                                     exclude=used | set(chosen))
        if not chosen:
            return None
        now = trio.current_time()
        for worker in chosen:
            calc.assigned[worker] = now
        return dataclasses.replace(calc.order, workers=tuple(chosen))

    async def _publish_orders(self, run: _JobRun, orders: list[CalculationOrder]) -> None:
        if orders:
            await self.node.topics.publish(
                run.topic, Assignment(job=run.job_id, round=run.round, orders=tuple(orders))
            )

    async def _run_round(self, run: _JobRun) -> None:
        spec = run.spec
        run.calcs = {}
        orders = []
        for _ in range(spec.calculations_per_round):
            calc = self._new_calculation(run, run.next_calc)
            run.next_calc += 1
            run.calcs[calc.order.calc] = calc
            order = self._staff(run, calc, spec.redundancy)
            if order is not None:
                orders.append(order)
        started = trio.current_time()
        await self._publish_orders(run, orders)
        published = trio.current_time()
        await self._collect(run)
        collected = trio.current_time()
        await self._close_round(run)
        self.rounds_completed += 1
        self.round_seconds.append(trio.current_time() - started)
        del self.round_seconds[:-MAX_TIMINGS]
        log.debug(
            "Round %d: orders out in %.1f ms, results in %.1f ms, closed in %.1f ms",
            run.round - 1, 1000 * (published - started), 1000 * (collected - published),
            1000 * (trio.current_time() - collected),
        )

    async def _collect(self, run: _JobRun) -> None:
        """Wait until every calculation of the round is accepted, staffing as needed."""
        deadline_s = self.config.result_deadline_s
        while True:
            now = trio.current_time()
            orders = []
            pending = False
            for calc_id, calc in list(run.calcs.items()):
                vote = calc.vote
                if vote.state is VoteState.FAILED:
                    self._record_vote(run, vote)
                    if calc.attempt >= self.config.max_vote_attempts:
                        raise JobFailed(f"the vote on calculation {calc_id} failed "
                                        f"{calc.attempt} times")
                    log.warning("Vote on calculation %d failed; computing it again", calc_id)
                    calc = run.calcs[calc_id] = self._new_calculation(
                        run, calc_id, attempt=calc.attempt + 1
                    )
                    vote = calc.vote
                if vote.state is VoteState.ACCEPTED:
                    continue
                pending = True
                for worker, sent in list(calc.assigned.items()):
                    if now - sent > deadline_s:
                        log.info("Worker %s missed the deadline of calculation %d; replacing it",
                                 short(worker), calc_id)
                        del calc.assigned[worker]
                        calc.timed_out.add(worker)
                extra = vote.more_needed(len(calc.assigned))
                order = self._staff(run, calc, extra) if extra else None
                if order is not None:
                    orders.append(order)
                    calc.starved_since = None
                elif extra and not calc.assigned:
                    calc.starved_since = calc.starved_since or now
                    if now - calc.starved_since > self.config.worker_wait_s:
                        raise JobFailed(
                            f"calculation {calc_id} needs {extra} more workers and no eligible "
                            f"worker is left ({len(calc.answered)} have answered)"
                        )
            if not pending:
                return
            await self._publish_orders(run, orders)
            next_deadline = min(
                (sent + deadline_s for c in run.calcs.values() for sent in c.assigned.values()),
                default=now + 1.0,
            )
            with trio.move_on_after(max(0.05, min(next_deadline - now, 1.0))):
                await run.changed.wait()
            run.changed = trio.Event()

    def _record_vote(self, run: _JobRun, vote: CalculationVote) -> None:
        run.ledger.record(vote)
        run.rejected += len(vote.mismatches)

    def _gather_contradictions(self, run: _JobRun, calc_id: int, calc: _Calculation) -> None:
        """Keep the accepted calculation's contradicting signed results as slashing evidence.

        The result bytes go to the store, pinned, so that committee members can
        fetch them to check the evidence themselves.
        """
        accepted = calc.vote.accepted_digest
        if run.manifest.chain is None or accepted is None:
            return
        signers = tuple(
            AcceptedSigner(worker=r.worker, signature=calc.signed[r.worker][1])
            for r in calc.vote.accepted if calc.signed.get(r.worker, ("",))[0] == accepted
        )
        for mismatch in calc.vote.mismatches:
            kept = run.contradictions.setdefault(mismatch.worker, [])
            signed = calc.signed.get(mismatch.worker)
            if (signed is None or signed[0] != mismatch.digest or not signers
                    or len(kept) >= MAX_CONTRADICTIONS_KEPT):
                continue
            for digest in (mismatch.digest, accepted):
                self.node.store.put_verified(digest, calc.bodies[digest])
                self.node.store.pin(digest)
                run.evidence_blobs.append(digest)
            kept.append(ContradictionRecord(
                calc=calc_id, digest=mismatch.digest, signature=signed[1],
                accepted_digest=accepted, accepted=signers,
            ))

    async def _report_equivocation(
        self, run: _JobRun, worker: str, calc: int, first: tuple[str, bytes],
        second: tuple[str, bytes],
    ) -> None:
        """Submit a worker's two signed digests for one calculation to the registry."""
        chain = self.node.chain
        if chain is None:
            return
        try:
            await report_equivocation(chain, run.manifest, worker, calc, first, second)
        except (ChainError, ValueError) as exc:
            log.warning("Could not report %s's equivocation on calculation %d: %s",
                        short(worker), calc, exc)

    async def _order_slashes(self, run: _JobRun) -> None:
        """Ask the committee to co-sign slash orders against workers that kept contradicting."""
        desk, view = self.slash_desk, run.mastership
        needed = desk.config.policy.min_contradictions if desk is not None else 0
        offenders = {w: c for w, c in run.contradictions.items() if len(c) >= needed}
        try:
            if desk is None or view is None or not offenders:
                return
            peers = [p for a in view.ranked if (p := self.node.peer_with_address(a)) is not None]
            with trio.move_on_after(SLASH_ORDER_TIMEOUT_S):
                for offender, records in offenders.items():
                    try:
                        await desk.request_slash(run.manifest, offender, records, peers)
                    except (ChainError, ValueError) as exc:
                        log.warning("Slash order against %s not made: %s", short(offender), exc)
        finally:
            self._release_evidence(run)
            run.status.slashing_done.set()

    def _release_evidence(self, run: _JobRun) -> None:
        for digest in run.evidence_blobs:
            self.node.store.unpin(digest)
        run.evidence_blobs.clear()

    async def _close_round(self, run: _JobRun) -> None:
        accepted = []
        gradients = []
        for calc_id in sorted(run.calcs):
            calc = run.calcs[calc_id]
            self._record_vote(run, calc.vote)
            self._gather_contradictions(run, calc_id, calc)
            digest = calc.vote.accepted_digest
            assert digest is not None
            gradients.append(run.results[digest])
            accepted.append(AcceptedCalculation(
                calc=calc_id, shard=calc.order.shard, result=digest,
                workers=tuple(r.worker for r in calc.vote.accepted),
            ))
        trainer = run.trainer
        assert trainer is not None
        update = trainer.apply_changes if run.spec.calculation == "local_steps" else trainer.step
        weights = await run_blocking(update, gradients)
        raw = encode_tensors(weights)
        previous = run.weights_digest
        digest = self.node.store.put(raw)
        self.node.store.pin(digest)
        run.weights_digest = digest
        run.accepted_total += len(accepted)
        finished_round = run.round
        run.round += 1
        losses = [run.losses.pop(a.calc, 0.0) for a in accepted]
        record = RoundRecord(
            job=run.job_id, round=finished_round, previous_weights=previous, weights=digest,
            accepted=tuple(accepted), train_loss=float(np.mean(losses)) if losses else 0.0,
        )
        run.last_record = record
        self._checkpoint(run)
        # A round is published only once a standby holds it: a takeover loses no accepted work.
        await self._replicate(run)
        await self.node.topics.publish(run.topic, record)
        if previous != run.manifest.initial_weights:
            self.node.store.unpin(previous)
        run.forget_results()
        run.status.round, run.status.weights = run.round, digest
        run.status.calculations_accepted = run.accepted_total
        run.status.results_rejected = run.rejected
        log.info("Job %s round %d done: loss %.4f, weights %s", short(run.job_id),
                 finished_round, record.train_loss, digest[:12])

    async def _replicate(self, run: _JobRun) -> None:
        """Hand the newest checkpoint to the committee members ranked after this master.

        Returns once one of them stored it (the others finish in the background),
        or after `replica_timeout_s` with a warning: the job goes on without a
        fresh replica rather than stall.
        """
        view, blob = run.mastership, run.checkpoint_blob
        if view is None or blob is None or run.nursery is None:
            return
        peers = [peer for address in rank_after(view.ranked, view.current)
                 if (peer := self.node.peer_with_address(address)) is not None]
        if not peers:
            log.warning("Job %s round %d: no committee member ranked after this master is "
                        "known, so nobody can take the job over", short(run.job_id), run.round)
            return
        offer = ReplicaOffer(
            job=run.job_id, manifest_size=len(run.manifest.encode()), rank=view.current_rank,
            round=run.round, checkpoint=blob[0], checkpoint_size=blob[1],
        )
        raw = self.node.codec.seal(offer, context=REPLICA_PROTOCOL)
        stored = trio.Event()
        timeout = self.config.replica_timeout_s

        async def push(peer: str) -> None:
            try:
                await self.node.reach(peer, timeout=timeout)
                reply = await self.node.network.request(peer, REPLICA_PROTOCOL, raw,
                                                        timeout=timeout)
                ack = self.node.codec.open(reply, context=REPLICA_PROTOCOL,
                                           from_peer=peer).message
            except (NetworkError, WireError) as exc:
                log.info("Replica of job %s round %d not stored by %s: %s", short(run.job_id),
                         offer.round, short(peer), exc)
                return
            if isinstance(ack, ReplicaAck) and ack.stored and ack.round == offer.round:
                stored.set()
            else:
                reason = ack.reason if isinstance(ack, ReplicaAck) else "an unexpected reply"
                log.info("%s refused the replica of job %s round %d: %s", short(peer),
                         short(run.job_id), offer.round, reason)

        for peer in peers:
            run.nursery.start_soon(push, peer)
        with trio.move_on_after(timeout):
            await stored.wait()
            return
        log.warning("Job %s round %d: no committee member stored the replica within %.0f s",
                    short(run.job_id), offer.round, timeout)

    # --- results -------------------------------------------------------------------
    async def _serve_result(self, stream: Stream) -> None:
        worker = stream.remote_peer
        try:
            with trio.fail_after(self.config.result_deadline_s * 2):
                raw_header = await read_frame(stream, MAX_HEADER_BYTES)
                envelope = self.node.codec.open(raw_header, context=RESULT_PROTOCOL,
                                                from_peer=worker)
                header = envelope.message
                if not isinstance(header, ResultHeader):
                    raise WireError("type", f"expected {ResultHeader.TYPE}")
                reason = self._check_header(worker, header)
                if reason:
                    ack = ResultAck(calc=header.calc, taken=False, reason=reason)
                else:
                    body = await read_exactly(stream, header.size)
                    ack = self._take_result(worker, header, body)
                await write_frame(stream, self.node.codec.seal(ack, context=RESULT_PROTOCOL))
        except (WireError, NetworkError, trio.TooSlowError) as exc:
            log.warning("Dropped a result stream from %s: %s", short(worker), exc)

    def _check_header(self, worker: str, header: ResultHeader) -> str:
        run = self._runs.get(header.job)
        if run is None:
            return "this master runs no such job"
        calc = run.calcs.get(header.calc)
        if calc is None or header.round != run.round:
            return f"calculation {header.calc} of round {header.round} is not open"
        if worker not in calc.assigned and worker not in calc.answered | calc.timed_out:
            return f"calculation {header.calc} was not assigned to this worker"
        if header.size > self.config.max_result_bytes:
            return f"result of {header.size} bytes exceeds {self.config.max_result_bytes}"
        if not result_signed_by(run.manifest, worker, header.calc, header.digest,
                                header.signature):
            run.rejected += 1
            return "the result's EIP-712 signature is not the worker's"
        return ""

    def _take_result(
        self, worker: str, header: ResultHeader, body: bytes
    ) -> ResultAck:
        run = self._runs.get(header.job)
        calc = run.calcs.get(header.calc) if run else None
        if run is None or calc is None:
            return ResultAck(calc=header.calc, taken=False, reason="the calculation closed")
        if digest_of(body) != header.digest:
            run.rejected += 1
            return ResultAck(calc=header.calc, taken=False, reason="bytes do not match the digest")
        try:
            tensors = decode_tensors(body)
            _check_gradient_shapes(tensors, run.param_shapes)
        except (TensorFormatError, ValueError) as exc:
            run.rejected += 1
            return ResultAck(calc=header.calc, taken=False, reason=f"unusable result: {exc}")
        run.results.setdefault(header.digest, tensors)
        outcome = calc.vote.add(SignedResult(worker=worker, digest=header.digest))
        calc.assigned.pop(worker, None)
        calc.answered.add(worker)
        first = calc.signed.setdefault(worker, (header.digest, header.signature))
        calc.bodies.setdefault(header.digest, body)
        calc.compute_ms[worker] = header.compute_ms
        timing = calc.timing
        if timing is not None:
            timing.result_bytes += len(body)
            if calc.vote.state is VoteState.ACCEPTED and not timing.accepted:
                timing.accepted = True
                timing.latency_s = trio.current_time() - timing.opened_at
                credited = [calc.compute_ms.get(r.worker, 0.0) for r in calc.vote.accepted]
                timing.compute_s = max(credited) / 1000
        if outcome is AddOutcome.COUNTED:
            run.losses[header.calc] = header.loss
        elif outcome in (AddOutcome.EQUIVOCATION, AddOutcome.AFTER_FAILURE):
            run.rejected += 1  # contradicting results are counted with the vote's mismatches
        if outcome is AddOutcome.EQUIVOCATION:
            run.excluded.add(worker)
            second = (header.digest, header.signature)
            if run.manifest.chain is not None and run.nursery is not None:
                run.nursery.start_soon(self._report_equivocation, run, worker, header.calc,
                                       first, second)
        run.ledger.record(calc.vote)
        run.changed.set()
        return ResultAck(calc=header.calc, taken=True, reason=outcome.name.lower())

    # --- evaluations and the end of a job ----------------------------------------------
    async def _read_job_topic(self, run: _JobRun, channel: trio.MemoryReceiveChannel[Any]) -> None:
        async for envelope in channel:
            message = envelope.message
            if isinstance(message, MasterTakeover) and message.job == run.job_id:
                await self._check_takeover(run, envelope.sender, message)
                continue
            if isinstance(message, JobCancel) and message.job == run.job_id:
                if envelope.sender != run.manifest.requester:
                    log.warning("Ignored a cancellation of job %s not signed by its requester",
                                short(run.job_id))
                elif not run.cancelled:
                    run.cancelled = message.reason or "no reason given"
                    log.info("Job %s cancelled by its requester: %s; ending after round %d",
                             short(run.job_id), run.cancelled, run.round)
                continue
            if not isinstance(message, Evaluation) or message.job != run.job_id:
                continue
            if envelope.sender != run.manifest.requester:
                log.warning("Ignored an evaluation of job %s not signed by its requester",
                            short(run.job_id))
                continue
            row = {"round": message.round, "weights": message.weights, "loss": message.loss,
                   "accuracy": message.accuracy, "samples": message.samples}
            run.status.evaluations.append(row)
            if run.target_round is None and _target_met(run, message):
                run.target_round = (message.round, message.weights)
                run.changed.set()

    async def _finish(self, run: _JobRun, reason: str) -> None:
        credits = tuple(run.credit_rows())
        settled = None
        if run.manifest.chain is not None and not run.escrow_lost:
            credits, settled = await self._settle(run, credits)
        if run.manifest.chain is not None and settled is None:
            reason = f"{reason}; not settled (the requester can refund after the deadline)"
        done = JobDone(
            job=run.job_id, rounds=run.round, weights=run.weights_digest, reason=reason[:256],
            calculations_accepted=run.accepted_total, results_rejected=run.rejected,
            credits=credits, settle_tx=settled.tx_hash if settled else "",
        )
        run.status.reason = reason
        if not run.replaced:  # else the job goes on under its new master, which will end it
            try:
                await self.node.topics.publish(run.topic, done)
            except (NetworkError, WireError) as exc:
                log.warning("Could not publish the end of job %s: %s", short(run.job_id), exc)
        self._checkpoint(run, finished=True)
        if run.checkpoint_blob is not None:
            self.node.store.unpin(run.checkpoint_blob[0])
            run.checkpoint_blob = None
        if run.replaced or self._nursery is None:
            self._release_evidence(run)
            run.status.slashing_done.set()
        else:  # in the background: the next job in the queue need not wait for the committee
            self._nursery.start_soon(self._order_slashes, run)
        log.info("Job %s finished after %d rounds: %s", short(run.job_id), run.round, reason)

    async def _settle(
        self, run: _JobRun, credits: tuple[WorkerCredit, ...]
    ) -> tuple[tuple[WorkerCredit, ...], Settled | None]:
        """Post the payouts' merkle root to the escrow.

        Returns the credits with the partners the tree was built from, and
        what the escrow paid (None when settling failed: logged). A failed
        attempt is retried while the escrow's deadline allows.
        """
        chain = self.node.chain
        if chain is None:
            log.error("Job %s is paid but this master has no chain to settle it on",
                      short(run.job_id))
            return credits, None
        key = job_key(run.job_id)
        settled = None
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                job = await chain.job(key)
                if attempt == 1:
                    credits = tuple(await with_partners(chain, credits))
                plan = payout_plan(run.manifest, credits, job.deposit)
                settled = await chain.settle(key, plan.root, plan.accepted_results,
                                             plan.partner_total)
                break
            except ContractReverted as exc:
                log.error("The escrow refused to settle job %s: %s", short(run.job_id), exc)
                return credits, None
            except (ChainError, ValueError) as exc:
                log.warning("Settling job %s failed (attempt %d of %d): %s",
                            short(run.job_id), attempt, SETTLE_ATTEMPTS, exc)
                await trio.sleep(2.0 * attempt)
        if settled is None:
            return credits, None
        run.status.settlement = settled
        log.info(
            "Settled job %s: %d accepted results, cost %d, master fee %d, refund %d (tx %s)",
            short(run.job_id), settled.accepted_results, settled.cost, settled.master_fee,
            settled.refund, settled.tx_hash,
        )
        return credits, settled

    # --- checkpoints ---------------------------------------------------------------------
    def _checkpoint(self, run: _JobRun, finished: bool = False) -> None:
        trainer = run.trainer
        if trainer is None:
            return
        optimizer_digest = self.node.store.put(encode_tensors(trainer.optimizer_state()))
        self.node.store.pin(optimizer_digest)
        rows = run.credit_rows()
        credits = {row.worker: row.accepted for row in rows}
        mismatches = {row.worker: row.mismatches for row in rows}
        state = {
            "job": run.job_id, "round": run.round,
            "weights": run.weights_digest, "optimizer": optimizer_digest,
            "next_calc": run.next_calc, "credits": credits, "mismatches": mismatches,
            "excluded": sorted(row.worker for row in rows if row.excluded),
            "rejected": run.rejected, "accepted_total": run.accepted_total,
            "evaluations": run.status.evaluations, "finished": finished,
            "record": run.last_record.to_body() if run.last_record else None,
        }
        packed = msgpack.packb(state, use_bin_type=True)
        folder = self.jobs_dir / run.job_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / CHECKPOINT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(packed)
        os.replace(tmp, path)
        if run.mastership is not None and not finished:
            blob = self.node.store.put(packed)
            self.node.store.pin(blob)
            if run.checkpoint_blob is not None:
                self.node.store.unpin(run.checkpoint_blob[0])
            run.checkpoint_blob = (blob, len(packed))
        previous = run.optimizer_digest
        if previous and previous != optimizer_digest:
            self.node.store.unpin(previous)
        run.optimizer_digest = optimizer_digest

    def _load_checkpoint(self, job_id: str) -> dict[str, Any] | None:
        path = self.jobs_dir / job_id / CHECKPOINT_FILE
        try:
            state = msgpack.unpackb(path.read_bytes(), raw=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("Ignoring an unreadable checkpoint %s: %s", path, exc)
            return None
        problem = checkpoint_problem(state, job_id)
        if problem:
            log.warning("Ignoring the checkpoint %s: %s", path, problem)
            return None
        return dict(state)

    def _checkpointed_jobs(self) -> list[JobManifest]:
        """Manifests of jobs that were running when this master last stopped."""
        manifests = []
        if not self.jobs_dir.is_dir():
            return manifests
        for folder in sorted(self.jobs_dir.iterdir()):
            state = self._load_checkpoint(folder.name)
            if state is None or state.get("finished"):
                continue
            raw = self.node.store.get(folder.name)
            if raw is None:
                continue
            try:
                manifests.append(JobManifest.decode(raw))
            except ManifestError as exc:
                log.warning("Cannot resume job %s: %s", short(folder.name), exc)
        return manifests


def _check_gradient_shapes(
    gradient: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """A gradient names every parameter once, with its shape, in float32."""
    missing = sorted(set(shapes) - set(gradient))
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is missing")
    for name, array in gradient.items():
        shape = shapes.get(name)
        if shape is None:
            raise ValueError(f"tensor {name!r} is not a parameter of the model")
        if array.shape != shape or array.dtype != np.float32:
            raise ValueError(f"tensor {name!r}: expected float32 {shape}, got "
                             f"{array.dtype} {array.shape}")


def _target_met(run: _JobRun, evaluation: Evaluation) -> bool:
    stop = run.spec.stop
    accuracy = evaluation.accuracy
    if stop.target_accuracy is not None and accuracy is not None:
        return accuracy >= stop.target_accuracy
    return stop.target_loss is not None and evaluation.loss <= stop.target_loss
