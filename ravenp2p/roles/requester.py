"""The requester: turns a job spec and a dataset into a job, and follows it to the end.

It is the whitepaper's data repository for its own job: it loads the dataset,
keeps the holdout split to itself, cuts the training split into
content-addressed shards, stores and announces them (and the initial weights
and the manifest) so workers can fetch them from it or from each other, and
submits the job to a master. On a node with a chain, the job is paid: the
requester deposits its budget in the job escrow first, and submits to the
master the escrow names (the committee member ranked first for the job id).
While the job runs it scores round records on the
holdout (every `evaluate_every` rounds, always the newest) and publishes signed
evaluations, which is how the master learns that a target was reached.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from consensus.election import rank_masters
from consensus.mastership import Mastership, Verdict
from consensus.settlement import MARGIN_PERCENT
from ravenp2p.blocking import run_blocking
from ravenp2p.chain.base import ChainError, Deployment
from ravenp2p.chain.pricing import (
    MAX_PRICE_AGE_S,
    PriceRefused,
    current_quote,
    price_in_raven,
    usd_per_raven,
)
from ravenp2p.data.blobs import BlobError
from ravenp2p.data.store import chunk_digests
from ravenp2p.network.base import NetworkError
from ravenp2p.node.control import RequestRefused
from ravenp2p.node.node import Node, short
from ravenp2p.roles.committee import CommitteeView
from ravenp2p.roles.escrow import confirmed_master, job_key, max_calculations, peer_address
from ravenp2p.roles.protocol import SUBMIT_PROTOCOL, job_topic
from ravenp2p.training.compute import Evaluation as Score
from ravenp2p.training.compute import ModelRuntime
from ravenp2p.training.datasets import DataInfo, Split, cut_shards, load_dataset
from ravenp2p.training.manifest import JobManifest, ShardRef
from ravenp2p.training.model_file import save_model
from ravenp2p.training.selector import resolve_model
from ravenp2p.training.spec import JobSpec, JobSpecError, format_amount
from ravenp2p.training.tensors import decode_tensors, digest_of, encode_tensors
from ravenp2p.wire import WireError
from ravenp2p.wire.job_messages import (
    Evaluation,
    JobCancel,
    JobDone,
    JobReceipt,
    JobSubmit,
    MasterTakeover,
    RoundRecord,
)

log = logging.getLogger("ravenp2p.requester")

DEFAULT_CHUNK_SIZE = 1 << 20
ESCROW_DEADLINE_S = 24 * 3600
"""Default time a master has to settle a paid job before the requester may take its deposit back."""
ROUND_RECORD_GRACE_S = 15.0
"""How long the requester waits, after the end of a job, for round records gossip missed."""
SUBMIT_TIMEOUT_S = 600.0
"""How long a submission through the control endpoint may take (data, shards, deposit, master)."""
MODEL_FILE = "model.safetensors"
STATUS_FILE = "status.json"
JOB_STATES = ("running", "cancelling", "done", "cancelled", "failed", "lost")
"""A job's states: ended jobs are done, cancelled or failed; `lost` is a job this node
stopped following when it stopped (its master may still have finished it)."""


class JobRefused(RuntimeError):
    """The master refused the job; the message carries its reason."""


class NoMaster(RuntimeError):
    """No master can be named for the job: no chain to elect one, or it is not a known peer."""


@dataclass
class JobResult:
    """How a job ended, as the requester saw it."""

    job_id: str
    done: JobDone
    weights: dict[str, np.ndarray]
    evaluation: Score
    evaluations: list[dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class Failover:
    """A takeover of the job as the requester saw it."""

    round: int
    """The round the new master resumed at."""
    old_master: str
    new_master: str
    at: float
    """When the takeover reached this node (trio clock)."""
    silent_s: float
    """How long the old master had been silent by then."""


@dataclass
class JobHandle:
    """A submitted job: its manifest, its progress, and its end."""

    manifest: JobManifest
    master: str
    holdout: Split
    runtime: ModelRuntime
    submitted_at: float
    rounds: list[RoundRecord] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    result: JobResult | None = None
    finished: trio.Event = field(default_factory=trio.Event)
    mastership: Mastership | None = None
    """A paid job's ranked masters (the escrow's): who may take it over (None: unpaid)."""
    failovers: list[Failover] = field(default_factory=list)
    stale_messages: int = 0
    """Messages of replaced masters, rejected."""
    masters_seen: list[str] = field(default_factory=list)
    """Every master that ran the job, in order: providers of its weights."""
    last_heard: float = 0.0
    rewritten: list[int] = field(default_factory=list)
    """Rounds whose record a later master replaced with a different one (work done again)."""
    progress: trio.Event = field(default_factory=trio.Event)
    """Set, and replaced by a fresh event, whenever a round record or a takeover arrives."""
    cancel_reason: str = ""
    """Why the requester cancelled the job ("" unless it did)."""
    model_file: Path | None = None
    """Where the final weights were saved, once the job ended (with a results folder)."""

    @property
    def job_id(self) -> str:
        return self.manifest.job_id

    @property
    def state(self) -> str:
        """One of `JOB_STATES`."""
        if self.result is None:
            return "cancelling" if self.cancel_reason else "running"
        reason = self.result.done.reason
        if reason.startswith("failed"):
            return "failed"
        return "cancelled" if reason.startswith("cancelled") else "done"

    def status(self) -> dict[str, Any]:
        """What a person or a script wants to know of the job, as plain JSON data.

        Amounts are decimal strings of RAVEN; `spent` is what the accepted work
        costs so far with the 10% margin (None for an unpaid job).
        """
        spec = self.manifest.spec
        result = self.result
        elapsed = (result.seconds if result is not None
                   else trio.current_time() - self.submitted_at)
        accepted = sum(len(record.accepted) for record in self.rounds)
        paid = sum(min(len(a.workers), spec.redundancy)
                   for record in self.rounds for a in record.accepted)
        latest = self.evaluations[-1] if self.evaluations else None
        accuracy = latest["accuracy"] if latest else None
        loss = latest["loss"] if latest else None
        evaluated = latest["round"] if latest else None
        if result is not None:
            accepted = result.done.calculations_accepted
            paid = sum(credit.accepted for credit in result.done.credits)
            if result.evaluation.samples:  # the final weights' own score
                accuracy, loss = result.evaluation.accuracy, result.evaluation.loss
                evaluated = next((row["round"] for row in self.evaluations
                                  if row["weights"] == result.done.weights),
                                 result.done.rounds - 1)
        cost = paid * spec.price_per_calculation
        return {
            "job_id": self.job_id,
            "created_ms": self.manifest.created_ms,
            "name": spec.name,
            "model": spec.model.chosen or "custom",
            "state": self.state,
            "master": self.master,
            "round": max((r.round + 1 for r in self.rounds), default=0)
            if result is None else result.done.rounds,
            "max_rounds": spec.stop.max_rounds,
            "accuracy": accuracy,
            "loss": None if loss is None or not np.isfinite(loss) else loss,
            "evaluated_round": evaluated,
            "calculations_accepted": accepted,
            "results_paid": paid,
            "results_rejected": None if result is None else result.done.results_rejected,
            "verified_per_s": round(accepted / elapsed, 3) if elapsed > 0 else 0.0,
            "paid": self.manifest.chain is not None,
            "spent": (format_amount(cost + cost * MARGIN_PERCENT // 100)
                      if self.manifest.chain is not None else None),
            "budget": format_amount(spec.budget),
            "elapsed_s": round(elapsed, 3),
            "failovers": len(self.failovers),
            "reason": "" if result is None else result.done.reason,
            "settle_tx": "" if result is None else result.done.settle_tx,
            "model_file": None if self.model_file is None else str(self.model_file),
        }

    async def wait(self, timeout: float) -> JobResult:
        """The job's result, once its master declares it done (TooSlowError after `timeout`)."""
        with trio.fail_after(timeout):
            await self.finished.wait()
        assert self.result is not None
        return self.result


