"""Reliable topics over the in-memory network, in virtual time."""

import pytest
import trio
import trio.testing
from helpers import Note, swarm

from ravenp2p.network.memory import LinkModel, MemoryHub, MemoryNetwork
from ravenp2p.topics import TopicConfig
from ravenp2p.wire import CapabilityRecord, WireError

TOPIC = "/test/jobs"


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def line(n):
    return [(i, i + 1) for i in range(n - 1)]


async def publish_all(peers, count, spacing=0.01):
    for seq in range(count):
        await peers[seq % 2].topics.publish(TOPIC, Note(seq=seq))
        await trio.sleep(spacing)


def seqs(peer):
    return [e.message.seq for e in peer.received.get(TOPIC, [])]


async def settle(peers, count, timeout):
    with trio.move_on_after(timeout):
        while not all(len(seqs(p)) >= count for p in peers if p.alive):
            await trio.sleep(0.1)


@pytest.mark.trio
async def test_lossy_gossip_alone_loses_messages(autojump_clock):
    hub = MemoryHub(LinkModel(latency=0.02, loss=0.3), seed=1)
    # Resync effectively off: the interval is longer than the test.
    config = TopicConfig(sync_interval_s=10_000)
    async with swarm(lambda i: MemoryNetwork(hub, i), 8, line(8), config) as peers:
        for p in peers:
            await p.listen(TOPIC)
        await publish_all(peers, 50)
        await trio.sleep(5)
        assert any(len(seqs(p)) < 50 for p in peers)


@pytest.mark.trio
async def test_resync_delivers_everything_exactly_once_despite_loss(autojump_clock):
    hub = MemoryHub(LinkModel(latency=0.02, loss=0.3), seed=2)
    async with swarm(lambda i: MemoryNetwork(hub, i), 8, line(8)) as peers:
        for p in peers:
            await p.listen(TOPIC)
        await publish_all(peers, 50)
        await settle(peers, 50, timeout=30)
        for p in peers:
            assert sorted(seqs(p)) == list(range(50)), p.peer_id
        assert sum(p.topics.stats(TOPIC).pulled for p in peers) > 0


@pytest.mark.trio
async def test_partition_heals_and_missed_messages_arrive(autojump_clock):
    hub = MemoryHub(LinkModel(latency=0.01), seed=3)
    async with swarm(lambda i: MemoryNetwork(hub, i), 6, line(6)) as peers:
        for p in peers:
            await p.listen(TOPIC)
        left, right = peers[:3], peers[3:]
        hub.partition([[p.network for p in left], [p.network for p in right]])
        await publish_all(peers, 20)
        await trio.sleep(3)
        assert all(len(seqs(p)) < 20 for p in right)
        hub.heal()
        await settle(peers, 20, timeout=20)
        for p in peers:
            assert sorted(seqs(p)) == list(range(20))


@pytest.mark.trio
async def test_late_subscriber_gets_held_messages(autojump_clock):
    hub = MemoryHub(LinkModel(latency=0.01), seed=4)
    async with swarm(lambda i: MemoryNetwork(hub, i), 3, line(3)) as peers:
        await peers[0].listen(TOPIC)
        await peers[1].listen(TOPIC)
        await publish_all(peers[:2], 10)
        await trio.sleep(1)
        await peers[2].listen(TOPIC)
        await settle(peers, 10, timeout=10)
        assert sorted(seqs(peers[2])) == list(range(10))


