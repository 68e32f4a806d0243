"""An in-process `Network`: many nodes in one trio run, joined by modelled links.

`MemoryHub` is the simulated world; each `MemoryNetwork` is one node in it. Used
by unit tests and by the simulator (`sims/`), so per-node state is a handful of
dicts and every per-message cost is proportional to a node's degree, never to
the size of the network.

What is modelled:

- Links (`LinkModel`) per directed pair of peers: latency, bandwidth (a link
  carries one transfer at a time, so transfers queue behind each other) and
  loss (pubsub hops only; requests and streams are reliable like TCP but pay
  latency and bandwidth).
- Partitions (`MemoryHub.partition` / `heal`): across groups, pubsub hops are
  dropped, new connections, requests and streams fail with `PeerUnreachable`,
  and existing streams and in-flight requests fail. Connections themselves
  survive (like idle TCP over a short outage), so traffic resumes after `heal`.
- Pubsub floods hop by hop across the connection graph, only through peers
  subscribed to the topic (like floodsub), deduplicated per node by a bitmap
  seen-window (`SEEN_WINDOW` messages, about 1 KiB per node). Hops wait in a
  per-node queue drained by one task per node, not one task per hop.
- A DHT that keeps records on the `dht_k` XOR-closest live, reachable nodes
  (sha256 of the peer id vs sha256 of the key) plus the writer itself. A node
  that leaves takes its records with it. A lookup costs one parallel round trip
  to those nodes (optimistic compared with Kademlia's iterative lookups) and
  O(log N + k) work thanks to a sorted index (O(N) while a partition is active).

All delays are `trio.sleep` calls, so `trio.testing.MockClock` gives virtual
time. Losses are drawn from a hash of (seed-derived salt, message, hop) and
pubsub hops are processed in (arrival time, message number, sender) order, so a
run is reproducible for a given seed even though trio shuffles task scheduling
(given the same identities and the same calls from the test or simulation).

Nodes are started with `async with net:` or, where they must be able to leave
in any order (simulations), with `await nursery.start(net.serve)` and
`await net.stop()`.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import logging
import math
import random
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from ravenp2p.identity import NodeIdentity
from ravenp2p.network.base import (
    NetworkError,
    PeerInfo,
    PeerUnreachable,
    ProtocolNotSupported,
    QueuedSubscription,
    RecordValidator,
    RequestFailed,
    RequestHandler,
    RequestTooLarge,
    StreamHandler,
    TopicMessage,
    TopicValidator,
    topic_validator_accepts,
)

__all__ = [
    "DEFAULT_DHT_K",
    "DEFAULT_MAX_REQUEST_SIZE",
    "MAX_INBOUND_REQUESTS_PER_PEER",
    "MAX_PUBSUB_DATA",
    "REQUEST_HANDLER_TIMEOUT",
    "HubStats",
    "LinkModel",
    "MemoryHub",
    "MemoryNetwork",
    "MemoryStream",
    "MemorySubscription",
    "RequestTooLarge",
    "parse_memory_addr",
]

MiB = 1024 * 1024
DEFAULT_MAX_REQUEST_SIZE = 4 * MiB
"""Largest request or response body, in bytes (the same default as the libp2p adapter)."""
MAX_PUBSUB_DATA = 1_000_000
"""Largest pubsub payload. py-libp2p silently drops RPCs over 1 MiB (envelope included);
here `publish` refuses bigger payloads with ValueError so callers find out in tests."""
DEFAULT_DHT_K = 8
"""How many XOR-closest nodes hold each DHT record (besides the writer)."""
STREAM_WINDOW = 256 * 1024
"""Bytes in flight plus unread per stream direction before `write` blocks."""
STREAM_CHUNK = 64 * 1024
"""Writes are cut into chunks of this size, each scheduled on the link separately."""
SEEN_WINDOW = 8192
"""Pubsub dedup window per node, in messages (hub-wide publish order); older ones count as seen.

