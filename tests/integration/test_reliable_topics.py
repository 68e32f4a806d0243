"""Reliable topics on real py-libp2p hosts over loopback, with peers killed mid-stream."""

import time

import trio
from helpers import Note, connected_after_removal, ring_with_chords, swarm

from ravenp2p.network.libp2p import Libp2pNetwork

TOPIC = "/ravenp2p/test/rounds/1"
PEERS = 20
PUBLISHERS = (0, 7, 14)
KILLED = {3, 10, 17}
MESSAGES = 200
DELIVERY_BOUND_S = 30.0


async def test_every_survivor_gets_all_200_messages_exactly_once():
    edges = ring_with_chords(PEERS, (1, 5))
    assert connected_after_removal(PEERS, edges, KILLED)
    async with swarm(Libp2pNetwork, PEERS, edges, seed=7) as peers:
        for peer in peers:
            await peer.listen(TOPIC)
        with trio.fail_after(10):  # every peer has seen a neighbour's subscription
            while not all(p.network.topic_peers(TOPIC) for p in peers):
                await trio.sleep(0.05)

        for seq in range(MESSAGES):
            publisher = peers[PUBLISHERS[seq % len(PUBLISHERS)]]
            await publisher.topics.publish(TOPIC, Note(seq=seq, text=f"round {seq}"))
            if seq == MESSAGES // 3:
                for index in KILLED:
                    peers[index].crash()
            await trio.sleep(0.01)
        published_at = time.monotonic()

        survivors = [p for p in peers if p.alive]
        assert len(survivors) == PEERS - len(KILLED)
        with trio.move_on_after(DELIVERY_BOUND_S):
            while not all(len(p.received[TOPIC]) >= MESSAGES for p in survivors):
                await trio.sleep(0.1)
        took = time.monotonic() - published_at

        for peer in survivors:
            got = [e.message.seq for e in peer.received[TOPIC]]
            assert len(got) == len(set(got)), f"{peer.peer_id} got duplicates"
            assert sorted(got) == list(range(MESSAGES)), (
                f"{peer.peer_id} has {len(got)} of {MESSAGES} after {took:.1f} s"
            )
        pulled = sum(p.topics.stats(TOPIC).pulled for p in survivors)
        print(f"all survivors complete {took:.2f} s after the last publish; {pulled} pulled")