@dataclass(frozen=True)
class PreparedJob:
    """A job cut into blobs, ready to submit: manifest, holdout and the blobs it references."""

    manifest: JobManifest
    info: DataInfo
    holdout: Split
    blobs: dict[str, bytes]


def prepare_job(
    spec: JobSpec,
    requester: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chain: Deployment | None = None,
    created_ms: int | None = None,
) -> PreparedJob:
    """Load the data, pick the model when `auto`, cut shards, make the initial weights.

    `chain` names the deployment that will hold the job's escrow (None: unpaid).
    `created_ms` (Unix milliseconds, default now) goes into the manifest, so into
    the job id: the node passes its clock's time, virtual in a simulation.

    CPU-bound and blocking: call it in a worker thread.
    """
    info, train, holdout = load_dataset(spec.dataset)
    spec = resolve_model(
        spec, info.kind, info.input_shape,
        num_classes=info.num_classes, vocab_size=info.vocab_size,
    )
    runtime = ModelRuntime(spec.model, info, spec.loss)
    blobs: dict[str, bytes] = {}
    shards = []
    for raw in cut_shards(train, spec.samples_per_calculation):
        digest = digest_of(raw)
        if digest in blobs:
            continue
        blobs[digest] = raw
        shards.append(ShardRef(digest, len(raw), tuple(chunk_digests(raw, chunk_size))))
    weights = encode_tensors(runtime.initial_weights(spec.seed))
    weights_digest = digest_of(weights)
    blobs[weights_digest] = weights
    manifest = JobManifest(
        spec=spec, data=info, shards=tuple(shards), initial_weights=weights_digest,
        requester=requester, holdout_samples=len(holdout.targets), chunk_size=chunk_size,
        created_ms=int(time.time() * 1000) if created_ms is None else created_ms,
        chain=chain,
    )
    blobs[manifest.job_id] = manifest.encode()
    return PreparedJob(manifest, info, holdout, blobs)