A bitmap, so it costs about 1 KiB per node however many messages pass."""
SUBSCRIPTION_BUFFER = 1024
"""Messages buffered per subscription; further ones are dropped (a slow subscriber)."""
MEMORY_SCHEME = "memory"
REQUEST_HANDLER_TIMEOUT = 30.0
"""Seconds a request handler may run before it is cancelled (the libp2p adapter's default)."""
MAX_INBOUND_REQUESTS_PER_PEER = 32
"""Requests one peer may have in progress at a node; further ones fail at once."""

logger = logging.getLogger("ravenp2p.network")

T = TypeVar("T")


@dataclass(frozen=True)
class LinkModel:
    """One direction of a link: `latency` seconds, `bandwidth` bytes/s (None = unlimited),
    `loss` = probability that one pubsub hop is dropped."""

    latency: float = 0.0
    bandwidth: float | None = None
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not (self.latency >= 0.0 and math.isfinite(self.latency)):
            raise ValueError(f"latency must be a finite number >= 0, got {self.latency!r}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s or None, got {self.bandwidth!r}")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be a probability in [0, 1], got {self.loss!r}")

    def transfer_time(self, nbytes: int) -> float:
        """Seconds to push `nbytes` onto the link (excluding latency)."""
        return 0.0 if self.bandwidth is None else nbytes / self.bandwidth


@dataclass
class HubStats:
    """Counters over the whole hub, for simulations and tests."""

    pubsub_hops: int = 0
    pubsub_dropped_loss: int = 0
    pubsub_dropped_partition: int = 0
    pubsub_delivered: int = 0
    pubsub_dropped_slow_subscriber: int = 0
    pubsub_dropped_invalid: int = 0
    requests: int = 0
    streams: int = 0
    bytes_sent: dict[str, int] = field(default_factory=dict)
    """Payload bytes put on links, by kind of traffic: pubsub, request, stream, dht."""
    topic_bytes: dict[str, int] = field(default_factory=dict)
    """Pubsub bytes put on links, by topic."""

    def count_bytes(self, kind: str, nbytes: int) -> None:
        """Add `nbytes` of `kind` traffic."""
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + nbytes


def _sha256_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


def _peer_of(peer: str | MemoryNetwork) -> str:
    return peer.peer_id if isinstance(peer, MemoryNetwork) else peer


def _namespace(key: str) -> str:
    """`/ns/rest` -> `ns`; ValueError for anything else."""
    parts = key.split("/", 2)
    if len(parts) != 3 or parts[0] != "" or not parts[1] or not parts[2]:
        raise ValueError(f"DHT key must look like /namespace/name, got {key!r}")
    return parts[1]


def parse_memory_addr(addr: str) -> tuple[int, str]:
    """`/memory/<n>/p2p/<peer id>` -> (n, peer id)."""
    parts = addr.split("/")
    if (
        len(parts) != 5
        or parts[0] != ""
        or parts[1] != MEMORY_SCHEME
        or parts[3] != "p2p"
        or not parts[2].isdigit()
        or not parts[4]
    ):
        raise ValueError(f"not a memory multiaddr (/memory/<n>/p2p/<peer id>): {addr!r}")
    return int(parts[2]), parts[4]


class MemoryHub:
    """The simulated world: the live nodes, the links between them, partitions and the DHT."""

    def __init__(
        self,
        default_link: LinkModel | None = None,
        seed: int = 0,
        dht_k: int = DEFAULT_DHT_K,
        hop_resolution_s: float = 0.0,
    ) -> None:
        if dht_k < 1:
            raise ValueError(f"dht_k must be >= 1, got {dht_k}")
        if not (hop_resolution_s >= 0.0 and math.isfinite(hop_resolution_s)):
            raise ValueError(f"hop_resolution_s must be finite and >= 0, got {hop_resolution_s}")
        self.default_link = default_link if default_link is not None else LinkModel()
        self.seed = seed
        self.rng = random.Random(seed)  # also for simulations: topology, churn, ...
        self._salt = self.rng.getrandbits(64).to_bytes(8, "big")
        self.dht_k = dht_k
        self.stats = HubStats()
        self._links: dict[tuple[str, str], LinkModel] = {}
        self._access: dict[str, LinkModel] = {}
        self._topic_members: dict[str, dict[str, None]] = {}
        """Topic -> running nodes subscribed to it, so a hop looks only at those neighbours."""
        self._combined: dict[tuple[str, str], LinkModel] = {}
        self._nodes: dict[str, MemoryNetwork] = {}
        self._by_index: dict[int, MemoryNetwork] = {}
        self._groups: dict[str, int] | None = None
        self._indices = itertools.count(1)
        self._message_ids = itertools.count()
        # DHT members (running, with at least one connection), by sha256(peer id), sorted.
        self._dht_keys: list[int] = []
        self._dht_nodes: dict[int, MemoryNetwork] = {}
        self.hop_resolution_s = hop_resolution_s
        """Pubsub hops arrive at a multiple of this (0: when due). A coarser grid lets one
        wake-up deliver many hops, which is what lets large simulations run fast."""
        self._hops: list[tuple[float, int, int, int, _Message, MemoryNetwork, MemoryNetwork]] = []
        self._hops_changed = trio.Event()
        self._pump_host: MemoryNetwork | None = None
        """The running node whose nursery runs the hub's `_pump` (handed on when it leaves)."""

    # --- topology ------------------------------------------------------------
    def set_link(
        self,
        a: str | MemoryNetwork,
        b: str | MemoryNetwork,
        link: LinkModel,
        directed: bool = False,
    ) -> None:
        """Use `link` from `a` to `b` (and from `b` to `a` unless `directed`)."""
        pa, pb = _peer_of(a), _peer_of(b)
        self._links[(pa, pb)] = link
        if not directed:
            self._links[(pb, pa)] = link

    def set_access_link(self, peer: str | MemoryNetwork, link: LinkModel) -> None:
        """Give `peer` an access link (its last mile), used for pairs without a `set_link`.

        Traffic between two peers then pays both access latencies and the
        slower access bandwidth; a gossip hop survives only if neither access
        link loses it. Simulations of many peers use this: one model per peer
        instead of one per pair.
        """
        pid = _peer_of(peer)
        if pid in self._access and self._combined:  # a change: forget combinations with it
            self._combined = {k: v for k, v in self._combined.items() if pid not in k}
        self._access[pid] = link

    def link(self, a: str | MemoryNetwork, b: str | MemoryNetwork) -> LinkModel:
        """The model for traffic from `a` to `b`."""
        key = (_peer_of(a), _peer_of(b))
        explicit = self._links.get(key)
        if explicit is not None:
            return explicit
        if not self._access:
            return self.default_link
        combined = self._combined.get(key)
        if combined is None:
            up, down = self._access.get(key[0]), self._access.get(key[1])
            combined = self._combine(up or self.default_link, down or self.default_link)
            if up is not None and down is not None:  # cached only once both are final
                self._combined[key] = combined
        return combined

    @staticmethod
    def _combine(up: LinkModel, down: LinkModel) -> LinkModel:
        rates = [r for r in (up.bandwidth, down.bandwidth) if r is not None]
        return LinkModel(
            latency=up.latency + down.latency,
            bandwidth=min(rates) if rates else None,
            loss=1.0 - (1.0 - up.loss) * (1.0 - down.loss),
        )

    def partition(self, groups: Iterable[Iterable[str | MemoryNetwork]]) -> None:
        """Split the network: peers talk only within their group.

        Peers named in no group form one more group together. Streams and
        in-flight requests that now cross the partition fail at once.
        """
        mapping: dict[str, int] = {}
        for index, group in enumerate(groups):
            for peer in group:
                pid = _peer_of(peer)
                if pid in mapping:
                    raise ValueError(f"peer {pid} appears in two partition groups")
                mapping[pid] = index
        self._groups = mapping
        for node in list(self._nodes.values()):
            node._break_unreachable()

    def heal(self) -> None:
        """Remove the partition; links carry traffic again."""
        self._groups = None

    def reachable(self, a: str | MemoryNetwork, b: str | MemoryNetwork) -> bool:
        """Whether a partition allows traffic between `a` and `b`."""
        if self._groups is None:
            return True
        return self._groups.get(_peer_of(a), -1) == self._groups.get(_peer_of(b), -1)

    @property
    def peers(self) -> list[str]:
        """Peer ids of the nodes currently running."""
        return list(self._nodes)

    def node(self, peer_id: str) -> MemoryNetwork | None:
        """The running node with this peer id, if any."""
        return self._nodes.get(peer_id)

    # --- internals used by MemoryNetwork ----------------------------------------
    def _register(self, node: MemoryNetwork) -> None:
        if node.peer_id in self._nodes:
            raise RuntimeError(f"a node with peer id {node.peer_id} is already running")
        self._nodes[node.peer_id] = node
        self._by_index[node._index] = node
        if self._pump_host is None:
            self._host_pump(node)

    def _unregister(self, node: MemoryNetwork) -> None:
        if self._nodes.get(node.peer_id) is node:
            del self._nodes[node.peer_id]
        if self._by_index.get(node._index) is node:
            del self._by_index[node._index]
        self._dht_leave(node)
        if self._pump_host is node:
            self._host_pump(next(iter(self._nodes.values()), None))

    def _host_pump(self, node: MemoryNetwork | None) -> None:
        """Run the pump in `node`'s nursery (none while no node runs)."""
        self._pump_host = node
        if node is None:
            self._hops.clear()
        else:
            node._spawn(self._pump, node)

    def _enqueue_hop(
        self, arrival: float, msg: _Message, sender: MemoryNetwork, receiver: MemoryNetwork
    ) -> None:
        """Queue a pubsub hop for `_pump` to deliver at `arrival` (rounded up to the grid).

        The queue is ordered by (arrival, hub-wide message number, sender,
        receiver), none of which depends on trio's scheduling order, so lossy
        runs are reproducible.
        """
        step = self.hop_resolution_s
        if step:
            arrival = math.ceil(arrival / step) * step
        item = (arrival, msg.number, sender._index, receiver._index, msg, sender, receiver)
        heapq.heappush(self._hops, item)
        if self._hops[0] is item:
            self._hops_changed.set()

    async def _pump(self, host: MemoryNetwork) -> None:
        """Deliver queued pubsub hops when due: one task for the whole hub, not one per hop.

        Runs in `host`'s nursery; when `host` leaves, the hub starts it in
        another running node's, and this one ends.
        """
        hops = self._hops
        while self._pump_host is host:
            now = trio.current_time()
            while hops and hops[0][0] <= now:
                _, _, _, _, msg, sender, receiver = heapq.heappop(hops)
                receiver._receive_hop(msg, sender.peer_id)
            self._hops_changed = trio.Event()
            with trio.move_on_at(hops[0][0] if hops else math.inf):
                await self._hops_changed.wait()

    def _dht_join(self, node: MemoryNetwork) -> None:
        if node._dist not in self._dht_nodes:
            self._dht_nodes[node._dist] = node
            bisect.insort(self._dht_keys, node._dist)

    def _dht_leave(self, node: MemoryNetwork) -> None:
        if self._dht_nodes.get(node._dist) is node:
            del self._dht_nodes[node._dist]
            i = bisect.bisect_left(self._dht_keys, node._dist)
            del self._dht_keys[i]

    def _hop_draw(self, msg_key: str, src: str, dst: str) -> float:
        """A uniform draw in [0, 1) for one hop of one message, fixed by the seed.

        Keyed by the hop rather than drawn in sequence, so the outcome does not
        depend on the order in which trio happens to schedule tasks.
        """
        digest = hashlib.blake2b(
            f"{msg_key}|{src}|{dst}".encode(), digest_size=8, key=self._salt
        ).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def _transmit_delay(self, src: MemoryNetwork, dst: str, nbytes: int, kind: str) -> float:
        """Seconds from now until `nbytes` sent now from `src` arrive at `dst`.

        Reserves the link: a transfer starts when the previous one on the same
        directed link has finished. Counts the bytes as `kind` traffic.
        """
        self.stats.count_bytes(kind, nbytes)
        link = self.link(src.peer_id, dst)
        if link.bandwidth is None or nbytes <= 0:
            return link.latency
        now = trio.current_time()
        start = max(now, src._busy_until.get(dst, now))
        end = start + nbytes / link.bandwidth
        src._busy_until[dst] = end
        return end - now + link.latency

    def _one_way(self, src: str, dst: str, nbytes: int = 0) -> float:
        """Latency plus transfer time, without reserving the link (small control messages)."""
        if nbytes:
            self.stats.count_bytes("dht", nbytes)
        link = self.link(src, dst)
        return link.latency + link.transfer_time(nbytes)

    def _closest(self, requester: MemoryNetwork, target: int) -> list[MemoryNetwork]:
        """The `dht_k` XOR-closest live nodes that `requester` can reach through the DHT.

        A node with no connections is in nobody's routing table, and can reach
        nobody. Without a partition this costs O(log N + k): the answer lies in
        the smallest aligned prefix block around `target` holding k+1 members.
        """
        if not requester._conns:
            return []
        me = requester.peer_id
        if self._groups is not None:
            candidates = (
                node
                for pid, node in self._nodes.items()
                if pid != me and node._conns and self.reachable(me, pid)
            )
            return heapq.nsmallest(self.dht_k, candidates, key=lambda n: n._dist ^ target)
        keys = self._dht_keys
        need = self.dht_k + 1  # the requester itself may be among them
        lo_i, hi_i = 0, len(keys)
        if len(keys) > need:
            low, high = 0, 256  # largest prefix length whose block still holds `need` keys
            while low < high:
                mid = (low + high + 1) // 2
                shift = 256 - mid
                start = (target >> shift) << shift
                a = bisect.bisect_left(keys, start)
                b = bisect.bisect_left(keys, start + (1 << shift))
                if b - a >= need:
                    low, lo_i, hi_i = mid, a, b
                else:
                    high = mid - 1
        best = heapq.nsmallest(need, keys[lo_i:hi_i], key=lambda d: d ^ target)
        nodes = self._dht_nodes
        return [nodes[d] for d in best if nodes[d] is not requester][: self.dht_k]


@dataclass(frozen=True, slots=True)
class _Message:
    """A pubsub message as it floods: `key` names it for loss draws (stable per
    publisher), `number` orders it hub-wide for the seen-window."""

    topic: str
    data: bytes
    source: str
    key: str
    number: int


class _PendingRequest:
    """One request in flight: the caller waits, the responder (or a failure) resolves it."""

    __slots__ = ("_error", "_event", "_result", "caller", "responder")

    def __init__(self, caller: str, responder: str) -> None:
        self.caller = caller
        self.responder = responder
        self._event = trio.Event()
        self._result: bytes | None = None
        self._error: NetworkError | None = None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def resolve(self, result: bytes) -> None:
        if not self.done:
            self._result = result
            self._event.set()

    def fail(self, error: NetworkError) -> None:
        if not self.done:
            self._error = error
            self._event.set()

    async def wait(self) -> bytes:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class _Pipe:
    """One direction of a stream: chunks with arrival times, bounded by a window."""

    __slots__ = (
        "_changed",
        "abandoned",
        "buffered",
        "chunks",
        "eof",
        "last_arrival",
        "offset",
        "window",
    )

    def __init__(self, window: int) -> None:
        self.chunks: deque[tuple[float, bytes | None]] = deque()  # None marks EOF
        self.offset = 0
        self.buffered = 0
        self.last_arrival = -math.inf
        self.window = window
        self.abandoned = False
        self.eof = False
        self._changed = trio.Event()

    def changed(self) -> trio.Event:
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def push(self, arrival: float, chunk: bytes | None) -> None:
        arrival = max(arrival, self.last_arrival)
        self.last_arrival = arrival
        self.chunks.append((arrival, chunk))
        if chunk is None:
            self.eof = True
        else:
            self.buffered += len(chunk)
        self.notify()


class _StreamPair:
    """Shared state of the two ends of one stream."""

    __slots__ = ("__weakref__", "a", "a_to_b", "b", "b_to_a", "reset_reason")

    def __init__(self, a: MemoryNetwork, b: MemoryNetwork, window: int) -> None:
        self.a = a
        self.b = b
        self.a_to_b = _Pipe(window)
        self.b_to_a = _Pipe(window)
        self.reset_reason: str | None = None

    def reset(self, reason: str) -> None:
        if self.reset_reason is None:
            self.reset_reason = reason
            self.a_to_b.notify()
            self.b_to_a.notify()
        self.forget()

    def forget(self) -> None:
        """Stop tracking the pair at both nodes (reset, or closed in both directions)."""
        self.a._streams.pop(self, None)
        self.b._streams.pop(self, None)


class MemoryStream:
    """One end of an in-memory stream (implements `Stream`)."""

    def __init__(
        self,
        pair: _StreamPair,
        local: MemoryNetwork,
        remote: MemoryNetwork,
        inbound: _Pipe,
        outbound: _Pipe,
        protocol: str,
    ) -> None:
        self._pair = pair
        self._local = local
        self._remote = remote
        self._inbound = inbound
        self._outbound = outbound
        self._write_closed = False
        self.protocol = protocol

    @property
    def remote_peer(self) -> str:
        return self._remote.peer_id

    def _check_reset(self) -> None:
        if self._pair.reset_reason is not None:
            raise NetworkError(f"stream with {self.remote_peer} reset: {self._pair.reset_reason}")

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to `max_bytes` that have arrived; b"" once the remote closed its side."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        pipe = self._inbound
        while True:
            self._check_reset()
            now = trio.current_time()
            wake_at = math.inf
            if pipe.chunks:
                arrival, head = pipe.chunks[0]
                if arrival <= now:
                    if head is None:
                        return b""
                    return self._take(pipe, now, max_bytes)
                wake_at = arrival
            changed = pipe.changed()
            with trio.move_on_at(wake_at):
                await changed.wait()

    @staticmethod
    def _take(pipe: _Pipe, now: float, max_bytes: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while pipe.chunks and size < max_bytes:
            arrival, head = pipe.chunks[0]
            if arrival > now or head is None:
                break
            available = len(head) - pipe.offset
            n = min(available, max_bytes - size)
            parts.append(head[pipe.offset : pipe.offset + n])
            size += n
            if n == available:
                pipe.chunks.popleft()
                pipe.offset = 0
            else:
                pipe.offset += n
        pipe.buffered -= size
        pipe.notify()
        return b"".join(parts)

    async def write(self, data: bytes) -> None:
        """Send `data`; blocks while the window (in flight + unread) is full."""
        self._check_reset()
        if self._write_closed:
            raise NetworkError(f"stream with {self.remote_peer} is closed for writing")
        payload = bytes(data)
        pipe = self._outbound
        hub = self._local._hub
        for offset in range(0, len(payload), STREAM_CHUNK):
            chunk = payload[offset : offset + STREAM_CHUNK]
            while pipe.buffered >= pipe.window and not pipe.abandoned:
                changed = pipe.changed()
                self._check_reset()
                await changed.wait()
            self._check_reset()
            if not (self._local._running and self._remote._running):
                self._pair.reset("peer left")
                self._check_reset()
            if not hub.reachable(self._local.peer_id, self.remote_peer):
                self._pair.reset("network partition")
                self._check_reset()
            delay = hub._transmit_delay(self._local, self.remote_peer, len(chunk), "stream")
            if pipe.abandoned:
                continue  # the remote handler has returned: bytes cost link time, then vanish
            pipe.push(trio.current_time() + delay, chunk)

    async def close(self) -> None:
        """Close our writing side (the remote reads b"" after the data already sent)."""
        if self._write_closed:
            return
        self._write_closed = True
        if self._pair.reset_reason is not None:
            return
        latency = self._local._hub.link(self._local.peer_id, self.remote_peer).latency
        self._outbound.push(trio.current_time() + latency, None)
        if self._inbound.eof:
            self._pair.forget()

    async def reset(self) -> None:
        """Abort both directions; pending and later reads and writes raise `NetworkError`."""
        self._pair.reset(f"reset by {self._local.peer_id}")

    def _abandon_inbound(self) -> None:
        """Our owner is done reading: drop whatever arrives from now on."""
        pipe = self._inbound
        pipe.abandoned = True
        pipe.chunks.clear()
        pipe.buffered = 0
        pipe.offset = 0
        pipe.notify()


class MemorySubscription(QueuedSubscription):
    """Messages on one topic at one node (implements `Subscription`)."""

    def __init__(self, net: MemoryNetwork, topic: str) -> None:
        super().__init__(topic, SUBSCRIPTION_BUFFER)
        self._net = net

    def _offer(self, message: TopicMessage) -> None:
        if not self.offer(message):
            self._net._hub.stats.pubsub_dropped_slow_subscriber += 1

    async def aclose(self) -> None:
        """Unsubscribe; iteration ends."""
        self._close()

    def _close(self) -> None:
        if self._close_queue():
            self._net._unsubscribe(self)


class MemoryNetwork:
    """One node in a `MemoryHub` (implements `Network`).

    Start it with `async with net:` (it owns a nursery for its handlers; the
    first node to start also runs the hub's delivery of gossip hops, which
    moves to another node when it leaves). Leaving disconnects every peer, fails its in-flight
    requests and streams with `NetworkError`, and removes it (and the DHT
    records it held) from the hub.

    Inbound requests are limited as in the libp2p adapter: a handler running
    longer than `request_handler_timeout_s` is cancelled (the caller gets
    `RequestFailed` naming the timeout), and a caller with
    `max_inbound_requests_per_peer` requests in progress here gets
    `RequestFailed` at once for any further one.
    """

    def __init__(
        self,
        hub: MemoryHub,
        identity: NodeIdentity,
        *,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        stream_window: int = STREAM_WINDOW,
        request_handler_timeout_s: float = REQUEST_HANDLER_TIMEOUT,
        max_inbound_requests_per_peer: int = MAX_INBOUND_REQUESTS_PER_PEER,
    ) -> None:
        if not request_handler_timeout_s > 0:
            raise ValueError("request_handler_timeout_s must be positive")
        if max_inbound_requests_per_peer < 1:
            raise ValueError("max_inbound_requests_per_peer must be at least 1")
        self._hub = hub
        self.identity = identity
        self._peer_id = identity.peer_id
        self._index = next(hub._indices)
        self._addr = f"/{MEMORY_SCHEME}/{self._index}/p2p/{self._peer_id}"
        self._dist = _sha256_int(self._peer_id)
        self.max_request_size = max_request_size
        self.request_handler_timeout_s = request_handler_timeout_s
        self.max_inbound_requests_per_peer = max_inbound_requests_per_peer
        self._stream_window = stream_window
        self._running = False
        self._started = False
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        # Dicts, not sets: iteration order must not depend on string hashing (reproducibility).
        self._conns: dict[str, None] = {}
        self._known: dict[str, tuple[str, ...]] = {}
        self._subs: dict[str, list[MemorySubscription]] = {}
        self._seen_base = 0  # pubsub dedup: bit i of _seen_bits = message _seen_base + i
        self._seen_bits = 0
        self._seqno = 0
        self._request_handlers: dict[str, RequestHandler] = {}
        self._inbound_requests: dict[str, int] = {}  # caller -> requests being served
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._validators: dict[str, RecordValidator] = {}
        self._topic_validators: dict[str, TopicValidator] = {}
        self._records: dict[str, bytes] = {}
        self._providers: dict[str, dict[str, tuple[str, ...]]] = {}
        # Weak: a stream both of whose ends were dropped unclosed is not kept alive.
        self._streams: weakref.WeakKeyDictionary[_StreamPair, None] = weakref.WeakKeyDictionary()
        self._pending: dict[_PendingRequest, None] = {}
        self._busy_until: dict[str, float] = {}
        self._stop_requested: trio.Event | None = None
        self._stopped = trio.Event()

    # --- lifecycle -------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def listen_addrs(self) -> list[str]:
        """`/memory/<n>/p2p/<peer id>` (empty when the node is not running)."""
        return [self._addr] if self._running else []

    @property
    def hub(self) -> MemoryHub:
        return self._hub

    async def __aenter__(self) -> MemoryNetwork:
        if self._started:
            raise RuntimeError("a MemoryNetwork can be started only once")
        self._started = True
        manager = trio.open_nursery()
        self._nursery = await manager.__aenter__()
        self._nursery_manager = manager
        self._running = True
        self._hub._register(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._shutdown()
        assert self._nursery is not None and self._nursery_manager is not None
        self._nursery.cancel_scope.cancel()
        try:
            await self._nursery_manager.__aexit__(*exc_info)  # type: ignore[arg-type]
        finally:
            self._stopped.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node in this task until `stop()`: `await nursery.start(net.serve)`.

        An alternative to `async with net:` for simulations, where nodes must be
        able to leave in any order (nurseries, hence `async with` blocks, nest).
        """
        self._stop_requested = trio.Event()
        async with self:
            task_status.started()
            await self._stop_requested.wait()

    async def stop(self) -> None:
        """Make `serve` leave the network, and wait until it has."""
        if self._stop_requested is None:
            raise RuntimeError("stop() is for nodes started with serve()")
        self._stop_requested.set()
        await self._stopped.wait()

    def _shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        self._hub._unregister(self)
        for peer in list(self._conns):
            self._drop_connection(peer, "peer left")
        for pair in list(self._streams):
            pair.reset(f"{self.peer_id} stopped")
        for pending in list(self._pending):
            pending.fail(NetworkError(f"{self.peer_id} stopped"))
        self._pending.clear()
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub._close()
        self._records.clear()
        self._providers.clear()
        self._seen_bits = 0
        self._busy_until.clear()

    def _require_running(self) -> None:
        if not self._running:
            raise NetworkError(f"network {self.peer_id} is not running")

    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)  # type: ignore[arg-type]

    # --- connections ---------------------------------------------------------------
    async def connect(self, addr: str, timeout: float = 10.0) -> str:
        """Dial `/memory/<n>/p2p/<peer id>`; costs one round trip."""
        self._require_running()
        index, peer_id = parse_memory_addr(addr)
        if peer_id == self.peer_id:
            raise ValueError("refusing to connect to ourselves")
        target = self._hub._by_index.get(index)
        if target is None or target.peer_id != peer_id or not target._running:
            raise PeerUnreachable(f"no node listening at {addr}")
        if peer_id in self._conns:
            return peer_id
        if not self._hub.reachable(self.peer_id, peer_id):
            raise PeerUnreachable(f"{peer_id} is unreachable (network partition)")
        rtt = self._hub._one_way(self.peer_id, peer_id) + self._hub._one_way(peer_id, self.peer_id)
        if rtt > timeout:
            await trio.sleep(timeout)
            raise PeerUnreachable(f"dialing {peer_id} timed out after {timeout}s")
        await trio.sleep(rtt)
        self._require_running()
        if not target._running:
            raise PeerUnreachable(f"{peer_id} stopped while we were dialing")
        if not self._hub.reachable(self.peer_id, peer_id):
            raise PeerUnreachable(f"{peer_id} is unreachable (network partition)")
        self._add_connection(target)
        target._add_connection(self)
        return peer_id

    def _add_connection(self, other: MemoryNetwork) -> None:
        self._conns[other.peer_id] = None
        self._known[other.peer_id] = (other._addr,)
        self._hub._dht_join(self)

    async def disconnect(self, peer_id: str) -> None:
        """Close the connection to `peer_id` (both sides see it at once)."""
        self._drop_connection(peer_id, f"disconnected by {self.peer_id}")

    def _drop_connection(self, peer_id: str, reason: str) -> None:
        self._conns.pop(peer_id, None)
        self._busy_until.pop(peer_id, None)
        if not self._conns:
            self._hub._dht_leave(self)
        other = self._hub._nodes.get(peer_id)
        if other is not None:
            other._conns.pop(self.peer_id, None)
            other._busy_until.pop(self.peer_id, None)
            if not other._conns:
                self._hub._dht_leave(other)
        for pair in list(self._streams):
            if peer_id in (pair.a.peer_id, pair.b.peer_id):
                pair.reset(reason)
        for pending in list(self._pending):
            if peer_id in (pending.caller, pending.responder):
                pending.fail(NetworkError(f"connection to {peer_id} closed: {reason}"))

    def _break_unreachable(self) -> None:
        """Fail streams and requests that a new partition cuts."""
        reachable = self._hub.reachable
        for pair in list(self._streams):
            if not reachable(pair.a.peer_id, pair.b.peer_id):
                pair.reset("network partition")
        for pending in list(self._pending):
            if not reachable(pending.caller, pending.responder):
                pending.fail(PeerUnreachable("network partition"))

    def connected_peers(self) -> list[str]:
        return list(self._conns)

    def known_peers(self) -> list[PeerInfo]:
        return [PeerInfo(pid, addrs) for pid, addrs in self._known.items()]

    async def _ensure_connected(self, peer_id: str, timeout: float) -> MemoryNetwork:
        """The running node `peer_id`, dialing it first when we know an address."""
        if peer_id == self.peer_id:
            raise PeerUnreachable("a node cannot dial itself")
        if peer_id not in self._conns:
            addrs = self._known.get(peer_id)
            if not addrs:
                raise PeerUnreachable(f"not connected to {peer_id} and no address known")
            await self.connect(addrs[0], timeout=timeout)
        target = self._hub._nodes.get(peer_id)
        if target is None or not target._running:
            raise PeerUnreachable(f"{peer_id} is not running")
        if not self._hub.reachable(self.peer_id, peer_id):
            raise PeerUnreachable(f"{peer_id} is unreachable (network partition)")
        return target

    # --- pubsub ------------------------------------------------------------------------
    async def subscribe(self, topic: str) -> MemorySubscription:
        self._require_running()
        sub = MemorySubscription(self, topic)
        self._subs.setdefault(topic, []).append(sub)
        self._hub._topic_members.setdefault(topic, {})[self.peer_id] = None
        return sub

    def _unsubscribe(self, sub: MemorySubscription) -> None:
        subs = self._subs.get(sub.topic)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.topic]
                members = self._hub._topic_members.get(sub.topic)
                if members is not None:
                    members.pop(self.peer_id, None)

    def topic_peers(self, topic: str) -> list[str]:
        return list(self._subscribed_neighbours(topic))

    def _subscribed_neighbours(self, topic: str) -> Iterable[str]:
        """Connected peers subscribed to `topic`, looking only at the smaller of the two sets."""
        members = self._hub._topic_members.get(topic)
        if not members:
            return ()
        conns = self._conns
        if len(members) < len(conns):
            return [p for p in members if p in conns and p != self.peer_id]
        return [p for p in conns if p in members]

    async def publish(self, topic: str, data: bytes) -> None:
        """Deliver locally (when subscribed) and flood to subscribed neighbours."""
        self._require_running()
        if len(data) > MAX_PUBSUB_DATA:
            raise ValueError(
                f"pubsub message of {len(data)} bytes exceeds the {MAX_PUBSUB_DATA}-byte limit; "
                "send bulk data over a stream"
            )
        payload = bytes(data)
        self._seqno += 1
        msg = _Message(
            topic,
            payload,
            self.peer_id,
            f"{self.peer_id}:{self._seqno}",
            next(self._hub._message_ids),
        )
        self._mark_seen(msg.number)
        if not self._valid(msg):
            return
        self._deliver_local(TopicMessage(topic, payload, self.peer_id, self.peer_id))
        self._forward(msg, exclude=self.peer_id)

    def set_topic_validator(self, topic: str, validator: TopicValidator) -> None:
        """Check messages on `topic` at this node before delivery and relaying (see `Network`).

        Runs at each hop after the seen-window check (so once per message and
        node), before the message reaches local subscribers or is forwarded.
        """
        if not topic:
            raise ValueError("topic must be a non-empty string")
        self._topic_validators[topic] = validator

    def _valid(self, msg: _Message) -> bool:
        """Whether this node's validator for `msg.topic` (if any) accepts it."""
        validator = self._topic_validators.get(msg.topic)
        if validator is None:
            return True
        accepted = topic_validator_accepts(validator, msg.topic, msg.source, msg.data)
        if not accepted:
            self._hub.stats.pubsub_dropped_invalid += 1
        return accepted

    def _mark_seen(self, number: int) -> bool:
        """Remember message `number`; False when it was already seen (or is too old)."""
        offset = number - self._seen_base
        if offset < 0:
            return False
        if offset >= SEEN_WINDOW:
            shift = offset - SEEN_WINDOW + 1
            self._seen_bits >>= shift
            self._seen_base += shift
            offset -= shift
        bit = 1 << offset
        if self._seen_bits & bit:
            return False
        self._seen_bits |= bit
        return True

    def _deliver_local(self, message: TopicMessage) -> None:
        for sub in list(self._subs.get(message.topic, ())):
            sub._offer(message)
            self._hub.stats.pubsub_delivered += 1

    def _forward(self, msg: _Message, exclude: str) -> None:
        hub = self._hub
        stats = hub.stats
        for peer in self._subscribed_neighbours(msg.topic):
            if peer == exclude or peer == msg.source:
                continue
            node = hub._nodes.get(peer)
            if node is None or msg.topic not in node._subs:
                continue
            stats.pubsub_hops += 1
            if not hub.reachable(self.peer_id, peer):
                stats.pubsub_dropped_partition += 1
                continue
            loss = hub.link(self.peer_id, peer).loss
            if loss > 0.0 and hub._hop_draw(msg.key, self.peer_id, peer) < loss:
                stats.pubsub_dropped_loss += 1
                continue
            size = len(msg.data)
            stats.topic_bytes[msg.topic] = stats.topic_bytes.get(msg.topic, 0) + size
            arrival = trio.current_time() + hub._transmit_delay(self, peer, size, "pubsub")
            hub._enqueue_hop(arrival, msg, self, node)

    def _receive_hop(self, msg: _Message, via: str) -> None:
        if not self._running or via not in self._conns:
            return
        if not self._hub.reachable(via, self.peer_id):
            self._hub.stats.pubsub_dropped_partition += 1
            return
        if msg.topic not in self._subs or not self._mark_seen(msg.number):
            return
        if not self._valid(msg):
            return
        self._deliver_local(TopicMessage(msg.topic, msg.data, msg.source, via))
        self._forward(msg, exclude=via)

    # --- request / response -------------------------------------------------------------
    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._request_handlers[protocol] = handler

    async def request(
        self, peer_id: str, protocol: str, data: bytes, timeout: float = 10.0
    ) -> bytes:
        """Send `data` to `peer_id`'s handler for `protocol`; return its response.

        Raises `RequestTooLarge` (a `RequestFailed` and a `ValueError`) for a
        request over `max_request_size`; `RequestFailed` when the handler raised,
        its response was too large, or `timeout` passed; `ProtocolNotSupported`;
        `PeerUnreachable`.
        """
        self._require_running()
        if len(data) > self.max_request_size:
            raise RequestTooLarge(
                f"request of {len(data)} bytes exceeds max_request_bytes="
                f"{self.max_request_size} ({self.max_request_size / MiB:g} MiB)"
            )
        with trio.move_on_after(timeout):
            return await self._request(peer_id, protocol, bytes(data), timeout)
        raise RequestFailed(f"request to {peer_id} on {protocol} timed out after {timeout}s")

    async def _request(self, peer_id: str, protocol: str, data: bytes, timeout: float) -> bytes:
        target = await self._ensure_connected(peer_id, timeout)
        self._hub.stats.requests += 1
        pending = _PendingRequest(self.peer_id, peer_id)
        self._pending[pending] = None
        target._pending[pending] = None
        try:
            delay = self._hub._transmit_delay(self, peer_id, len(data), "request")
            target._spawn(target._serve_request, delay, pending, protocol, data)
            return await pending.wait()
        finally:
            self._pending.pop(pending, None)
            target._pending.pop(pending, None)

    async def _serve_request(
        self, delay: float, pending: _PendingRequest, protocol: str, data: bytes
    ) -> None:
        await trio.sleep(delay)
        caller = pending.caller
        if pending.done:
            return
        response = b""
        error: NetworkError | None = None
        handler = self._request_handlers.get(protocol)
        cap = self.max_inbound_requests_per_peer
        active = self._inbound_requests.get(caller, 0)
        if handler is None:
            error = ProtocolNotSupported(f"{self.peer_id} does not support protocol {protocol}")
        elif active >= cap:  # checked before the size, as in the libp2p adapter
            error = RequestFailed(
                f"{self.peer_id} refused {protocol}: too many concurrent requests from this "
                f"peer (max_inbound_requests_per_peer={cap})"
            )
        elif len(data) > self.max_request_size:
            error = RequestTooLarge(
                f"request of {len(data)} bytes exceeds the peer's "
                f"max_request_bytes={self.max_request_size}"
            )
        else:
            self._inbound_requests[caller] = active + 1
            try:
                result, error = await self._run_handler(handler, caller, protocol, data)
            finally:
                left = self._inbound_requests.get(caller, 1) - 1
                if left > 0:
                    self._inbound_requests[caller] = left
                else:
                    self._inbound_requests.pop(caller, None)
            if error is None:
                if not isinstance(result, bytes | bytearray | memoryview):
                    error = RequestFailed(
                        f"handler for {protocol} returned {type(result).__name__}, not bytes"
                    )
                elif len(result) > self.max_request_size:
                    error = RequestTooLarge(
                        f"response of {len(result)} bytes exceeds the peer's "
                        f"max_response_bytes={self.max_request_size}"
                    )
                else:
                    response = bytes(result)
        if pending.done:
            return
        if caller not in self._conns:
            pending.fail(NetworkError(f"connection to {self.peer_id} closed"))
            return
        await trio.sleep(self._hub._transmit_delay(self, caller, len(response), "request"))
        if caller not in self._conns or not self._hub.reachable(self.peer_id, caller):
            pending.fail(NetworkError(f"connection to {self.peer_id} lost"))
        elif error is not None:
            pending.fail(error)
        else:
            pending.resolve(response)

    async def _run_handler(
        self, handler: RequestHandler, caller: str, protocol: str, data: bytes
    ) -> tuple[object, NetworkError | None]:
        """(handler's result, None), or (None, the error to send), bounded in time."""
        timeout = self.request_handler_timeout_s
        with trio.move_on_after(timeout):
            try:
                return await handler(caller, data), None
            except Exception as exc:
                return None, RequestFailed(
                    f"handler for {protocol} on {self.peer_id} raised {type(exc).__name__}: {exc}"
                )
        return None, RequestFailed(
            f"handler for {protocol} on {self.peer_id} timed out after {timeout:g} s"
        )

    # --- streams ------------------------------------------------------------------------
    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler

    async def open_stream(self, peer_id: str, protocol: str, timeout: float = 10.0) -> MemoryStream:
        """Open a stream to `peer_id`'s handler for `protocol` (one round trip)."""
        self._require_running()
        with trio.move_on_after(timeout):
            return await self._open_stream(peer_id, protocol, timeout)
        raise NetworkError(f"opening {protocol} to {peer_id} timed out after {timeout}s")

    async def open_bulk_stream(
        self, peer_id: str, protocol: str, timeout: float = 10.0
    ) -> MemoryStream:
        """Same as `open_stream` (memory links have no frame-size limits)."""
        return await self.open_stream(peer_id, protocol, timeout)

    async def _open_stream(self, peer_id: str, protocol: str, timeout: float) -> MemoryStream:
        target = await self._ensure_connected(peer_id, timeout)
        hub = self._hub
        await trio.sleep(hub._one_way(self.peer_id, peer_id))
        self._require_running()
        if not target._running or peer_id not in self._conns:
            raise PeerUnreachable(f"{peer_id} went away while opening a stream")
        if not hub.reachable(self.peer_id, peer_id):
            raise PeerUnreachable(f"{peer_id} is unreachable (network partition)")
        handler = target._stream_handlers.get(protocol)
        back = hub._one_way(peer_id, self.peer_id)
        if handler is None:
            await trio.sleep(back)
            raise ProtocolNotSupported(f"{peer_id} does not support protocol {protocol}")
        pair = _StreamPair(self, target, self._stream_window)
        self._streams[pair] = None
        target._streams[pair] = None
        hub.stats.streams += 1
        local = MemoryStream(pair, self, target, pair.b_to_a, pair.a_to_b, protocol)
        remote = MemoryStream(pair, target, self, pair.a_to_b, pair.b_to_a, protocol)
        target._spawn(target._run_stream_handler, handler, remote)
        try:
            await trio.sleep(back)
        except BaseException:
            pair.reset("opener gave up")
            raise
        local._check_reset()
        return local

    async def _run_stream_handler(self, handler: StreamHandler, stream: MemoryStream) -> None:
        try:
            await handler(stream)
        except Exception:
            await stream.reset()
        else:
            await stream.close()
            stream._abandon_inbound()

    # --- DHT ---------------------------------------------------------------------------
    def set_record_validator(self, namespace: str, validator: RecordValidator) -> None:
        if not namespace or "/" in namespace:
            raise ValueError(f"namespace must be a non-empty name without '/', got {namespace!r}")
        self._validators[namespace] = validator

    def _validate(self, key: str, value: bytes) -> None:
        namespace = _namespace(key)
        validator = self._validators.get(namespace)
        if validator is None:
            raise ValueError(f"no record validator registered for namespace {namespace!r}")
        validator(key, value)

    def _accept_record(self, key: str, value: bytes) -> bool:
        try:
            self._validate(key, value)
        except ValueError:
            return False
        self._records[key] = value
        return True

    async def _dht_round(
        self,
        targets: list[MemoryNetwork],
        visit: Callable[[MemoryNetwork], T | None],
        out_bytes: int,
        timeout: float,
        what: str,
    ) -> list[T]:
        """Send one message to each target in parallel; collect `visit`'s answers."""
        if not targets:
            return []
        hub = self._hub
        me = self.peer_id
        schedule = sorted(
            (hub._one_way(me, t.peer_id, out_bytes), i, t) for i, t in enumerate(targets)
        )
        answers: list[tuple[int, T]] = []
        with trio.move_on_after(timeout):
            start = trio.current_time()
            done_at = start
            for delay, order, target in schedule:
                await trio.sleep_until(start + delay)
                self._require_running()
                if target._running and hub.reachable(me, target.peer_id):
                    answer = visit(target)
                    size = len(answer) if isinstance(answer, bytes) else 0
                    done_at = max(done_at, start + delay + hub._one_way(target.peer_id, me, size))
                    if answer is not None:
                        answers.append((order, answer))
            await trio.sleep_until(done_at)
            self._require_running()
            return [answer for _, answer in sorted(answers, key=lambda item: item[0])]
        raise NetworkError(f"DHT {what} timed out after {timeout}s")

    async def put_value(self, key: str, value: bytes, timeout: float = 10.0) -> None:
        """Validate, store locally, then on the `dht_k` closest reachable nodes.

        Raises ValueError when our own validator rejects the record (or no
        validator is registered for its namespace); nodes whose validator
        rejects it do not store it.
        """
        self._require_running()
        value = bytes(value)
        self._validate(key, value)
        self._records[key] = value
        targets = self._hub._closest(self, _sha256_int(key))
        await self._dht_round(
            targets, lambda n: n._accept_record(key, value) or None, len(value), timeout, "put"
        )

    async def get_value(self, key: str, timeout: float = 10.0) -> bytes | None:
        """The record from the closest node holding a valid one, else our own copy, else None."""
        self._require_running()
        _namespace(key)
        targets = self._hub._closest(self, _sha256_int(key))
        found = await self._dht_round(targets, lambda n: n._records.get(key), 0, timeout, "get")
        local = self._records.get(key)
        for value in [*found, *([local] if local is not None else [])]:
            try:
                self._validate(key, value)
            except ValueError:
                continue
            return value
        return None

    async def provide(self, key: str, timeout: float = 10.0) -> None:
        """Record ourselves as a provider of `key`, locally and on the closest nodes."""
        self._require_running()
        me, addrs = self.peer_id, (self._addr,)

        def store(node: MemoryNetwork) -> None:
            node._providers.setdefault(key, {})[me] = addrs

        store(self)
        targets = self._hub._closest(self, _sha256_int(key))
        await self._dht_round(targets, store, 0, timeout, "provide")

    async def find_providers(self, key: str, timeout: float = 10.0) -> list[PeerInfo]:
        """Providers of `key` (deduplicated, closest holders' answers first)."""
        self._require_running()
        targets = self._hub._closest(self, _sha256_int(key))
        found = await self._dht_round(
            targets, lambda n: dict(n._providers.get(key, {})) or None, 0, timeout, "find_providers"
        )
        merged: dict[str, tuple[str, ...]] = {}
        for providers in [*found, self._providers.get(key, {})]:
            for pid, addrs in providers.items():
                merged.setdefault(pid, addrs)
        for pid, addrs in merged.items():
            if pid != self.peer_id:
                self._known.setdefault(pid, addrs)
        return [PeerInfo(pid, addrs) for pid, addrs in merged.items()]

    async def find_peer(self, peer_id: str, timeout: float = 10.0) -> PeerInfo | None:
        """Addresses of `peer_id`: from what we know, else by asking the closest nodes.

        The DHT finds a peer that is running, reachable and connected to someone
        (so that it sits in routing tables).
        """
        self._require_running()
        if peer_id == self.peer_id:
            return PeerInfo(peer_id, (self._addr,))
        known = self._known.get(peer_id)
        if known is not None:
            return PeerInfo(peer_id, known)
        targets = self._hub._closest(self, _sha256_int(peer_id))
        target = self._hub._nodes.get(peer_id)

        def ask(node: MemoryNetwork) -> tuple[str, ...] | None:
            if target is None or not target._running or not target._conns:
                return None
            if not self._hub.reachable(node.peer_id, peer_id):
                return None
            return (target._addr,)

        found = await self._dht_round(targets, ask, 0, timeout, "find_peer")
        if not found:
            return None
        self._known[peer_id] = found[0]
        return PeerInfo(peer_id, found[0])
