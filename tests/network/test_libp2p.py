"""Libp2pNetwork on real py-libp2p hosts over 127.0.0.1.

Besides the functional checks, one test per py-libp2p pitfall proves that the
adapter's workaround is in place (each would fail without it).
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import libp2p.network.swarm as libp2p_swarm
import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import MultiError
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.exceptions import SecurityUpgradeFailure

from ravenp2p.identity import NodeIdentity
from ravenp2p.network.base import (
    Network,
    NetworkError,
    PeerUnreachable,
    ProtocolNotSupported,
    RequestFailed,
    RequestTooLarge,
    Stream,
    Subscription,
    TopicMessage,
)
from ravenp2p.network.bulk import BULK_PROTOCOL
from ravenp2p.network.libp2p import Libp2pConfig, Libp2pNetwork, _open_streams

CAP_NS = "ravenp2p-cap"


@asynccontextmanager
async def started(n: int, config: Libp2pConfig | None = None) -> AsyncIterator[list[Libp2pNetwork]]:
    """`n` started networks on 127.0.0.1 with ephemeral ports."""
    async with AsyncExitStack() as stack:
        nets = []
        for _ in range(n):
            net = Libp2pNetwork(NodeIdentity.generate(), config=config)
            await stack.enter_async_context(net)
            nets.append(net)
        yield nets


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while True:
            if predicate():
                return
            await trio.sleep(interval)


async def line(nets: list[Libp2pNetwork], seeded: bool = False) -> None:
    """Connect nets[i] -> nets[i+1]; with `seeded`, wait until both routing tables list the link."""
    for left, right in itertools.pairwise(nets):
        await left.connect(right.listen_addrs[0])
    if seeded:
        for left, right in itertools.pairwise(nets):
            await wait_until(
                lambda left=left, right=right: routing_table_has(left, right.peer_id)
                and routing_table_has(right, left.peer_id)
            )


def routing_table_has(net: Libp2pNetwork, peer_id: str) -> bool:
    return any(str(p) == peer_id for p in net.dht.routing_table.get_peer_ids())


# --- basics -----------------------------------------------------------------------


async def test_implements_protocol_and_listen_addrs() -> None:
    async with started(1) as (a,):
        assert isinstance(a, Network)
        addrs = a.listen_addrs
        assert addrs and all(x.endswith(f"/p2p/{a.peer_id}") for x in addrs)
        port = multiaddr.Multiaddr(addrs[0]).value_for_protocol("tcp")
        assert int(port) > 0
        assert a.peer_id.startswith("16Uiu2H")


async def test_connect_and_disconnect() -> None:
    async with started(2) as (a, b):
        assert await a.connect(b.listen_addrs[0]) == b.peer_id
        await wait_until(lambda: a.peer_id in b.connected_peers())
        assert a.connected_peers() == [b.peer_id]
        assert b.peer_id in {p.peer_id for p in a.known_peers()}
        await a.disconnect(b.peer_id)
        await wait_until(lambda: not a.connected_peers() and not b.connected_peers())
        # Reconnecting right away works (py-libp2p's negative dial cache is bypassed).
        await a.connect(b.listen_addrs[0])
        assert a.connected_peers() == [b.peer_id]


async def test_connect_to_dead_address_raises_peer_unreachable() -> None:
    async with started(1) as (a,):
        ghost = NodeIdentity.generate().peer_id
        with pytest.raises(PeerUnreachable):
            await a.connect(f"/ip4/127.0.0.1/tcp/1/p2p/{ghost}", timeout=3)
        with pytest.raises(ValueError):
            await a.connect("/ip4/127.0.0.1/tcp/1")


async def test_leaving_the_context_is_prompt() -> None:
    a = Libp2pNetwork(NodeIdentity.generate())
    b = Libp2pNetwork(NodeIdentity.generate())
    async with b:
        async with a:
            await a.connect(b.listen_addrs[0])
            sub = await a.subscribe("t")
            b.set_request_handler("/slow/1", _slow_handler)
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 3.0
        await sub.aclose()


async def test_not_started_and_restart() -> None:
    net = Libp2pNetwork(NodeIdentity.generate())
    with pytest.raises(NetworkError, match="not started"):
        await net.publish("t", b"x")
    async with net:
        first = net.listen_addrs
    with pytest.raises(NetworkError, match="not started"):
        await net.connect(first[0])
    async with started(1) as (other,), net:  # a stopped network can be started again
        await net.connect(other.listen_addrs[0])
        assert net.connected_peers() == [other.peer_id]


async def test_no_threads_are_left_behind() -> None:
    import threading

    before = threading.active_count()
    async with started(3):
        during = threading.active_count()
    assert during == before


async def _slow_handler(peer: str, data: bytes) -> bytes:
    await trio.sleep(30)
    return data


# --- pitfall tests -------------------------------------------------------------------


async def test_pitfall1_connect_is_not_delayed_by_happy_eyeballs() -> None:
    async with started(1) as (hub,):
        times = []
        for _ in range(7):
            async with started(1) as (dialer,):
                t0 = time.perf_counter()
                await dialer.connect(hub.listen_addrs[0])
                times.append(time.perf_counter() - t0)
        # Unpatched py-libp2p waits 250 ms on every dial, even a successful one.
        assert statistics.median(times) < 0.12, times
        assert libp2p_swarm._HAPPY_EYEBALLS_DELAY == 0


def _find_in_causes(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first `kind` in `exc`'s cause/context chain, looking inside libp2p MultiErrors."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, MultiError):
            todo.extend(current.errors)
    return None


async def _dial_with_security(
    target: Libp2pNetwork, key_pair: KeyPair, sec_opt: dict[TProtocol, Any]
) -> Exception | None:
    """Dial `target` from a bare py-libp2p host offering only `sec_opt`.

    Returns None once `target` lists the dialer as connected, or the exception
    the dial raised (caught inside the host's run, whose nursery would wrap it).
    """
    dialer = new_host(
        key_pair=key_pair,
        sec_opt=sec_opt,
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")],
    )
    info = info_from_p2p_addr(multiaddr.Multiaddr(target.listen_addrs[0]))
    me = str(dialer.get_id())
    async with dialer.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            with trio.fail_after(5):
                await dialer.connect(info)
        except Exception as exc:
            return exc
        try:
            await wait_until(lambda: me in target.connected_peers())
        finally:
            with trio.move_on_after(2):
                await dialer.disconnect(info.peer_id)
    return None


async def test_pitfall2_plaintext_dialer_cannot_connect() -> None:
    async with started(1) as (target,):
        ident = NodeIdentity.generate()
        key_pair = ident.libp2p_key_pair()
        plaintext = {TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)}
        failure = await _dial_with_security(target, key_pair, plaintext)
        assert isinstance(failure, SwarmException), repr(failure)
        # It failed in security negotiation (no common protocol), not for another reason.
        upgrade = _find_in_causes(failure, SecurityUpgradeFailure)
        assert upgrade is not None, repr(failure)
        assert "failed to negotiate the secure protocol" in str(upgrade)
        assert ident.peer_id not in target.connected_peers()

        # Control: the same dialer setup and identity connects when it offers Noise.
        noise_key = create_x25519_key_pair().private_key
        noise = {TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(key_pair, noise_privkey=noise_key)}
        assert await _dial_with_security(target, key_pair, noise) is None


async def test_pitfall3_connections_seed_the_dht_routing_table() -> None:
    async with started(3) as (a, b, c):
        await a.connect(b.listen_addrs[0])  # outbound for a, inbound for b
        await c.connect(b.listen_addrs[0])
        await wait_until(
            lambda: routing_table_has(b, a.peer_id) and routing_table_has(b, c.peer_id)
        )
        assert routing_table_has(a, b.peer_id)
        assert c.peer_id not in a.connected_peers()
        found = await a.find_peer(c.peer_id, timeout=5)
        assert found is not None and found.peer_id == c.peer_id
        assert any(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in found.addrs)
        # The address found is dialable.
        await a.connect(f"{found.addrs[0].split('/p2p/')[0]}/p2p/{c.peer_id}")


async def test_pitfall4_leaving_disconnects_peers_promptly() -> None:
    async with started(1) as (a,):
        b = Libp2pNetwork(NodeIdentity.generate())
        async with b:
            await b.connect(a.listen_addrs[0])  # b's outgoing link: the stale case
            await wait_until(lambda: b.peer_id in a.connected_peers())
        await wait_until(lambda: b.peer_id not in a.connected_peers(), timeout=3)


async def test_pitfall5_connection_count_stays_near_the_cap() -> None:
    cap = 4
    config = Libp2pConfig(max_connections=cap, connection_grace_s=0.2, prune_interval_s=0.2)
    async with started(1, config) as (hub,), started(10) as others:
        # A stream in use protects its connection from pruning.
        others[0].set_stream_handler("/hold/1", _hold_stream)
        await others[0].connect(hub.listen_addrs[0])
        held = await hub.open_stream(others[0].peer_id, "/hold/1")
        for other in others[1:]:
            await other.connect(hub.listen_addrs[0])
        await wait_until(lambda: hub.connection_count() <= cap + 1, timeout=5)
        assert others[0].peer_id in hub.connected_peers()
        await held.close()
        await held.reset()


async def _hold_stream(stream: Stream) -> None:
    while await stream.read():
        pass


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_pitfall6_normal_traffic_does_not_log_warnings() -> None:
    # py-libp2p's "libp2p" logger does not propagate: listen on it directly.
    collect = _Collect()
    logging.getLogger("libp2p").addHandler(collect)
    try:
        async with started(3) as nets:
            for net in nets:
                net.set_record_validator(CAP_NS, lambda key, value: None)
            await line(nets, seeded=True)
            await nets[0].put_value(f"/{CAP_NS}/{nets[0].peer_id}", b"v1")
            assert await nets[2].get_value(f"/{CAP_NS}/{nets[0].peer_id}") == b"v1"
            await nets[2].provide("shard-x")
            await nets[0].find_providers("shard-x")
            assert await nets[0].find_peer(nets[2].peer_id) is not None
            # a peer that leaves right after connecting races identify and pubsub
            async with started(1) as (quick,):
                await quick.connect(nets[1].listen_addrs[0])
            await trio.sleep(0.3)
    finally:
        logging.getLogger("libp2p").removeHandler(collect)
    assert not collect.records, [f"{r.name}: {r.getMessage()}" for r in collect.records]


async def test_pitfall_auto_connector_does_not_dial_the_peerstore() -> None:
    # py-libp2p's auto-connector aims at (low + high watermark) / 2 connections
    # and dials any peer whose address it knows.
    async with started(4) as (a, *others):
        peerstore = a.host.get_peerstore()
        for other in others:
            info = info_from_p2p_addr(multiaddr.Multiaddr(other.listen_addrs[0]))
            peerstore.add_addrs(info.peer_id, info.addrs, 3600)
        await a.host.get_network().auto_connector.maybe_connect()
        await trio.sleep(0.5)
        assert a.connected_peers() == []
        assert {p.peer_id for p in a.known_peers()} == {o.peer_id for o in others}


# --- pubsub --------------------------------------------------------------------------


async def _receive_one(sub: Subscription, into: dict[str, TopicMessage], name: str) -> None:
    async for message in sub:
        into[name] = message
        return


async def test_pubsub_line_and_star_topologies() -> None:
    async with started(6) as nets:
        await line(nets)  # 0 - 1 - 2 - 3 - 4 - 5
        subs = [await n.subscribe("jobs") for n in nets]
        for left, right in itertools.pairwise(nets):
            await wait_until(
                lambda left=left, right=right: right.peer_id in left.topic_peers("jobs")
            )
        got: dict[str, TopicMessage] = {}
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for i, sub in enumerate(subs[1:], start=1):
                    nursery.start_soon(_receive_one, sub, got, str(i))
                await nets[0].publish("jobs", b"line")
        assert {k: m.data for k, m in got.items()} == {str(i): b"line" for i in range(1, 6)}
        assert got["5"].via == nets[4].peer_id and got["5"].source == nets[0].peer_id
        # own message is delivered to the publisher's subscription too
        with trio.fail_after(2):
            first = await subs[0].__anext__()
        assert first.data == b"line" and first.source == nets[0].peer_id
        for sub in subs:
            await sub.aclose()

    async with started(6) as nets:
        hub, leaves = nets[0], nets[1:]
        for leaf in leaves:
            await leaf.connect(hub.listen_addrs[0])
        subs = [await n.subscribe("star") for n in leaves]
        await hub.subscribe("star")
        await wait_until(lambda: len(hub.topic_peers("star")) == 5)
        for leaf in leaves:
            await wait_until(lambda leaf=leaf: hub.peer_id in leaf.topic_peers("star"))
        got = {}
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for i, sub in enumerate(subs[1:], start=2):
                    nursery.start_soon(_receive_one, sub, got, str(i))
                await leaves[0].publish("star", b"spoke")
        assert {k: m.data for k, m in got.items()} == {str(i): b"spoke" for i in range(2, 6)}
        message = got["2"]
        assert message.source == leaves[0].peer_id and message.via == hub.peer_id


@pytest.mark.parametrize("router", ["floodsub", "gossipsub"])
async def test_pubsub_sustains_50_messages_per_second(router: str) -> None:
    async with started(4, Libp2pConfig(pubsub=router)) as nets:  # type: ignore[arg-type]
        await line(nets)
        sub = await nets[3].subscribe("rate")
        for n in nets[:3]:
            await n.subscribe("rate")
        await wait_until(lambda: nets[2].peer_id in nets[3].topic_peers("rate"))
        await wait_until(lambda: nets[1].peer_id in nets[0].topic_peers("rate"))
        await wait_until(lambda: len(nets[1].topic_peers("rate")) == 2)
        await wait_until(lambda: len(nets[2].topic_peers("rate")) == 2)
        received: set[bytes] = set()

        async def consume() -> None:
            async for message in sub:
                received.add(message.data)
                if len(received) == 100:
                    return

        with trio.fail_after(8):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                for i in range(100):
                    await nets[0].publish("rate", i.to_bytes(4, "big"))
                    await trio.sleep(0.02)
        assert len(received) == 100


# --- request / response ---------------------------------------------------------------


async def test_request_response_limits_and_handler_errors() -> None:
    config = Libp2pConfig(max_request_bytes=1024, max_response_bytes=2048)
    async with started(1, config) as (server,), started(1) as (client,):
        calls = []

        async def handler(peer: str, data: bytes) -> bytes:
            calls.append(peer)
            if data == b"boom":
                raise RuntimeError("kaboom")
            if data == b"big":
                return b"x" * 5000
            return b"echo:" + data

        server.set_request_handler("/rv/echo/1", handler)
        await client.connect(server.listen_addrs[0])
        assert await client.request(server.peer_id, "/rv/echo/1", b"hi") == b"echo:hi"
        assert calls == [client.peer_id]

        # the server's own limit is enforced and named
        with pytest.raises(RequestFailed, match="max_request_bytes=1024"):
            await client.request(server.peer_id, "/rv/echo/1", b"y" * 2000)
        # the client's own limit fails before sending, with a clear error
        with pytest.raises(RequestTooLarge, match="max_request_bytes=1024"):
            await server.request(client.peer_id, "/rv/echo/1", b"y" * 2000)
        with pytest.raises(ValueError):
            await server.request(client.peer_id, "/rv/echo/1", b"y" * 2000)
        with pytest.raises(RequestFailed, match="max_response_bytes=2048"):
            await client.request(server.peer_id, "/rv/echo/1", b"big")
        with pytest.raises(RequestFailed, match="kaboom"):
            await client.request(server.peer_id, "/rv/echo/1", b"boom")
        # the node keeps serving after every failure
        assert await client.request(server.peer_id, "/rv/echo/1", b"again") == b"echo:again"
        with pytest.raises(ProtocolNotSupported):
            await client.request(server.peer_id, "/rv/nothing/1", b"?")
        with pytest.raises(PeerUnreachable):
            await client.request(NodeIdentity.generate().peer_id, "/rv/echo/1", b"?", timeout=2)


async def test_request_timeout_raises_request_failed() -> None:
    async with started(2) as (a, b):
        b.set_request_handler("/slow/1", _slow_handler)
        await a.connect(b.listen_addrs[0])
        t0 = time.monotonic()
        with pytest.raises(RequestFailed, match="timed out"):
            await a.request(b.peer_id, "/slow/1", b"x", timeout=0.5)
        assert time.monotonic() - t0 < 2


async def test_too_large_response_keeps_its_type() -> None:
    """The caller's own `max_response_bytes` refusal is a RequestTooLarge, not a plain failure."""
    async with started(1, Libp2pConfig(max_response_bytes=1000)) as (client,), started(1) as (
        server,
    ):

        async def big(peer: str, data: bytes) -> bytes:
            return b"z" * 5000

        server.set_request_handler("/rv/big/1", big)
        server.set_request_handler("/rv/echo/1", _echo)
        await client.connect(server.listen_addrs[0])
        with pytest.raises(RequestTooLarge, match="max_response_bytes=1000") as info:
            await client.request(server.peer_id, "/rv/big/1", b"?")
        assert isinstance(info.value, ValueError)
        assert "failed:" not in str(info.value)  # not re-wrapped by the generic clause
        assert await client.request(server.peer_id, "/rv/echo/1", b"ok") == b"ok"


async def _echo(peer: str, data: bytes) -> bytes:
    return data


async def test_bulk_handshake_streams_do_not_linger() -> None:
    """Each bulk transfer fully closes its libp2p handshake stream on both sides.

    A lingering one counts as an open application stream, so the connection
    manager could never prune the link.
    """

    async def sink(stream: Stream) -> None:
        while await stream.read(1 << 20):
            pass
        await stream.write(b"ok")
        await stream.close()

    def bulk_handshakes(net: Libp2pNetwork, peer_id: str) -> int:
        conns = net.host.get_network().get_connections(ID.from_base58(peer_id))
        return sum(
            str(stream.get_protocol()) == BULK_PROTOCOL
            for conn in conns
            for stream in conn.get_streams()
        )

    with trio.fail_after(20):
        async with started(2) as (a, b):
            b.set_stream_handler("/rv/sink/1", sink)
            await a.connect(b.listen_addrs[0])
            for _ in range(5):
                stream = await a.open_bulk_stream(b.peer_id, "/rv/sink/1")
                await stream.write(b"x" * 100_000)
                await stream.close()
                assert await stream.read() == b"ok"
                await stream.reset()
            with pytest.raises(ProtocolNotSupported):  # the error path releases it too
                await a.open_bulk_stream(b.peer_id, "/rv/not-served/1")
            assert bulk_handshakes(a, b.peer_id) == 0
            await wait_until(lambda: bulk_handshakes(b, a.peer_id) == 0)
            conns = a.host.get_network().get_connections(ID.from_base58(b.peer_id))
            assert sum(_open_streams(conn) for conn in conns) == 0


# --- streams ---------------------------------------------------------------------------


async def test_stream_echo_and_eof() -> None:
    async with started(2) as (a, b):

        async def echo(stream: Stream) -> None:
            assert stream.remote_peer == a.peer_id
            while data := await stream.read(1000):
                await stream.write(data)
            # reading after EOF keeps returning b""
            assert await stream.read() == b""

        b.set_stream_handler("/echo/1", echo)
        await a.connect(b.listen_addrs[0])
        stream = await a.open_stream(b.peer_id, "/echo/1")
        assert isinstance(stream, Stream) and stream.remote_peer == b.peer_id
        payload = bytes(range(256)) * 1000
        await stream.write(payload)
        await stream.close()  # half-close: we can still read the echo
        echoed = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.read(65536):
                assert len(chunk) <= 65536
                echoed += chunk
        assert bytes(echoed) == payload
        assert await stream.read() == b""

        bulk = await a.open_bulk_stream(b.peer_id, "/echo/1")
        await bulk.write(b"bulk")
        await bulk.close()
        with trio.fail_after(5):
            assert await bulk.read() == b"bulk"
            assert await bulk.read() == b""
        with pytest.raises(ProtocolNotSupported):
            await a.open_stream(b.peer_id, "/missing/1")


# --- DHT -----------------------------------------------------------------------------


def _cap_validator(key: str, value: bytes) -> None:
    if not value.startswith(b"cap:"):
        raise ValueError(f"capability record for {key} must start with 'cap:'")


async def test_dht_put_get_with_validator() -> None:
    async with started(4) as nets:
        for net in nets:
            net.set_record_validator(CAP_NS, _cap_validator)
        await line(nets, seeded=True)
        key = f"/{CAP_NS}/{nets[0].peer_id}"
        await nets[0].put_value(key, b"cap:gpu=1")
        with trio.fail_after(8):
            assert await nets[3].get_value(key) == b"cap:gpu=1"
        with pytest.raises(ValueError, match="must start with 'cap:'"):
            await nets[0].put_value(key, b"garbage")
        # a namespace without a validator is refused, naming the problem
        with pytest.raises(ValueError, match="no record validator"):
            await nets[0].put_value("/other/x", b"v")
        assert await nets[3].get_value(f"/{CAP_NS}/missing", timeout=3) is None
        # a bad record never reached the others
        assert await nets[3].get_value(key) == b"cap:gpu=1"


async def test_provide_and_find_providers() -> None:
    async with started(4) as nets:
        await line(nets, seeded=True)
        await nets[3].provide("shard:abc")
        await nets[1].provide("shard:abc")
        await nets[3].provide("shard:abc")  # twice: still one entry
        with trio.fail_after(8):
            providers = await nets[0].find_providers("shard:abc")
        ids = [p.peer_id for p in providers]
        assert sorted(ids) == sorted({nets[3].peer_id, nets[1].peer_id})
        assert all(p.addrs for p in providers)
        assert await nets[0].find_providers("shard:none", timeout=3) == []


async def test_find_peer_across_hops() -> None:
    async with started(5) as nets:
        await line(nets, seeded=True)
        target = nets[4]
        with trio.fail_after(8):
            found = await nets[0].find_peer(target.peer_id)
        assert found is not None and found.peer_id == target.peer_id
        assert await nets[0].find_peer(NodeIdentity.generate().peer_id, timeout=2) is None
