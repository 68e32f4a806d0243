"""Nodes on real py-libp2p in one process: discovery, DHT records, and hostile input."""

import logging
import time
from pathlib import Path

import msgpack
import pytest
import trio

from ravenp2p.identity import NodeIdentity, create_identity
from ravenp2p.network.base import PeerUnreachable, RequestFailed
from ravenp2p.network.libp2p import Libp2pNetwork
from ravenp2p.node.config import ConfigError, NodeConfig
from ravenp2p.node.node import PEERS_TOPIC, Node, capability_key
from ravenp2p.topics import SYNC_PROTOCOL
from ravenp2p.wire import CapabilityRecord, EnvelopeCodec, TopicSyncRequest, WireLimits
from ravenp2p.wire.envelope import _signing_digest


async def start_nodes(nursery, tmp_path: Path, count: int, **config) -> list[Node]:
    nodes: list[Node] = []
    for i in range(count):
        data_dir = tmp_path / f"node{i}"
        identity = create_identity(data_dir)
        bootstrap = tuple(nodes[0].network.listen_addrs[:1]) if nodes else ()
        cfg = NodeConfig(data_dir=data_dir, bootstrap=bootstrap, control=False, **config)
        node = Node(Libp2pNetwork(identity), identity, cfg)
        await nursery.start(node.run)
        nodes.append(node)
    return nodes


async def test_nodes_discover_each_other_and_verify_records(tmp_path):
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, tmp_path, 6, share=5, consent=True)
        with trio.fail_after(15):
            for node in nodes:
                await node.wait_for_peers(5)
        for node in nodes:
            row_ids = {row["peer_id"] for row in node.peers()}
            assert row_ids == {n.peer_id for n in nodes} - {node.peer_id}
            assert all(row["share"] == 5 for row in node.peers())
        # Every node finds every other through the DHT, and reads its signed record.
        with trio.fail_after(30):
            for a in nodes:
                for b in nodes:
                    if a is b:
                        continue
                    info = await a.find_peer(b.peer_id)
                    assert info is not None and info.addrs, (a.peer_id, b.peer_id)
            record = await nodes[1].fetch_capability(nodes[4].peer_id)
        assert record is not None and record.address == nodes[4].identity.address
        for node in nodes:
            node.stop()


async def test_a_known_peer_is_dialled_again_before_a_request_must_get_through(tmp_path):
    async with trio.open_nursery() as nursery:
        a, b, c = await start_nodes(nursery, tmp_path, 3)
        with trio.fail_after(15):
            await b.wait_for_peers(2)
        await b.network.disconnect(c.peer_id)
        assert c.peer_id not in b.network.connected_peers()
        with trio.fail_after(15):
            await b.reach(c.peer_id)
        assert c.peer_id in b.network.connected_peers()
        stranger = create_identity(tmp_path / "stranger").peer_id  # never on the network
        with pytest.raises(PeerUnreachable, match="no known address"):
            await b.reach(stranger, timeout=2)
        for node in (a, b, c):
            node.stop()


async def test_forged_dht_record_is_refused(tmp_path):
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, tmp_path, 3)
        with trio.fail_after(10):
            for node in nodes:
                await node.wait_for_peers(2)
        victim = nodes[2]
        attacker = nodes[1]
        # A record about the victim, signed by the attacker: the key does not match the signer.
        forged = attacker.codec.seal(
            CapabilityRecord(address=attacker.identity.address, device="cpu", share=100,
                             version="9", addrs=()),
            context=capability_key(victim.peer_id),
        )
        with pytest.raises(ValueError, match="signed by"):
            nodes[0]._validate_capability(capability_key(victim.peer_id), forged)
        for node in nodes:
            node.stop()


def forge(identity: NodeIdentity, **fields) -> bytes:
    header = {
        "v": 1, "t": TopicSyncRequest.TYPE, "c": SYNC_PROTOCOL, "s": identity.peer_id,
        "ts": int(time.time() * 1000), "n": b"\x07" * 16,
        "b": msgpack.packb({"topic": PEERS_TOPIC, "have": []}),
    }
    header.update(fields)
    digest = _signing_digest(header["v"], header["t"], header["c"], header["s"], header["ts"],
                             header["n"], header["b"])
    header.setdefault("sig", identity.sign_digest(digest))
    return msgpack.packb(header, use_bin_type=True)


