"""A committee member's watch over the paid jobs it may have to take over.

Each round, a paid job's master hands the committee members ranked after it a
replica: the checkpoint blob (round, credits, the last round record, ...) and
the weights and optimizer state it names, fetched and pinned here before the
member acks. A member also starts watching a job when its master announces it
with this node among the job's masters.

While watching, the member listens to the job's reliable topic: every message
of the current master counts as a sign of life (it sends a heartbeat every
second). When the master has been silent for the failover timeout times the
ranks between them (`consensus.mastership`), the member calls the escrow's
`takeOver`, which applies the same rule against the master's on-chain
heartbeats, and on success resumes the job from its replica as the new master
(`Master.resume_taken_over`). Members ranked after it keep watching the new
master; a member overtaken by a later rank gives the job up.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import trio

from consensus.mastership import Mastership, Verdict
from ravenp2p.chain.base import ChainError, ContractReverted
from ravenp2p.data.blobs import BlobError
from ravenp2p.network.base import NetworkError
from ravenp2p.node.node import short
from ravenp2p.roles.checkpoint import CHECKPOINT_FILE, checkpoint_problem
from ravenp2p.roles.escrow import confirmed_master, job_key, peer_address
from ravenp2p.roles.protocol import JOBS_TOPIC, REPLICA_PROTOCOL, job_topic
from ravenp2p.training.manifest import JobManifest, ManifestError
from ravenp2p.wire import Envelope, WireError
from ravenp2p.wire.job_messages import (
    JobAnnounce,
    JobDone,
    MasterTakeover,
    ReplicaAck,
    ReplicaOffer,
)

if TYPE_CHECKING:
    from ravenp2p.roles.master import Master

log = logging.getLogger("ravenp2p.standby")

REPLICA_FILE = "replica.msgpack"
FETCH_TIMEOUT_S = 25.0
"""Fetching a replica must end within the network's 30 s budget for answering a request."""
RETRY_S = 1.0
"""How soon a refused or failed takeover is tried again."""


@dataclass
class _Watch:
    manifest: JobManifest
    mastership: Mastership
    replica_round: int = -1
    replica_blobs: tuple[str, ...] = ()
    retry_at: float = 0.0
    closed: bool = False
    """The watch ended: a replica still being fetched is dropped."""
    lock: trio.Lock = field(default_factory=trio.Lock)


