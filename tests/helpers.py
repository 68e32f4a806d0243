"""Swarm fixtures shared by the tests: peers running reliable topics on either network."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from ravenp2p.clock import TrioClock
from ravenp2p.identity import NodeIdentity
from ravenp2p.network.base import Network
from ravenp2p.topics import ReliableTopics, TopicConfig
from ravenp2p.wire import Envelope, EnvelopeCodec, Message, constrained, register


@register
@dataclass(frozen=True)
class Note(Message):
    """A small job-critical-looking message used by topic tests."""

    TYPE = "test.note"

    seq: int = constrained(min=0)
    text: str = constrained(max_len=200, default="")


@dataclass
class SwarmPeer:
    """One peer of a test swarm: its network, its topics layer and what it received."""

    network: Network
    topics: ReliableTopics
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    received: dict[str, list[Envelope]] = field(default_factory=dict)
    alive: bool = True

    @property
    def peer_id(self) -> str:
        return self.network.peer_id

    def kill(self) -> None:
        """Stop the peer; its network says goodbye to its neighbours first."""
        self.alive = False
        self.scope.cancel()

    def crash(self) -> None:
        """Stop without goodbyes, as a killed process does: its sockets just close."""

        async def no_goodbye() -> None:
            return None

        if hasattr(self.network, "_disconnect_all"):
            self.network._disconnect_all = no_goodbye  # type: ignore[method-assign]
        self.kill()

    async def listen(self, topic: str) -> None:
        channel = await self.topics.subscribe(topic)
        got = self.received.setdefault(topic, [])

        async def collect() -> None:
            async for envelope in channel:
                got.append(envelope)

        assert self.topics._nursery is not None
        self.topics._nursery.start_soon(collect)


def ring_with_chords(n: int, chords: tuple[int, ...] = (1, 5)) -> list[tuple[int, int]]:
    """Edges of a circulant graph: i -- i+c for each chord length c."""
    edges = {tuple(sorted((i, (i + c) % n))) for i in range(n) for c in chords}
    return sorted((a, b) for a, b in edges if a != b)


def connected_after_removal(n: int, edges: list[tuple[int, int]], removed: set[int]) -> bool:
    alive = [i for i in range(n) if i not in removed]
    adjacency: dict[int, set[int]] = {i: set() for i in alive}
    for a, b in edges:
        if a in adjacency and b in adjacency:
            adjacency[a].add(b)
            adjacency[b].add(a)
    seen, todo = {alive[0]}, [alive[0]]
    while todo:
        for nxt in adjacency[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return len(seen) == len(alive)


@asynccontextmanager
async def swarm(
    make_network: Callable[[NodeIdentity], Network],
    n: int,
    edges: list[tuple[int, int]],
    topic_config: TopicConfig | None = None,
    seed: int = 0,
) -> AsyncIterator[list[SwarmPeer]]:
    """Start `n` peers running reliable topics and connect them along `edges`."""
    rng = random.Random(seed)
    peers: list[SwarmPeer] = []

    async def run_peer(peer: SwarmPeer, *, task_status: trio.TaskStatus[None]) -> None:
        with peer.scope:
            async with peer.network, trio.open_nursery() as nursery:
                await nursery.start(peer.topics.run)
                task_status.started()
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        clock = TrioClock()
        for _ in range(n):
            identity = NodeIdentity.generate()
            network = make_network(identity)
            codec = EnvelopeCodec(identity, now=clock.now)
            topics = ReliableTopics(
                network, codec, clock, topic_config, rng=random.Random(rng.random())
            )
            peer = SwarmPeer(network, topics)
            await nursery.start(run_peer, peer)
            peers.append(peer)
        for a, b in edges:
            await peers[a].network.connect(peers[b].network.listen_addrs[0])
        try:
            yield peers
        finally:
            nursery.cancel_scope.cancel()