async def test_hostile_input_is_refused_with_reasons_and_the_node_keeps_serving(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ravenp2p")
    async with trio.open_nursery() as nursery:
        limits = WireLimits(max_envelope_bytes=64 * 1024)
        [node] = await start_nodes(nursery, tmp_path, 1, limits=limits)
        attacker_identity = NodeIdentity.generate()
        other = NodeIdentity.generate()
        async with Libp2pNetwork(attacker_identity) as attacker:
            await attacker.connect(node.network.listen_addrs[0])
            codec = EnvelopeCodec(attacker_identity)
            good = codec.seal(TopicSyncRequest(topic=PEERS_TOPIC, have=()), SYNC_PROTOCOL)
            replayed = codec.seal(TopicSyncRequest(topic=PEERS_TOPIC, have=()), SYNC_PROTOCOL)
            huge = 5 * 1024 * 1024
            cases = {
                "truncated": (good[:40], "not valid msgpack"),
                "garbage": (b"\xc1\xc1\xc1garbage", "not valid msgpack"),
                "wrong signature": (forge(attacker_identity, sig=b"\x01" * 65), "signature"),
                "sender mismatch": (forge(other), "but sent by"),
                "oversized for the transport": (b"\x00" * huge, "max_request_bytes"),
                "oversized envelope": (b"\x00" * 100_000, "exceeds the 65536-byte limit"),
                "unknown type": (forge(attacker_identity, t="no.such"), "unknown message type"),
                "unsupported version": (forge(attacker_identity, v=2), "unsupported protocol"),
                "stale timestamp": (forge(attacker_identity, ts=int((time.time() - 3600) * 1000)),
                                    "stale"),
                "bad body": (forge(attacker_identity, b=msgpack.packb({"topic": 5})), "body.topic"),
            }
            for name, (payload, reason) in cases.items():
                with pytest.raises(RequestFailed, match=reason):
                    await attacker.request(node.peer_id, SYNC_PROTOCOL, payload, timeout=5)
                # After each bad message the node still answers a good one.
                fresh = codec.seal(TopicSyncRequest(topic=PEERS_TOPIC, have=()), SYNC_PROTOCOL)
                reply = await attacker.request(node.peer_id, SYNC_PROTOCOL, fresh, timeout=5)
                assert EnvelopeCodec(other).open(reply, from_peer=node.peer_id), name
            await attacker.request(node.peer_id, SYNC_PROTOCOL, replayed, timeout=5)
            with pytest.raises(RequestFailed, match="replayed"):
                await attacker.request(node.peer_id, SYNC_PROTOCOL, replayed, timeout=5)

            # Garbage on the peers topic is dropped with its reason; a real record still lands.
            with trio.fail_after(5):
                while not attacker.topic_peers(PEERS_TOPIC):
                    await attacker.subscribe(PEERS_TOPIC)
                    await trio.sleep(0.1)
            await attacker.publish(PEERS_TOPIC, b"\x93\x01\x02")
            record = CapabilityRecord(address=attacker_identity.address, device="cpu", share=1,
                                      version="0.1.0", addrs=())
            await attacker.publish(PEERS_TOPIC, codec.seal(record, PEERS_TOPIC))
            with trio.fail_after(10):
                await node.wait_for_peers(1)
            assert node.directory[attacker_identity.peer_id].capability == record
        assert "Dropped a message on /ravenp2p/peers/1" in caplog.text
        node.stop()


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="share"):
        NodeConfig(data_dir=tmp_path, share=150)
    with pytest.raises(ConfigError, match=r"bootstrap.*must end with /p2p"):
        NodeConfig(data_dir=tmp_path, bootstrap=("/ip4/127.0.0.1/tcp/4001",))
    with pytest.raises(ConfigError, match=r"listen.*not a valid multiaddr"):
        NodeConfig(data_dir=tmp_path, listen=("not-an-address",))
    with pytest.raises(ConfigError, match="device"):
        NodeConfig(data_dir=tmp_path, device="tpu")
    assert WireLimits().max_envelope_bytes == 4 * 1024 * 1024


async def test_a_node_that_follows_no_directory_still_announces_itself(tmp_path):
    """A compute-only node in a big network skips the peers topic; masters still learn of it."""
    async with trio.open_nursery() as nursery:
        (follower,) = await start_nodes(nursery, tmp_path, 1)
        identity = create_identity(tmp_path / "quiet")
        cfg = NodeConfig(data_dir=tmp_path / "quiet", control=False, share=5, consent=True,
                         follow_peers=False, bootstrap=tuple(follower.network.listen_addrs[:1]))
        quiet = Node(Libp2pNetwork(identity), identity, cfg)
        await nursery.start(quiet.run)
        with trio.fail_after(15):
            await follower.wait_for_peers(1)
        assert follower.directory[quiet.peer_id].capability.share == 5
        await trio.sleep(1.0)
        assert quiet.directory == {}  # it reads no announcements
        assert quiet.topics.stats(PEERS_TOPIC).delivered == 1  # only its own
        quiet.stop()
        follower.stop()