class Requester:
    """Submits jobs from this node and follows them; start `run` in a nursery first.

    With `results_dir`, every job's final weights are saved there as a model
    file (`<job id>/model.safetensors`) with its last status beside it, so a
    result outlives the node. The requester answers the control endpoint's
    `submit`, `jobs`, `job` and `cancel` operations (what `ravenp2p.Client`
    and `ravenp2p submit|jobs|status|cancel` use).
    """

    def __init__(self, node: Node, results_dir: Path | None = None) -> None:
        self.node = node
        self.jobs: dict[str, JobHandle] = {}
        self.results_dir = results_dir
        self._nursery: trio.Nursery | None = None
        node.add_control_op("submit", self._control_submit, SUBMIT_TIMEOUT_S)
        node.add_control_op("jobs", self._control_jobs)
        node.add_control_op("job", self._control_job)
        node.add_control_op("cancel", self._control_cancel)

    async def run(
        self, *, task_status: trio.TaskStatus[Requester] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the tasks that follow submitted jobs, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def submit(
        self,
        spec: JobSpec,
        master: str | None = None,
        timeout: float = 60.0,
        *,
        deadline_s: float = ESCROW_DEADLINE_S,
        max_price_age_s: int = MAX_PRICE_AGE_S,
    ) -> JobHandle:
        """Prepare the job, publish its blobs, and hand it to its master.

        On a node with a chain the job is paid: its budget is deposited in the
        escrow (settlement is due within `deadline_s`) and `master` defaults to
        the one the escrow names. A USD-priced job is first priced in RAVEN at
        the deployment's price feed, whose answer may be at most
        `max_price_age_s` old. Raises `JobRefused` with the master's reason,
        `NoMaster`, `ChainError` when the deposit fails (`PriceRefused` when
        the feed cannot price the job), `NetworkError` when the master cannot
        be reached.
        """
        if self._nursery is None:
            raise RuntimeError("Requester.run must be started before submitting")
        chain = self.node.chain
        deployment = chain.deployment if chain is not None else None
        if chain is not None and spec.currency == "USD":
            quote = await current_quote(chain, max_price_age_s)
            usd, spec = spec, price_in_raven(spec, quote)
            log.info("Priced %s at %s (feed round %d): %s USD = %s RAVEN per calculation, "
                     "budget %s USD = %s RAVEN", spec.name, usd_per_raven(quote), quote.round_id,
                     format_amount(usd.price_per_calculation_usd),
                     format_amount(spec.price_per_calculation), format_amount(usd.budget_usd),
                     format_amount(spec.budget))
        prepared = await run_blocking(
            prepare_job, spec, self.node.peer_id, DEFAULT_CHUNK_SIZE, deployment,
            int(self.node.clock.now() * 1000),
        )
        return await self.submit_prepared(prepared, master, timeout, deadline_s=deadline_s)

    async def submit_prepared(
        self,
        prepared: PreparedJob,
        master: str | None = None,
        timeout: float = 60.0,
        *,
        deadline_s: float = ESCROW_DEADLINE_S,
    ) -> JobHandle:
        """Hand an already prepared job to its master (see `submit`)."""
        if self._nursery is None:
            raise RuntimeError("Requester.run must be started before submitting")
        manifest = prepared.manifest
        mastership = None
        if manifest.chain is not None:
            master, mastership = await self._open_escrow(manifest, master, deadline_s)
        if master is None:
            raise NoMaster("an unpaid job needs a master named by the caller")
        store = self.node.store
        for digest, raw in prepared.blobs.items():
            store.put_verified(digest, raw)
            store.pin(digest)
        handle = JobHandle(
            manifest=manifest, master=master, holdout=prepared.holdout,
            runtime=ModelRuntime(manifest.spec.model, manifest.data, manifest.spec.loss),
            submitted_at=trio.current_time(), mastership=mastership, masters_seen=[master],
            last_heard=trio.current_time(),
        )
        self.jobs[manifest.job_id] = handle
        channel = await self.node.topics.subscribe(job_topic(manifest.job_id))
        self._nursery.start_soon(self._follow, handle, channel)
        self._nursery.start_soon(self._announce_blobs, list(prepared.blobs))
        request = JobSubmit(manifest=manifest.job_id, manifest_size=len(manifest.encode()))
        raw = self.node.codec.seal(request, context=SUBMIT_PROTOCOL)
        with trio.fail_after(timeout):
            await self.node.reach(master, timeout=timeout)
            reply = await self.node.network.request(master, SUBMIT_PROTOCOL, raw, timeout=timeout)
        receipt = self.node.codec.open(reply, context=SUBMIT_PROTOCOL, from_peer=master).message
        if not isinstance(receipt, JobReceipt) or receipt.job != manifest.job_id:
            raise WireError("type", "the master answered the submission with something else")
        if not receipt.accepted:
            del self.jobs[manifest.job_id]
            channel.close()
            raise JobRefused(receipt.reason)
        log.info("Job %s (%s) accepted by %s", short(manifest.job_id), manifest.spec.name,
                 short(master))
        if self.results_dir is not None:
            try:
                self._write_status(handle)
            except OSError as exc:
                log.warning("Could not note job %s in %s: %s", short(manifest.job_id),
                            self.results_dir, exc)
        return handle

    async def _open_escrow(
        self, manifest: JobManifest, master: str | None, deadline_s: float
    ) -> tuple[str, Mastership]:
        """Deposit the job's budget in its escrow; the peer id of the master it names, and its line.

        The master is predicted from the epoch's committee (elected first when
        nobody has yet) before anything is deposited, so a job that no known
        peer could run locks no money.
        """
        chain = self.node.chain
        if chain is None or chain.deployment != manifest.chain:
            raise NoMaster("the job is paid on a chain this node is not connected to")
        spec = manifest.spec
        if spec.currency != "RAVEN":
            raise PriceRefused(f"job {short(manifest.job_id)} is priced in {spec.currency}: a paid "
                               "job is prepared from its spec priced in RAVEN (submit does that)")
        key = job_key(manifest.job_id)
        epoch = await chain.current_epoch()
        if not await chain.is_elected(epoch):  # createJob would elect it, after the deposit
            await chain.elect()
        master = self._check_master(master, rank_masters(key, await chain.committee(epoch))[0])
        deadline = await chain.now() + int(deadline_s)
        tx = await chain.create_job(
            key, spec.price_per_calculation, spec.redundancy, max_calculations(manifest),
            deadline, spec.budget,
        )
        log.info("Deposited %d base units for job %s (tx %s)", spec.budget,
                 short(manifest.job_id), tx)
        job = await chain.job(key)
        ranked = await CommitteeView(chain).job_masters(key)  # recomputed, and checked
        view = Mastership(tuple(ranked), current_rank=job.master_rank)
        return self._check_master(master, view.current), view

    def _check_master(self, master: str | None, named: str) -> str:
        """`master`, or the peer with the `named` address, when the two are the same peer."""
        if master is None:
            peer = self.node.peer_with_address(named)
            if peer is None:
                raise NoMaster(f"the job's master {named} is not a peer this node knows")
            return peer
        if peer_address(master) != named:
            raise NoMaster(f"{master} is not the job's master: the escrow names {named}")
        return master

    async def cancel(self, job_id: str, reason: str = "") -> JobHandle:
        """Ask the job's master to stop after the round in progress.

        A paid job then settles what was accepted so far, and the escrow
        refunds the rest of the deposit; `KeyError` for a job this node did
        not submit, `ValueError` for one that already ended.
        """
        handle = self.jobs[job_id]
        if handle.result is not None:
            raise ValueError(f"job {short(job_id)} already ended: {handle.result.done.reason}")
        handle.cancel_reason = reason or "cancelled by its requester"
        await self._send_cancel(handle)
        log.info("Asked %s to cancel job %s", short(handle.master), short(job_id))
        return handle

    async def _send_cancel(self, handle: JobHandle) -> None:
        message = JobCancel(job=handle.job_id, reason=handle.cancel_reason[:256])
        await self.node.topics.publish(job_topic(handle.job_id), message)

    async def refund(self, job_id: str) -> str:
        """Take back the deposit of a paid job nobody settled by its deadline (the tx hash)."""
        chain = self.node.chain
        if chain is None:
            raise NoMaster("refunds need a chain")
        return await chain.refund(job_key(job_id))

    async def _announce_blobs(self, digests: list[str]) -> None:
        for digest in digests:
            await self.node.blobs.announce(digest)

    async def _follow(self, handle: JobHandle, channel: trio.MemoryReceiveChannel[Any]) -> None:
        """Read the job topic: score round records, collect the end of the job."""
        evaluate_every = handle.manifest.spec.stop.evaluate_every
        latest: list[RoundRecord] = []
        wake = trio.Event()

        async def evaluator() -> None:
            nonlocal wake
            while True:
                await wake.wait()
                wake = trio.Event()
                if latest:
                    record = latest.pop()
                    latest.clear()
                    await self._evaluate(handle, record)

        done: JobDone | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(evaluator)
            async for envelope in channel:
                message = envelope.message
                if envelope.sender != handle.master:
                    await self._from_another_master(handle, envelope.sender, message)
                    continue
                handle.last_heard = trio.current_time()
                if isinstance(message, RoundRecord) and message.job == handle.job_id:
                    _keep_record(handle, message)
                    if (message.round + 1) % evaluate_every == 0:
                        latest.append(message)
                        wake.set()
                elif isinstance(message, JobDone) and message.job == handle.job_id:
                    done = message
                    break
            if done is not None:
                await self._collect_missing_rounds(handle, channel, done.rounds)
            nursery.cancel_scope.cancel()
        channel.close()
        if done is not None:
            await self._conclude(handle, done)

    async def _collect_missing_rounds(
        self, handle: JobHandle, channel: trio.MemoryReceiveChannel[Any], rounds: int
    ) -> None:
        """Gossip may deliver the end before some round records; resync brings them (bounded)."""
        with trio.move_on_after(ROUND_RECORD_GRACE_S):
            while {r.round for r in handle.rounds} < set(range(rounds)):
                envelope = await channel.receive()
                message = envelope.message
                if (envelope.sender == handle.master and isinstance(message, RoundRecord)
                        and message.job == handle.job_id):
                    _keep_record(handle, message)
        handle.rounds.sort(key=lambda record: record.round)

    async def _from_another_master(self, handle: JobHandle, sender: str, message: Any) -> None:
        """Follow a takeover the escrow confirms; count what a replaced master still says."""
        view = handle.mastership
        if view is None or sender == handle.manifest.requester:
            return
        address = peer_address(sender)
        if not isinstance(message, MasterTakeover) or message.job != handle.job_id:
            if view.judge(address) is Verdict.REPLACED:
                handle.stale_messages += 1
                log.log(logging.INFO if handle.stale_messages == 1 else logging.DEBUG,
                        "Rejected a %s of job %s from its replaced master %s", message.TYPE,
                        short(handle.job_id), short(sender))
            return
        chain = self.node.chain
        if chain is None or view.rank_of(address) != message.rank:
            return
        try:
            confirmed = await confirmed_master(chain, handle.job_id, address)
        except ChainError as exc:
            log.warning("Cannot check a takeover of job %s: %s", short(handle.job_id), exc)
            return
        now = trio.current_time()
        if not confirmed or view.take_over(address, now):
            log.warning("Ignored a takeover of job %s the escrow does not confirm",
                        short(handle.job_id))
            return
        handle.failovers.append(Failover(
            round=message.round, old_master=handle.master, new_master=sender, at=now,
            silent_s=now - handle.last_heard,
        ))
        log.info("Job %s taken over by %s (rank %d) after %.1f s of silence; resuming at "
                 "round %d", short(handle.job_id), short(sender), message.rank,
                 now - handle.last_heard, message.round)
        handle.master = sender
        handle.masters_seen.append(sender)
        handle.last_heard = now
        handle.progress.set()
        handle.progress = trio.Event()
        if handle.cancel_reason:  # the replica the new master resumed from predates it
            await self._send_cancel(handle)

    async def _scored(self, handle: JobHandle, digest: str) -> tuple[dict[str, np.ndarray], Score]:
        providers = [handle.master, *reversed(handle.masters_seen)]
        raw = await self.node.blobs.fetch(
            digest, providers=list(dict.fromkeys(providers)), timeout=60, announce=False
        )
        weights = decode_tensors(raw)
        score = await run_blocking(handle.runtime.evaluate, weights, handle.holdout)
        return weights, score

    async def _evaluate(self, handle: JobHandle, record: RoundRecord) -> None:
        try:
            _, score = await self._scored(handle, record.weights)
        except (BlobError, NetworkError, trio.TooSlowError, ValueError) as exc:
            log.warning("Could not score round %d: %s", record.round, exc)
            return
        row = {"round": record.round, "weights": record.weights, "loss": score.loss,
               "accuracy": score.accuracy, "seconds": trio.current_time() - handle.submitted_at}
        handle.evaluations.append(row)
        log.info("Round %d on the holdout: accuracy %s, loss %.4f", record.round,
                 "n/a" if score.accuracy is None else f"{score.accuracy:.4f}", score.loss)
        message = Evaluation(
            job=handle.job_id, round=record.round, weights=record.weights,
            loss=score.loss if np.isfinite(score.loss) else 1e30,
            accuracy=score.accuracy, samples=score.samples,
        )
        await self.node.topics.publish(job_topic(handle.job_id), message)

    async def _conclude(self, handle: JobHandle, done: JobDone) -> None:
        try:
            weights, score = await self._scored(handle, done.weights)
        except (BlobError, NetworkError, trio.TooSlowError, ValueError) as exc:
            log.error("Could not fetch the final weights of job %s: %s", short(handle.job_id), exc)
            weights, score = {}, Score(accuracy=None, loss=float("nan"), samples=0)
        handle.result = JobResult(
            job_id=handle.job_id, done=done, weights=weights, evaluation=score,
            evaluations=handle.evaluations,
            seconds=trio.current_time() - handle.submitted_at,
        )
        if self.results_dir is not None:
            try:
                await run_blocking(self._save_result, handle)
            except (OSError, ValueError) as exc:
                log.error("Could not save the result of job %s: %s", short(handle.job_id), exc)
        handle.finished.set()

    def _save_result(self, handle: JobHandle) -> None:
        """Write the model file (when there are weights) and the final status."""
        assert self.results_dir is not None and handle.result is not None
        result = handle.result
        folder = self.results_dir / handle.job_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if result.weights:
            score = result.evaluation
            metrics = {"accuracy": score.accuracy,
                       "loss": score.loss if np.isfinite(score.loss) else None,
                       "samples": score.samples, "rounds": result.done.rounds}
            handle.model_file = save_model(
                folder / MODEL_FILE, result.weights, handle.manifest.spec, handle.manifest.data,
                job_id=handle.job_id, metrics=metrics,
            )
        self._write_status(handle)
        log.info("Saved the result of job %s in %s", short(handle.job_id), folder)

    def _write_status(self, handle: JobHandle) -> None:
        assert self.results_dir is not None
        folder = self.results_dir / handle.job_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = folder / (STATUS_FILE + ".tmp")
        temporary.write_text(json.dumps(handle.status(), indent=2), encoding="utf-8")
        os.replace(temporary, folder / STATUS_FILE)

    # --- the control endpoint ----------------------------------------------------------
    def _saved_statuses(self) -> dict[str, dict[str, Any]]:
        """Statuses of ended jobs saved by an earlier run of this node."""
        found: dict[str, dict[str, Any]] = {}
        if self.results_dir is None or not self.results_dir.is_dir():
            return found
        for path in self.results_dir.glob(f"*/{STATUS_FILE}"):
            try:
                status = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(status, dict) or status.get("job_id") != path.parent.name:
                continue
            if status.get("state") in ("running", "cancelling"):
                status["state"] = "lost"
                status["reason"] = ("this node stopped while the job ran; its master may have "
                                    "finished it (a paid job's escrow says so)")
            found[path.parent.name] = status
        return found

    def _all_statuses(self) -> dict[str, dict[str, Any]]:
        statuses = self._saved_statuses()
        statuses.update({job_id: handle.status() for job_id, handle in self.jobs.items()})
        return statuses

    def resolve(self, reference: object, statuses: dict[str, dict[str, Any]]) -> str:
        """The job id that `reference` (a whole id or a unique prefix) names."""
        if not isinstance(reference, str) or not reference:
            raise ValueError('job: a job id (or a unique prefix of one) is needed')
        if reference in statuses:
            return reference
        matches = [job_id for job_id in statuses if job_id.startswith(reference.lower())]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ValueError(f"job: {reference!r} is the prefix of {len(matches)} jobs; "
                             "give more of the id")
        raise ValueError(f"job: this node submitted no job {reference!r}")

    async def _control_submit(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            spec = JobSpec.from_dict(request.get("spec"))
        except JobSpecError as exc:
            raise ValueError(f"spec: {exc}") from None
        master = request.get("master")
        if master is not None and not isinstance(master, str):
            raise ValueError('master: must be a peer id string')
        try:
            handle = await self.submit(spec, master)
        except (JobRefused, NoMaster, ChainError, NetworkError, WireError, BlobError) as exc:
            raise RequestRefused(f"the job was not submitted: {exc}") from None
        except trio.TooSlowError:
            raise RequestRefused("the job was not submitted: its master did not answer") from None
        return handle.status()

    async def _control_jobs(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted(self._all_statuses().values(),
                      key=lambda s: (s.get("created_ms", 0), s["job_id"]))

    async def _control_job(self, request: dict[str, Any]) -> dict[str, Any]:
        statuses = self._all_statuses()
        return statuses[self.resolve(request.get("job"), statuses)]

    async def _control_cancel(self, request: dict[str, Any]) -> dict[str, Any]:
        statuses = self._all_statuses()
        job_id = self.resolve(request.get("job"), statuses)
        if job_id not in self.jobs:
            raise ValueError(f"job: {short(job_id)} already ended: {statuses[job_id]['reason']}")
        reason = request.get("reason", "")
        if not isinstance(reason, str):
            raise ValueError("reason: must be a string")
        try:
            handle = await self.cancel(job_id, reason)
        except (NetworkError, WireError) as exc:
            raise RequestRefused(f"the cancellation was not sent: {exc}") from None
        return handle.status()


def _keep_record(handle: JobHandle, record: RoundRecord) -> None:
    """Keep a round's record; a new master's record of a round replaces the old one."""
    if any(r.round == record.round and r != record for r in handle.rounds):
        handle.rewritten.append(record.round)
    handle.rounds = [r for r in handle.rounds if r.round != record.round]
    handle.rounds.append(record)
    handle.progress.set()
    handle.progress = trio.Event()