@pytest.mark.trio
async def test_forged_and_foreign_topic_messages_are_dropped(autojump_clock):
    hub = MemoryHub(LinkModel(latency=0.01), seed=5)
    async with swarm(lambda i: MemoryNetwork(hub, i), 3, line(3)) as peers:
        for p in peers:
            await p.listen(TOPIC)
        sender = peers[0]
        # Signed for another topic, then injected into this one.
        raw = sender.topics.codec.seal(Note(seq=99), context="/other/topic")
        await sender.network.publish(TOPIC, raw)
        # Garbage bytes.
        await sender.network.publish(TOPIC, b"\x93not an envelope")
        await sender.topics.publish(TOPIC, Note(seq=1))
        await settle(peers, 1, timeout=5)
        await trio.sleep(2)
        for p in peers:
            assert seqs(p) == [1]
        # Refused where they entered the network, so they were never relayed.
        assert peers[0].topics.stats(TOPIC).rejected >= 2
        assert peers[1].topics.stats(TOPIC).rejected == 0
        assert peers[2].topics.stats(TOPIC).rejected == 0


@pytest.mark.trio
async def test_publishing_before_subscribing_still_joins_the_gossip(autojump_clock):
    hub = MemoryHub(LinkModel(latency=0.01), seed=6)
    config = TopicConfig(sync_interval_s=10_000)  # gossip only: resync would hide the bug
    async with swarm(lambda i: MemoryNetwork(hub, i), 2, line(2), config) as (a, b):
        await a.topics.publish(TOPIC, Note(seq=0))
        await a.listen(TOPIC)
        await b.listen(TOPIC)
        await trio.sleep(1)
        await b.topics.publish(TOPIC, Note(seq=1))
        await trio.sleep(1)
        assert sorted(seqs(a)) == [0, 1]
        assert a.network.topic_peers(TOPIC) == [b.peer_id]


@pytest.mark.trio
async def test_oversized_topic_messages_are_refused_before_anything_is_kept(autojump_clock):
    hub = MemoryHub(LinkModel(latency=0.01), seed=7)
    config = TopicConfig(max_message_bytes=2048)
    async with swarm(lambda i: MemoryNetwork(hub, i), 2, line(2), config) as (a, b):
        await a.listen(TOPIC)
        await b.listen(TOPIC)
        big = CapabilityRecord(
            address=a.network.identity.address, device="cpu", share=1, version="1",
            addrs=tuple("/ip4/127.0.0.1/tcp/1/" + "x" * 200 for _ in range(16)),
        )
        with pytest.raises(WireError, match="topic limit"):
            await a.topics.publish(TOPIC, big)
        assert a.topics.held_ids(TOPIC) == []
        await a.topics.publish(TOPIC, Note(seq=1))
        await settle([a, b], 1, timeout=5)
        assert seqs(b) == [1]


@pytest.mark.trio
async def test_quiet_topics_resync_less_and_less_often_yet_recover_losses(autojump_clock):
    hub = MemoryHub(LinkModel(latency=0.02), seed=3)
    config = TopicConfig(sync_interval_s=1.0, max_sync_interval_s=64.0)
    async with swarm(lambda i: MemoryNetwork(hub, i), 4, line(4), config) as peers:
        for p in peers:
            await p.listen(TOPIC)
        await trio.sleep(1.5)
        before = hub.stats.requests
        await trio.sleep(300)
        quiet = hub.stats.requests - before
        # Every second for 300 s would be 4 peers x 2 neighbours x 300 = 2400 requests;
        # doubling up to 64 s leaves about 4 x 2 x (6 + 3) of them.
        assert quiet < 150
        # A message gossip loses (a link drops everything for a moment) still arrives:
        # the publisher resyncs soon after publishing, and neighbours pull it back.
        hub.set_link(peers[0].peer_id, peers[1].peer_id, LinkModel(latency=0.02, loss=1.0))
        await peers[0].topics.publish(TOPIC, Note(seq=1))
        await trio.sleep(0.5)
        hub.set_link(peers[0].peer_id, peers[1].peer_id, LinkModel(latency=0.02))
        await settle(peers, 1, timeout=30)
        assert all(seqs(p) == [1] for p in peers)


def test_max_sync_interval_must_not_be_below_the_interval():
    with pytest.raises(ValueError, match="max_sync_interval_s"):
        TopicConfig(sync_interval_s=5.0, max_sync_interval_s=1.0)
