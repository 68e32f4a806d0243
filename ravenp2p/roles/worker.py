"""The worker (the whitepaper's compute node).

It computes nothing unless its operator consented (`--i-consent` or
`consent = true`); without consent the node still joins the network and says
in its log why it declines each job. With consent it listens for jobs, fetches
each job's manifest, and for every calculation assigned to it: waits for a
token of its throttle (2 calculations/s per percent lent), fetches weights and
shard by digest (cached; the shard fetch starts as soon as the order arrives),
computes the gradient with the pinned profile in a worker thread, signs
(job, calculation, digest) with its node key (EIP-712, so the signature also
counts on-chain) and streams the result to the master. When a paid job ends,
it rebuilds the payout tree from the master's signed credits, checks it
against the root settled on-chain and claims its payout.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from consensus.assignment import in_job_sample
from consensus.mastership import Mastership, Verdict
from ravenp2p.chain.base import ChainError, ContractReverted
from ravenp2p.data.blobs import BlobError
from ravenp2p.network.base import NetworkError
from ravenp2p.network.framing import read_frame, write_frame
from ravenp2p.node.node import Node, short
from ravenp2p.roles.escrow import (
    NotSettledYet,
    SettlementMismatch,
    check_escrow,
    claim_own_payout,
    confirmed_master,
    job_key,
    peer_address,
    sign_result,
)
from ravenp2p.roles.protocol import JOBS_TOPIC, RESULT_PROTOCOL, job_topic
from ravenp2p.roles.signed_journal import SignedJournal
from ravenp2p.roles.throttle import TokenBucket, calculation_rate
from ravenp2p.training.compute import ComputeProfile, ModelRuntime
from ravenp2p.training.datasets import DatasetError, Split, read_shard
from ravenp2p.training.manifest import JobManifest, ManifestError
from ravenp2p.training.tensors import TensorFormatError, decode_tensors, digest_of, encode_tensors
from ravenp2p.wire import Envelope, WireError
from ravenp2p.wire.job_messages import (
    Assignment,
    CalculationOrder,
    JobAnnounce,
    JobDone,
    MasterTakeover,
    ResultAck,
    ResultHeader,
)

log = logging.getLogger("ravenp2p.worker")

DELIVERY_ATTEMPTS = 3
JOURNAL_FOLDER = "signed"

Tensors = dict[str, np.ndarray]
ResultTamperer = Callable[[CalculationOrder, Tensors], Tensors]
"""Fault injection for devnets and simulations: rewrites a computed gradient before it is signed."""
Computation = Callable[[], tuple[Tensors, float]]
"""One calculation, ready to run: returns the result tensors and the loss."""
Calculator = Callable[
    [JobManifest, CalculationOrder, Computation], Awaitable[tuple[Tensors, float, float]]
]
"""Runs a calculation for a worker: its tensors, its loss and the seconds it took.

The daemon's (`calculate_in_thread`) computes in a worker thread and measures
wall time; the simulator computes inline (or reuses the result of an identical
calculation) and charges virtual time from its cost model.
"""


async def calculate_in_thread(
    manifest: JobManifest, order: CalculationOrder, computation: Computation
) -> tuple[Tensors, float, float]:
    """Compute in a worker thread so the node keeps serving its peers; wall-clock seconds."""
    started = time.perf_counter()
    gradient, loss = await trio.to_thread.run_sync(computation)
    return gradient, loss, time.perf_counter() - started


@dataclass(frozen=True)
class WorkerConfig:
    """Limits of a compute node."""

    max_threads: int = 1
    """Upper bound on torch threads per calculation; orders asking for more are declined."""
    fetch_timeout_s: float = 60.0
    submit_timeout_s: float = 60.0
    cached_weights: int = 4
    cached_shards: int = 256
    max_jobs: int = 4
    claim_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_threads < 1:
            raise ValueError("max_threads must be at least 1")


@dataclass
class WorkerStats:
    """What a worker did, for its operator."""

    computed: int = 0
    delivered: int = 0
    refused: int = 0
    declined_jobs: int = 0
    throttled_s: float = 0.0
    compute_s: float = 0.0
    earned: int = 0
    """Base units of RAVEN claimed from settled jobs."""
    stale_messages: int = 0
    """Messages of replaced masters, rejected."""


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class _JobContext:
    def __init__(
        self, manifest: JobManifest, master: str, announce: JobAnnounce | None = None,
        journal: Path | None = None,
    ) -> None:
        self.manifest = manifest
        self.master = master
        self.mastership = (
            Mastership(announce.masters, current_rank=announce.rank)
            if announce is not None and announce.masters else None
        )
        """A paid job's ranked masters: who may take it over from whom (None: unpaid)."""
        self.runtime = ModelRuntime(manifest.spec.model, manifest.data, manifest.spec.loss)
        self.signed = SignedJournal(journal)
        """Calculation -> the digest this worker signed for it and the signature."""


