"""Reliable topics: every live subscriber gets every message exactly once.

Gossip is fast but may drop messages (py-libp2p's GossipSub loses some under
churn and rate caps; simulated links lose packets on purpose). Job-critical
messages therefore ride on this layer, which adds:

- message ids: the 16-byte BLAKE2b of the signed envelope bytes (which have one
  canonical form), so duplicates are recognised before any parsing;
- a relay check: the network asks this layer before delivering or forwarding a
  gossiped message, so invalid envelopes stop at the first honest peer;
- de-duplication: each node holds the messages it has seen for a retention
  window and hands each one to its subscribers once;
- pull resync (anti-entropy): every `sync_interval_s` a node asks a few random
  neighbours on the topic for what it lacks, sending the ids it holds; the
  neighbour answers with the missing envelopes, each still signed by its
  publisher and verified again by the receiver.

A message missed by gossip thus arrives within a few sync rounds through any
path of live peers, and a peer that left simply stops being asked.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from ravenp2p.clock import Clock, SystemClock
from ravenp2p.network.base import Network, NetworkError, Subscription
from ravenp2p.wire import Envelope, EnvelopeCodec, Message, WireError
from ravenp2p.wire.messages import (
    MAX_SYNC_ITEMS,
    MAX_TOPIC_ITEM_BYTES,
    MESSAGE_ID_BYTES,
    TopicSyncRequest,
    TopicSyncResponse,
)

SYNC_PROTOCOL = "/ravenp2p/topics-sync/1.0.0"
VERIFIED_CACHE_ENTRIES = 4096

log = logging.getLogger("ravenp2p.topics")


def message_id(raw: bytes) -> bytes:
    """The id of a signed envelope: 16 bytes of BLAKE2b over its exact bytes."""
    return hashlib.blake2b(raw, digest_size=MESSAGE_ID_BYTES).digest()


@dataclass(frozen=True)
class TopicConfig:
    """Tuning of the reliable-topic layer."""

    sync_interval_s: float = 1.0
    max_sync_interval_s: float | None = None
    """Back-off for quiet topics (Trickle-style): each resync of a topic that brought
    nothing new and saw no new message doubles its interval, up to this; any new
    message brings it back to `sync_interval_s`. None: no back-off. Big networks need
    it: thousands of idle subscribers would otherwise resync every second."""
    sync_fanout: int = 2
    sync_timeout_s: float = 5.0
    retention_s: float = 240.0
    """How long a message is held for resync; must stay inside the envelope age window."""
    max_messages_per_topic: int = 50_000
    max_sync_response_bytes: int = 2 * 1024 * 1024
    max_message_bytes: int = 256 * 1024
    """Largest envelope a topic carries; bulk data belongs on streams."""
    max_pulls_per_round: int = 8
    """Follow-up pulls from one neighbour when its reply says more is waiting."""
    subscriber_buffer: int = 100_000

    def __post_init__(self) -> None:
        if self.sync_interval_s <= 0 or self.sync_timeout_s <= 0:
            raise ValueError("sync_interval_s and sync_timeout_s must be positive")
        if self.max_sync_interval_s is not None and not (
            self.max_sync_interval_s >= self.sync_interval_s
        ):
            raise ValueError("max_sync_interval_s must be at least sync_interval_s")
        if self.sync_fanout < 1:
            raise ValueError("sync_fanout must be at least 1")
        if not 0 < self.max_messages_per_topic <= 65_536:
            raise ValueError("max_messages_per_topic must be between 1 and 65536")
        if not 1024 <= self.max_message_bytes <= min(MAX_TOPIC_ITEM_BYTES,
                                                     self.max_sync_response_bytes):
            raise ValueError(
                f"max_message_bytes must be between 1024 and {MAX_TOPIC_ITEM_BYTES} "
                "and fit in max_sync_response_bytes"
            )


@dataclass
class TopicStats:
    """Counters a node exposes about one topic."""

    delivered: int = 0
    duplicates: int = 0
    pulled: int = 0
    rejected: int = 0


@dataclass
class _Topic:
    name: str
    held: OrderedDict[bytes, tuple[float, Envelope]] = field(default_factory=OrderedDict)
    """Message id -> (expiry, verified envelope), oldest first."""
    subscribers: list[trio.MemorySendChannel[Envelope]] = field(default_factory=list)
    gossip: Subscription | None = None
    stats: TopicStats = field(default_factory=TopicStats)
    interval: float = 0.0
    """Current resync interval (seconds); 0 until the first resync."""
    next_sync: float = 0.0
    """Clock time of the next resync."""
    pulled_at_sync: int = 0
    """Messages pulled by resyncs when the last one ended: more since means gossip missed some."""


class ReliableTopics:
    """Publish/subscribe with ids, de-duplication and pull resync over a `Network`.

    Start it in a nursery (`await nursery.start(topics.run)`); it owns the
    background tasks that read gossip and resync with neighbours.
    """

    def __init__(
        self,
        network: Network,
        codec: EnvelopeCodec,
        clock: Clock | None = None,
        config: TopicConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.network = network
        self.codec = codec
        self.clock = clock or SystemClock()
        self.config = config or TopicConfig()
        retention_limit = codec.limits.max_age_s - self.config.sync_timeout_s
        if self.config.retention_s > retention_limit:
            raise ValueError(
                f"retention_s ({self.config.retention_s}) must be below the envelope age window "
                f"minus the sync timeout ({retention_limit}), or resynced messages would be stale"
            )
        self._rng = rng or random.Random()
        self._topics: dict[str, _Topic] = {}
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._forced = False
        self._pulling_back: set[tuple[str, str]] = set()
        self._verified: OrderedDict[bytes, Envelope] = OrderedDict()

    # --- lifecycle -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve resync requests and pull from neighbours until cancelled."""
        self.network.set_request_handler(SYNC_PROTOCOL, self._serve_sync)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sync_loop)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for topic in self._topics.values():
                    for channel in topic.subscribers:
                        channel.close()

    # --- public API --------------------------------------------------------------
    async def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[Envelope]:
        """Receive every message on `topic` from now on (and those still held), once each."""
        if self._nursery is None:
            raise RuntimeError("ReliableTopics.run must be started before subscribing")
        state = self._topic(topic)
        send, receive = trio.open_memory_channel[Envelope](self.config.subscriber_buffer)
        if state.gossip is None:
            state.gossip = await self.network.subscribe(topic)
            self._nursery.start_soon(self._read_gossip, state, state.gossip)
        for _, envelope in state.held.values():
            send.send_nowait(envelope)
        state.subscribers.append(send)
        self._wake_soon()  # the resync loop learns of the new topic
        return receive

    async def publish(self, topic: str, message: Message) -> Envelope:
        """Sign `message` for `topic`, hold it for resync, deliver locally and gossip it."""
        raw = self.codec.seal(message, context=topic)
        if len(raw) > self.config.max_message_bytes:
            raise WireError(
                "envelope",
                f"{len(raw)} bytes exceeds the {self.config.max_message_bytes}-byte topic limit; "
                "send bulk data over a stream",
            )
        envelope = self.codec.open(raw, context=topic)
        state = self._topic(topic)
        self._accept(state, message_id(raw), envelope)
        self._hurry(state)
        try:
            await self.network.publish(topic, raw)
        except NetworkError as exc:
            log.info("Gossip of a message on %s failed (%s); neighbours will pull it", topic, exc)
        return envelope

    def _topic(self, topic: str) -> _Topic:
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _Topic(topic)
            self.network.set_topic_validator(
                topic, lambda source, raw: self._check_gossip(state, source, raw)
            )
        return state

    def sync_soon(self) -> None:
        """Resync now rather than at the next interval (e.g. right after joining)."""
        self._forced = True
        self._wake.set()

    def _wake_soon(self) -> None:
        """A topic's next resync moved earlier: let the loop recompute its wait."""
        self._wake.set()

    def stats(self, topic: str) -> TopicStats:
        state = self._topics.get(topic)
        return state.stats if state else TopicStats()

    def held_ids(self, topic: str) -> list[bytes]:
        state = self._topics.get(topic)
        return list(state.held) if state else []

    # --- receiving -----------------------------------------------------------------
    async def _read_gossip(self, state: _Topic, subscription: Subscription) -> None:
        async for item in subscription:
            self._ingest(state, item.data, via=item.via, pulled=False)

    def _verify(self, state: _Topic, raw: bytes) -> Envelope:
        """Everything but the replay check: size, encoding, signature, freshness, schema."""
        if len(raw) > self.config.max_message_bytes:
            raise WireError("envelope", f"{len(raw)} bytes exceeds the topic limit")
        return self.codec.open(raw, context=state.name, check_replay=False)

    def _reject(self, state: _Topic, via: str, exc: WireError) -> None:
        state.stats.rejected += 1
        level = logging.DEBUG if exc.field in ("nonce", "timestamp") else logging.WARNING
        log.log(level, "Dropped a message on %s relayed by %s: %s", state.name, via, exc)

    def _check_gossip(self, state: _Topic, source: str, raw: bytes) -> bool:
        """Relay decision: only valid envelopes are delivered here and forwarded onwards."""
        mid = message_id(raw)
        if mid in state.held or mid in self._verified:
            return True
        try:
            envelope = self._verify(state, raw)
        except WireError as exc:
            self._reject(state, source, exc)
            return False
        self._verified[mid] = envelope  # taken by `_ingest`, so it is verified once
        while len(self._verified) > VERIFIED_CACHE_ENTRIES:
            self._verified.popitem(last=False)
        return True

    def _ingest(self, state: _Topic, raw: bytes, *, via: str, pulled: bool) -> None:
        mid = message_id(raw)
        if mid in state.held:
            state.stats.duplicates += 1
            return
        try:
            envelope = self._verified.pop(mid, None) or self._verify(state, raw)
            self.codec.check_replay(envelope)
        except WireError as exc:
            self._reject(state, via, exc)
            return
        if pulled:
            state.stats.pulled += 1
        self._accept(state, mid, envelope)

    def _accept(self, state: _Topic, mid: bytes, envelope: Envelope) -> None:
        expiry = envelope.timestamp_ms / 1000.0 + self.config.retention_s
        state.held[mid] = (expiry, envelope)
        while len(state.held) > self.config.max_messages_per_topic:
            state.held.popitem(last=False)
        state.stats.delivered += 1
        for channel in list(state.subscribers):
            try:
                channel.send_nowait(envelope)
            except trio.WouldBlock:
                log.error("A subscriber of %s is not keeping up; dropped a message", state.name)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                state.subscribers.remove(channel)

    def _expire(self, state: _Topic) -> None:
        now = self.clock.now()
        stale = [mid for mid, (expiry, _) in state.held.items() if expiry <= now]
        for mid in stale:
            del state.held[mid]

    # --- resync ----------------------------------------------------------------------
    async def _sync_loop(self) -> None:
        interval = self.config.sync_interval_s
        while True:
            now = self.clock.now()
            due = [s.next_sync if s.interval else now + interval
                   for s in self._topics.values() if s.subscribers]
            wait = min(due, default=math.inf) - now
            with trio.move_on_after(max(0.0, wait)):
                await self._wake.wait()
            forced, self._forced = self._forced, False
            self._wake = trio.Event()
            now = self.clock.now()
            for state in list(self._topics.values()):
                self._expire(state)
                if not state.subscribers or (not forced and state.next_sync > now):
                    continue
                peers = self.network.topic_peers(state.name) or self.network.connected_peers()
                chosen = self._rng.sample(peers, min(self.config.sync_fanout, len(peers)))
                async with trio.open_nursery() as nursery:
                    for peer in chosen:
                        nursery.start_soon(self._pull, state, peer)
                self._schedule(state)

    def _schedule(self, state: _Topic) -> None:
        """When to resync `state` next (Trickle-style): at the base interval after a resync
        that found messages gossip had missed, twice as late after one that found none."""
        low = self.config.sync_interval_s
        high = self.config.max_sync_interval_s or low
        quiet = state.stats.pulled == state.pulled_at_sync
        state.pulled_at_sync = state.stats.pulled
        state.interval = min(high, state.interval * 2) if quiet and state.interval else low
        state.next_sync = self.clock.now() + state.interval * (0.75 + 0.5 * self._rng.random())

    def _hurry(self, state: _Topic) -> None:
        """This node published on `state`: resync soon, so neighbours that gossip missed
        pull the message back (a resync request shows what the requester holds)."""
        low = self.config.sync_interval_s
        if state.interval > low:
            state.interval = low
            state.next_sync = min(state.next_sync, self.clock.now() + low)
            self._wake_soon()

    async def _pull(self, state: _Topic, peer: str) -> None:
        """Ask `peer` for what we lack, again while it says more is waiting (bounded)."""
        for _ in range(self.config.max_pulls_per_round):
            if not await self._pull_once(state, peer):
                return

    async def _pull_once(self, state: _Topic, peer: str) -> bool:
        """One resync exchange; True when the peer has more for us right away."""
        request = self.codec.seal(
            TopicSyncRequest(topic=state.name, have=tuple(state.held)), context=SYNC_PROTOCOL
        )
        timeout = self.config.sync_timeout_s
        try:
            with trio.fail_after(timeout):
                reply = await self.network.request(peer, SYNC_PROTOCOL, request, timeout=timeout)
            envelope = self.codec.open(reply, context=SYNC_PROTOCOL, from_peer=peer)
        except (NetworkError, trio.TooSlowError) as exc:
            log.debug("Resync of %s with %s failed: %s", state.name, peer, exc)
            return False
        except WireError as exc:
            log.warning("Peer %s sent an invalid resync reply: %s", peer, exc)
            return False
        response = envelope.message
        if not isinstance(response, TopicSyncResponse) or response.topic != state.name:
            log.warning("Peer %s answered a resync of %s with something else", peer, state.name)
            return False
        for index, raw in enumerate(response.messages):
            self._ingest(state, raw, via=peer, pulled=True)
            if index % 64 == 63:  # signature checks are CPU work: let other tasks run
                await trio.lowlevel.checkpoint()
        return response.more

    def _pull_back(self, state: _Topic, peer: str) -> None:
        """The requester holds messages we lack: pull from it now (push-pull anti-entropy)."""
        key = (state.name, peer)
        if self._nursery is None or key in self._pulling_back:
            return
        self._pulling_back.add(key)

        async def pull_once() -> None:
            try:
                await self._pull(state, peer)
            finally:
                self._pulling_back.discard(key)

        self._nursery.start_soon(pull_once)

    async def _serve_sync(self, peer: str, request: bytes) -> bytes:
        envelope = self.codec.open(request, context=SYNC_PROTOCOL, from_peer=peer)
        message = envelope.message
        if not isinstance(message, TopicSyncRequest):
            raise WireError("type", f"expected {TopicSyncRequest.TYPE}, got {message.TYPE}")
        state = self._topics.get(message.topic)
        missing: list[bytes] = []
        more = False
        if state is not None:
            have = set(message.have)
            if state.subscribers and not have.issubset(state.held.keys()):
                self._pull_back(state, peer)  # only for topics this node reads
            budget = self.config.max_sync_response_bytes
            now = self.clock.now()
            for mid, (expiry, held) in state.held.items():
                if mid in have or expiry <= now:
                    continue
                if len(missing) >= MAX_SYNC_ITEMS:
                    more = True
                    break
                if len(held.raw) > budget:  # a later, smaller message may still fit
                    more = True
                    continue
                budget -= len(held.raw)
                missing.append(held.raw)
        reply = TopicSyncResponse(topic=message.topic, messages=tuple(missing), more=more)
        return self.codec.seal(reply, context=SYNC_PROTOCOL)