class Standby:
    """Keeps replicas of paid jobs this master may take over, and takes them over when due."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.node = master.node
        self.watches: dict[str, _Watch] = {}
        self.takeovers = 0
        """Jobs this node took over (exported as a metric)."""
        self._starting: set[str] = set()
        self._nursery: trio.Nursery | None = None

    async def run(
        self, *, task_status: trio.TaskStatus[Standby] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve replica offers and watch announced jobs, until cancelled."""
        self.node.network.set_request_handler(REPLICA_PROTOCOL, self._serve_replica)
        self._forget_old_replicas()
        channel = await self.node.topics.subscribe(JOBS_TOPIC)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            async for envelope in channel:
                message = envelope.message
                if isinstance(message, JobAnnounce) and self.node.peer_id != envelope.sender:
                    nursery.start_soon(self._on_announce, envelope.sender, message)

    def replica_path(self, job_id: str) -> Path:
        return self.master.jobs_dir / job_id / REPLICA_FILE

    def _forget_old_replicas(self) -> None:
        """Replicas from before a restart: their watches and pins are gone, and so is their use."""
        for path in self.master.jobs_dir.glob(f"*/{REPLICA_FILE}"):
            path.unlink(missing_ok=True)

    # --- starting a watch --------------------------------------------------------------
    async def _on_announce(self, peer: str, announce: JobAnnounce) -> None:
        chain = self.node.chain
        if chain is None or not announce.masters:
            return
        mine = [a.lower() for a in announce.masters]
        if chain.address.lower() not in mine[announce.rank + 1:]:
            return
        reason = await self._ensure_watch(peer, announce.job, announce.manifest_size)
        if reason:
            log.info("Not watching job %s: %s", short(announce.job), reason)

    async def _ensure_watch(self, peer: str, job_id: str, manifest_size: int) -> str:
        """Watch `job_id`, run by `peer`, unless already watching; "" or why not.

        The escrow is read before anything is fetched, so only the job's
        current master can make this node fetch a manifest.
        """
        if job_id in self.watches or job_id in self.master.jobs:
            return ""
        if job_id in self._starting:
            return "a watch of the job is being started"
        chain = self.node.chain
        committee = self.master.committee
        if chain is None or committee is None or self._nursery is None:
            return "this node follows no chain"
        self._starting.add(job_id)
        try:
            key = job_key(job_id)
            try:
                ranked = await committee.job_masters(key)
                job = await chain.job(key)
                timeout = await committee.master_timeout()
            except ChainError as exc:
                return f"cannot read its escrow: {exc}"
            view = Mastership(tuple(ranked), float(timeout), current_rank=job.master_rank,
                              last_heard=trio.current_time())
            if view.judge(peer_address(peer)) is not Verdict.CURRENT:
                return f"{short(peer)} is not the job's current master on-chain"
            if view.takeover_due(chain.address) is None:
                return "this node is not ranked after the job's current master"
            try:
                with trio.fail_after(FETCH_TIMEOUT_S):
                    raw = await self.node.blobs.fetch(job_id, providers=[peer],
                                                      size=manifest_size, announce=False)
                manifest = JobManifest.decode(raw)
            except (BlobError, NetworkError, trio.TooSlowError, ManifestError) as exc:
                return f"cannot fetch its manifest: {exc}"
            if manifest.chain != chain.deployment:
                return "it is paid on another chain deployment"
        finally:
            self._starting.discard(job_id)
        if job_id in self.watches or job_id in self.master.jobs:  # raced with another start
            return ""
        watch = self.watches[job_id] = _Watch(manifest, view)
        self.node.store.pin(job_id)
        self._nursery.start_soon(self._watch, job_id, watch)
        log.info("Watching job %s as its rank-%d master (current master %s, failover after "
                 "%.0f s of silence)", short(job_id), view.rank_of(chain.address), short(peer),
                 view.timeout_s)
        return ""

    # --- replicas ------------------------------------------------------------------------
    async def _serve_replica(self, peer: str, request: bytes) -> bytes:
        envelope = self.node.codec.open(request, context=REPLICA_PROTOCOL, from_peer=peer)
        offer = envelope.message
        if not isinstance(offer, ReplicaOffer):
            raise WireError("type", f"expected {ReplicaOffer.TYPE}, got {offer.TYPE}")
        reason = await self._ensure_watch(peer, offer.job, offer.manifest_size)
        watch = self.watches.get(offer.job)
        if not reason and watch is None:
            reason = "this node runs the job itself"
        if not reason and watch is not None:
            async with watch.lock:
                reason = await self._store_replica(peer, offer, watch)
        if reason:
            log.info("Refused the replica of job %s round %d from %s: %s", short(offer.job),
                     offer.round, short(peer), reason)
        ack = ReplicaAck(job=offer.job, round=offer.round, stored=not reason, reason=reason[:512])
        return self.node.codec.seal(ack, context=REPLICA_PROTOCOL)

    async def _store_replica(self, peer: str, offer: ReplicaOffer, watch: _Watch) -> str:
        address = peer_address(peer)
        if watch.mastership.judge(address) is Verdict.WAITING:  # a takeover this node missed?
            await self._resync(job_key(offer.job), watch)
        if watch.mastership.heard(address, trio.current_time()) is not Verdict.CURRENT:
            return f"{short(peer)} is not the job's current master"
        if offer.round <= watch.replica_round:
            return f"a replica of round {watch.replica_round} is already held"
        store = self.node.store
        try:
            with trio.fail_after(FETCH_TIMEOUT_S):
                raw = await self.node.blobs.fetch(offer.checkpoint, providers=[peer],
                                                  size=offer.checkpoint_size, announce=False)
                state = msgpack.unpackb(raw, raw=False)
                problem = checkpoint_problem(state, offer.job)
                if problem or state["round"] != offer.round:
                    return f"unusable checkpoint: {problem or 'not the offered round'}"
                tensors = (state["weights"], state["optimizer"])
                for digest in tensors:
                    await self.node.blobs.fetch(digest, providers=[peer], announce=False)
        except (BlobError, NetworkError, trio.TooSlowError, ValueError) as exc:
            return f"cannot fetch the replica: {exc}"
        if watch.closed:
            return "the job is no longer watched"
        blobs = (offer.checkpoint, *tensors)
        for digest in blobs:
            store.pin(digest)
        for digest in watch.replica_blobs:
            store.unpin(digest)
        watch.replica_blobs, watch.replica_round = blobs, offer.round
        path = self.replica_path(offer.job)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, path)
        log.debug("Stored the replica of job %s round %d", short(offer.job), offer.round)
        return ""

    # --- watching --------------------------------------------------------------------------
    async def _watch(self, job_id: str, watch: _Watch) -> None:
        chain = self.node.chain
        assert chain is not None
        taken = False
        channel = await self.node.topics.subscribe(job_topic(job_id))
        try:
            while True:
                due = watch.mastership.takeover_due(chain.address)
                if due is None:
                    log.info("Job %s was taken over by a master ranked after this one; "
                             "giving it up", short(job_id))
                    return
                wait = max(due, watch.retry_at) - trio.current_time()
                if wait > 0:
                    with trio.move_on_after(wait):
                        if await self._observe(watch, await channel.receive()):
                            return
                    continue
                outcome = await self._take_over(job_id, watch)
                if outcome == "taken":
                    taken = True
                    return
                if outcome == "gone":
                    return
                watch.retry_at = trio.current_time() + RETRY_S
        finally:
            channel.close()
            watch.closed = True
            del self.watches[job_id]
            if not taken:
                for digest in (*watch.replica_blobs, job_id):
                    self.node.store.unpin(digest)
                self.replica_path(job_id).unlink(missing_ok=True)

    async def _observe(self, watch: _Watch, envelope: Envelope) -> bool:
        """Note a message on the job's topic; True when the job is over."""
        message = envelope.message
        if envelope.sender == watch.manifest.requester:
            return False
        address = peer_address(envelope.sender)
        now = trio.current_time()
        if isinstance(message, MasterTakeover):
            if watch.mastership.rank_of(address) == message.rank and await self._confirmed(
                    watch, address):
                reason = watch.mastership.take_over(address, now)
                if not reason:
                    log.info("Job %s was taken over by %s (rank %d)",
                             short(watch.manifest.job_id), short(envelope.sender), message.rank)
            return False
        verdict = watch.mastership.heard(address, now)
        return verdict is Verdict.CURRENT and isinstance(message, JobDone)

    async def _confirmed(self, watch: _Watch, address: str) -> bool:
        """Whether the escrow names `address` as the job's master (a takeover is real)."""
        chain = self.node.chain
        assert chain is not None
        try:
            return await confirmed_master(chain, watch.manifest.job_id, address)
        except ChainError as exc:
            log.warning("Cannot confirm a takeover of job %s: %s",
                        short(watch.manifest.job_id), exc)
            return False

    async def _take_over(self, job_id: str, watch: _Watch) -> str:
        """Try the escrow's takeOver: "taken", "wait" (try again soon) or "gone"."""
        chain = self.node.chain
        assert chain is not None
        key = job_key(job_id)
        view = watch.mastership
        replaced = view.current_rank
        try:
            await chain.take_over(key)
        except ContractReverted as exc:
            if "TakeOverTooEarly" in exc.reason or "RankNotAfterMaster" in exc.reason:
                log.debug("Takeover of job %s refused for now: %s", short(job_id), exc.reason)
                if not await self._took_it_anyway(key, watch):
                    return "wait"
            else:
                log.warning("The escrow refused this node's takeover of job %s: %s",
                            short(job_id), exc.reason)
                return "gone"
        except ChainError as exc:  # perhaps mined all the same: the escrow tells
            log.warning("Takeover of job %s failed: %s", short(job_id), exc)
            if not await self._took_it_anyway(key, watch):
                return "wait"
        watch.closed = True  # a replica still being fetched must not touch the pins handed over
        view.take_over(chain.address, trio.current_time())
        replica = self.replica_path(job_id)
        if replica.exists():
            os.replace(replica, replica.with_name(CHECKPOINT_FILE))
        else:
            log.warning("Took job %s over without a replica: it restarts from its initial "
                        "weights", short(job_id))
        self.takeovers += 1
        log.info("Took job %s over from rank %d at round %d", short(job_id), replaced,
                 max(watch.replica_round, 0))
        self.master.resume_taken_over(watch.manifest, view, replaced, watch.replica_blobs)
        return "taken"

    async def _took_it_anyway(self, key: bytes, watch: _Watch) -> bool:
        """After a failed takeover call: whether the escrow names this node all the same.

        Otherwise the view catches up with the escrow's current master.
        """
        chain = self.node.chain
        assert chain is not None
        try:
            if await confirmed_master(chain, watch.manifest.job_id, chain.address):
                return True
        except ChainError:
            return False
        await self._resync(key, watch)
        return False

    async def _resync(self, key: bytes, watch: _Watch) -> None:
        """After a refused takeover, learn from the escrow who the master is now."""
        chain = self.node.chain
        assert chain is not None
        try:
            job = await chain.job(key)
        except ChainError:
            return
        view = watch.mastership
        if job.master_rank > view.current_rank:
            view.take_over(view.ranked[job.master_rank], trio.current_time())