class Worker:
    """A compute node's role; see the module docstring."""

    def __init__(
        self,
        node: Node,
        config: WorkerConfig | None = None,
        tamper: ResultTamperer | None = None,
        second_result: ResultTamperer | None = None,
        calculator: Calculator = calculate_in_thread,
    ) -> None:
        self.node = node
        self.calculator = calculator
        self.config = config or WorkerConfig()
        self.tamper = tamper
        self.second_result = second_result
        """Fault injection: also sign and deliver this rewrite of each result (equivocation)."""
        self.stats = WorkerStats()
        self._jobs: dict[str, _JobContext] = {}
        self._joining: set[str] = set()
        """Jobs whose manifest is being fetched: a repeated announcement starts nothing."""
        self._weights = _LRU(self.config.cached_weights)
        self._shards = _LRU(self.config.cached_shards)
        self._compute_slot = trio.CapacityLimiter(1)
        share = node.config.share
        rate = calculation_rate(share) if share else 1.0
        self._bucket = TokenBucket(rate, burst=max(1.0, rate), clock=node.clock)

    @property
    def consented(self) -> bool:
        return self.node.config.consent and self.node.config.share > 0

    async def run(self, *, task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for jobs until cancelled."""
        channel = await self.node.topics.subscribe(JOBS_TOPIC)
        if self.consented:
            log.info(
                "Worker ready: up to %.0f calculations/s (%d%% of the %s), %d thread(s)",
                self._bucket.rate, self.node.config.share, self.node.config.device,
                self.config.max_threads,
            )
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            async for envelope in channel:
                message = envelope.message
                if (not isinstance(message, JobAnnounce) or message.job in self._jobs
                        or message.job in self._joining):
                    continue
                if not in_job_sample(message.job, self.node.peer_id, message.sample):
                    continue  # not drawn; a later announcement may draw more workers
                if not self.consented:
                    self.stats.declined_jobs += 1
                    why = ("the operator has not consented (start with --i-consent)"
                           if not self.node.config.consent else "the share is 0%")
                    log.info("Declining job %s: %s", short(message.job), why)
                    continue
                if len(self._jobs) >= self.config.max_jobs:
                    log.info("Declining job %s: already in %d jobs", short(message.job),
                             len(self._jobs))
                    continue
                nursery.start_soon(self._join_job, message, envelope.sender)

    async def _join_job(self, announce: JobAnnounce, master: str) -> None:
        job_id = announce.job
        self._joining.add(job_id)
        try:
            await self._follow_job(announce, master)
        finally:
            self._joining.discard(job_id)

    async def _follow_job(self, announce: JobAnnounce, master: str) -> None:
        job_id = announce.job
        try:
            with trio.fail_after(self.config.fetch_timeout_s):
                raw = await self.node.blobs.fetch(
                    job_id, providers=[master, announce.requester], size=announce.manifest_size
                )
            manifest = JobManifest.decode(raw)
            journal = Path(self.node.config.data_dir) / JOURNAL_FOLDER / f"{job_id}.msgpack"
            context = _JobContext(manifest, master, announce, journal)
            refusal = await self._escrow_refusal(manifest, master)
        except (BlobError, NetworkError, trio.TooSlowError, ManifestError, ValueError) as exc:
            log.warning("Cannot take part in job %s: %s", short(job_id), exc)
            return
        if refusal:
            log.warning("Declining job %s: %s", short(job_id), refusal)
            return
        self._jobs[job_id] = context
        log.info("Joined job %s (%s) run by %s", short(job_id), manifest.spec.name, short(master))
        done: JobDone | None = None
        try:
            channel = await self.node.topics.subscribe(job_topic(job_id))
            async with trio.open_nursery() as nursery:
                async for envelope in channel:
                    message = envelope.message
                    if envelope.sender != context.master:
                        await self._from_another_master(context, envelope)
                        continue
                    if isinstance(message, JobDone) and message.job == job_id:
                        log.info("Job %s is done: %s", short(job_id), message.reason)
                        done = message
                        nursery.cancel_scope.cancel()
                        break
                    if isinstance(message, Assignment) and message.job == job_id:
                        for order in message.orders:
                            if self.node.peer_id in order.workers:
                                nursery.start_soon(self._calculate, context, order)
        finally:
            del self._jobs[job_id]
            channel.close()
        if done is not None:
            context.signed.discard()
        if done is not None and manifest.chain is not None and done.settle_tx:
            await self._claim(manifest, done)

    async def _from_another_master(self, context: _JobContext, envelope: Envelope) -> None:
        """Follow a takeover of the job; count what a replaced master still says."""
        view = context.mastership
        if view is None:
            return
        message, sender = envelope.message, envelope.sender
        address = peer_address(sender)
        job_id = context.manifest.job_id
        if isinstance(message, MasterTakeover) and message.job == job_id:
            if view.rank_of(address) != message.rank:
                return
            chain = self.node.chain
            if chain is not None and chain.deployment == context.manifest.chain:
                try:
                    confirmed = await confirmed_master(chain, job_id, address)
                except ChainError as exc:
                    log.warning("Cannot check a takeover of job %s: %s", short(job_id), exc)
                    return
                if not confirmed:
                    log.warning("Ignored a takeover of job %s the escrow does not confirm",
                                short(job_id))
                    return
            if not view.take_over(address, trio.current_time()):
                log.info("Job %s is now run by %s (rank %d), resuming at round %d",
                         short(job_id), short(sender), message.rank, message.round)
                context.master = sender
        elif view.judge(address) is Verdict.REPLACED:
            self.stats.stale_messages += 1
            log.debug("Rejected a %s of job %s from its replaced master %s", message.TYPE,
                      short(job_id), short(sender))

    async def _escrow_refusal(self, manifest: JobManifest, master: str) -> str:
        """Why this worker must not work on a paid job (a copied or unfunded one), or ""."""
        if manifest.chain is None:
            return ""
        chain = self.node.chain
        if chain is None:
            log.info("Job %s is paid on chain %d, which this node does not follow: its escrow "
                     "is not checked and its payout must be claimed for it",
                     short(manifest.job_id), manifest.chain.chain_id)
            return ""
        if chain.deployment != manifest.chain:
            return "it is paid on a chain deployment this node is not connected to"
        key = job_key(manifest.job_id)
        try:
            reason = check_escrow(manifest, await chain.job(key))
            named = await chain.master_of(key) if not reason else ""
        except ChainError as exc:
            return f"its escrow cannot be read ({exc})"
        if reason:
            return reason
        if named != peer_address(master):
            return f"the escrow names {named} as its master, not the peer announcing it"
        return ""

    async def _claim(self, manifest: JobManifest, done: JobDone) -> None:
        """Claim this node's payout of a settled job, after checking the settled root."""
        chain = self.node.chain
        if chain is None or chain.deployment != manifest.chain:
            log.warning("Job %s paid on a chain this node is not connected to: not claiming",
                        short(manifest.job_id))
            return
        amount = 0
        try:
            with trio.fail_after(self.config.claim_timeout_s):
                for attempt in itertools.count(1):
                    try:
                        amount = await claim_own_payout(chain, manifest, done.credits)
                        break
                    except NotSettledYet as exc:  # our chain node may lag the master's
                        log.info("Claim of job %s: %s (attempt %d)", short(manifest.job_id),
                                 exc, attempt)
                    except (ContractReverted, SettlementMismatch):
                        raise
                    except ChainError as exc:
                        log.warning("Claim of job %s failed (attempt %d): %s",
                                    short(manifest.job_id), attempt, exc)
                    await trio.sleep(min(0.5 * attempt, 5.0))
        except (ChainError, ValueError, trio.TooSlowError) as exc:
            log.error("Could not claim the payout of job %s: %s", short(manifest.job_id), exc)
            return
        self.stats.earned += amount
        if amount:
            log.info("Claimed %d base units for job %s", amount, short(manifest.job_id))

    async def _calculate(self, context: _JobContext, order: CalculationOrder) -> None:
        job_id = context.manifest.job_id
        if order.threads > self.config.max_threads:
            log.info("Declining calculation %d: it asks for %d threads, this node allows %d",
                     order.calc, order.threads, self.config.max_threads)
            return
        try:
            received = time.perf_counter()
            with trio.fail_after(self.config.fetch_timeout_s + order.deadline_s):
                weights, shard = await self._inputs(context, order)
                fetched = time.perf_counter()
                self.stats.throttled_s += await self._bucket.acquire()
                async with self._compute_slot:
                    computation = functools.partial(self._compute, context, weights, shard, order)
                    gradient, loss, compute_s = await self.calculator(
                        context.manifest, order, computation
                    )
            self.stats.computed += 1
            self.stats.compute_s += compute_s
        except (BlobError, NetworkError, DatasetError, TensorFormatError, ValueError) as exc:
            log.warning("Calculation %d of job %s failed: %s", order.calc, short(job_id), exc)
            return
        except trio.TooSlowError:
            log.warning("Calculation %d of job %s timed out", order.calc, short(job_id))
            return
        if self.tamper is not None:
            gradient = self.tamper(order, gradient)
        body = encode_tensors(gradient)
        digest = digest_of(body)
        signature = self._sign_once(context, order.calc, digest)
        if signature is None:
            return
        header = ResultHeader(
            job=job_id, calc=order.calc, round=order.round, digest=digest,
            size=len(body), loss=loss if np.isfinite(loss) else 0.0,
            compute_ms=round(compute_s * 1000, 3), signature=signature,
        )
        before_delivery = time.perf_counter()
        await self._deliver(context, header, body)
        if self.second_result is not None:
            await self._equivocate(context, order, gradient, header)
        log.debug(
            "Calculation %d: fetch %.1f ms, compute %.1f ms, delivery %.1f ms", order.calc,
            1000 * (fetched - received), 1000 * compute_s,
            1000 * (time.perf_counter() - before_delivery),
        )

    def _sign_once(self, context: _JobContext, calc: int, digest: str) -> bytes | None:
        """The signature of (job, calc, digest), unless this worker signed another digest for it.

        Two signed digests for one calculation are slashable equivocation,
        whoever asked for the second (a master re-ordering it with other
        inputs, a recomputation that differs): never sign a second one.
        """
        signed = context.signed.get(calc)
        if signed is not None:
            if signed[0] != digest:
                log.warning("Calculation %d of job %s came out differently than the result this "
                            "node already signed; not signing a second one", calc,
                            short(context.manifest.job_id))
                return None
            return signed[1]
        signature = sign_result(self.node.identity, context.manifest, calc, digest)
        context.signed.record(calc, digest, signature)
        return signature

    async def _equivocate(
        self, context: _JobContext, order: CalculationOrder, gradient: Tensors,
        header: ResultHeader,
    ) -> None:
        """Fault injection: sign and deliver a second, different result for the same calculation."""
        assert self.second_result is not None
        body = encode_tensors(self.second_result(order, gradient))
        digest = digest_of(body)
        if digest == header.digest:
            return
        signature = sign_result(self.node.identity, context.manifest, order.calc, digest)
        second = dataclasses.replace(header, digest=digest, size=len(body), signature=signature)
        await self._deliver(context, second, body)

    def _compute(
        self, context: _JobContext, weights: Tensors, shard: Split, order: CalculationOrder
    ) -> tuple[Tensors, float]:
        profile = ComputeProfile(threads=order.threads)
        runtime = context.runtime
        spec = context.manifest.spec
        if order.kind != spec.calculation:
            raise ValueError(f"order kind {order.kind!r} is not the job's {spec.calculation!r}")
        if order.kind == "local_steps":
            result = runtime.local_steps(
                weights, shard, optimizer=spec.optimizer, batch_size=spec.batch_size,
                seed=order.seed, profile=profile,
            )
        else:
            result = runtime.gradient(weights, shard, seed=order.seed, profile=profile)
        return result, runtime.last_loss

    async def _deliver(self, context: _JobContext, header: ResultHeader, body: bytes) -> None:
        raw = self.node.codec.seal(header, context=RESULT_PROTOCOL)
        reply = b""
        with trio.move_on_after(self.config.submit_timeout_s):
            for attempt in range(DELIVERY_ATTEMPTS):
                try:
                    await self.node.reach(context.master)
                    stream = await self.node.network.open_bulk_stream(
                        context.master, RESULT_PROTOCOL
                    )
                    try:
                        await write_frame(stream, raw)
                        await stream.write(body)
                        reply = await read_frame(stream, 64 * 1024)
                    finally:
                        await stream.close()
                    break
                except NetworkError as exc:
                    log.info("Delivering calculation %d failed (%s); attempt %d of %d",
                             header.calc, exc, attempt + 1, DELIVERY_ATTEMPTS)
                    await trio.sleep(0.5 * 2**attempt)
        try:
            ack = self.node.codec.open(reply, context=RESULT_PROTOCOL,
                                       from_peer=context.master).message
        except WireError as exc:
            log.warning("Could not deliver calculation %d to the master: %s", header.calc, exc)
            return
        if not isinstance(ack, ResultAck) or not ack.taken:
            self.stats.refused += 1
            reason = ack.reason if isinstance(ack, ResultAck) else "an unexpected reply"
            log.info("The master refused calculation %d: %s", header.calc, reason)
            return
        self.stats.delivered += 1

    async def _inputs(
        self, context: _JobContext, order: CalculationOrder
    ) -> tuple[Tensors, Split]:
        """Weights and shard of an order, fetched side by side."""
        got: dict[str, Any] = {}
        errors: list[Exception] = []

        async def load(name: str, fetch: Callable[[], Awaitable[Any]]) -> None:
            try:
                got[name] = await fetch()
            except Exception as exc:  # re-raised below, outside the nursery's group
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load, "shard", lambda: self._shard(context, order.shard))
            nursery.start_soon(load, "weights", lambda: self._load_weights(context, order.weights))
        if errors:
            raise errors[0]
        return got["weights"], got["shard"]

    async def _load_weights(self, context: _JobContext, digest: str) -> Tensors:
        cached = self._weights.get(digest)
        if cached is not None:
            return cached
        raw = await self.node.blobs.fetch(digest, providers=[context.master], announce=False)
        tensors = decode_tensors(raw)
        self._weights.put(digest, tensors)
        return tensors

    async def _shard(self, context: _JobContext, digest: str) -> Split:
        cached = self._shards.get(digest)
        if cached is not None:
            return cached
        ref = context.manifest.shard(digest)
        if ref is None:
            raise ValueError(f"shard {digest[:12]} is not part of the job")
        raw = await self.node.blobs.fetch(
            digest, providers=[context.manifest.requester], chunks=ref.chunks, size=ref.size,
            chunk_size=context.manifest.chunk_size,
        )
        split = read_shard(raw, context.manifest.data)
        self._shards.put(digest, split)
        return split
