"""The `Network` contract: every implementation (memory and libp2p) must pass all of it.

Each test runs once per implementation. The `cluster` fixture starts N nodes of
that kind (libp2p ones on 127.0.0.1, port 0) and connects them in a topology.
Waits are polled with a deadline, since real meshes and routing tables take a
moment to form; every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import trio

from ravenp2p.identity import NodeIdentity
from ravenp2p.network.base import (
    Network,
    NetworkError,
    PeerInfo,
    ProtocolNotSupported,
    RequestFailed,
    Stream,
    Subscription,
    TopicMessage,
)
from ravenp2p.network.memory import MemoryHub, MemoryNetwork

MiB = 1024 * 1024
KINDS = ("memory", "libp2p")
TEST_DEADLINE = 30.0  # seconds; any single test that takes longer is a failure

Edges = Sequence[tuple[int, int]]


def line(n: int) -> list[tuple[int, int]]:
    """0 - 1 - 2 - ... - n-1"""
    return [(i, i + 1) for i in range(n - 1)]


class Cluster:
    """Starts networks of one kind, each in its own task, and stops them on demand."""

    def __init__(self, kind: str, nursery: trio.Nursery) -> None:
        self.kind = kind
        self._nursery = nursery
        self._hub = MemoryHub(seed=0)
        self._stops: dict[str, tuple[trio.Event, trio.Event]] = {}
        self.identities: dict[str, NodeIdentity] = {}

    def _new(self, options: dict[str, Any]) -> Network:
        """A node of this kind; `options` are settings both implementations take by name
        (`MemoryNetwork` keyword arguments, `Libp2pConfig` fields)."""
        identity = NodeIdentity.generate()
        self.identities[identity.peer_id] = identity
        if self.kind == "memory":
            return MemoryNetwork(self._hub, identity, **options)
        from ravenp2p.network.libp2p import Libp2pConfig, Libp2pNetwork

        return Libp2pNetwork(
            identity, listen_addrs=("/ip4/127.0.0.1/tcp/0",), config=Libp2pConfig(**options)
        )

    async def _run(
        self,
        net: Network,
        stop: trio.Event,
        stopped: trio.Event,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with net:
                task_status.started()
                await stop.wait()
        finally:
            stopped.set()

    async def start(self, n: int, edges: Edges = (), **options: Any) -> list[Network]:
        """Start `n` nodes (built with `options`) and connect `a -> b` for each edge."""
        nets = [self._new(options) for _ in range(n)]
        for net in nets:
            stop, stopped = trio.Event(), trio.Event()
            self._stops[net.peer_id] = (stop, stopped)
            await self._nursery.start(self._run, net, stop, stopped)
        for a, b in edges:
            assert await nets[a].connect(nets[b].listen_addrs[0]) == nets[b].peer_id
        for a, b in edges:
            await eventually(lambda a=a, b=b: nets[a].peer_id in nets[b].connected_peers())
        return nets

    async def stop(self, net: Network) -> None:
        """Leave the network (runs the implementation's `__aexit__`)."""
        stop, stopped = self._stops[net.peer_id]
        stop.set()
        with trio.fail_after(15):
            await stopped.wait()

    async def stop_all(self) -> None:
        for stop, _ in self._stops.values():
            stop.set()
        with trio.fail_after(20):
            for _, stopped in self._stops.values():
                await stopped.wait()


@pytest.fixture(params=KINDS)
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    kind: str = request.param
    if kind == "libp2p":
        try:
            from ravenp2p.network.libp2p import Libp2pNetwork  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"libp2p adapter not importable yet: {exc}")
    async with trio.open_nursery() as nursery:
        c = Cluster(kind, nursery)
        try:
            yield c
        finally:
            await c.stop_all()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def retry(fn: Callable[[], Awaitable[object]], timeout: float = 15.0) -> object:
    """Call `fn` until it returns something truthy (NetworkError counts as 'not yet')."""
    with trio.fail_after(timeout):
        while True:
            try:
                result = await fn()
            except NetworkError:
                result = None
            if result:
                return result
            await trio.sleep(0.2)


def dialable(info: PeerInfo) -> list[str]:
    """`info`'s addresses, each with the `/p2p/<peer id>` suffix."""
    suffix = f"/p2p/{info.peer_id}"
    return [a if a.endswith(suffix) else a + suffix for a in info.addrs]


async def read_all(stream: Stream) -> bytes:
    parts: list[bytes] = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


async def next_message(sub: Subscription, timeout: float = 10.0) -> TopicMessage:
    with trio.fail_after(timeout):
        return await sub.__anext__()


# --- identity and connections --------------------------------------------------------------


async def test_identity_and_addrs(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        nets = await cluster.start(2)
        assert isinstance(nets[0], Network)
        for net in nets:
            assert net.peer_id == cluster.identities[net.peer_id].peer_id
            assert net.listen_addrs
            for addr in net.listen_addrs:
                assert addr.endswith(f"/p2p/{net.peer_id}")
        assert nets[0].peer_id != nets[1].peer_id
        assert nets[0].connected_peers() == []


async def test_connect_disconnect(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2)
        assert await a.connect(b.listen_addrs[0]) == b.peer_id
        await eventually(lambda: a.peer_id in b.connected_peers())
        assert b.peer_id in a.connected_peers()
        assert b.peer_id in [p.peer_id for p in a.known_peers()]
        assert all(p.addrs for p in a.known_peers())

        await a.disconnect(b.peer_id)
        await eventually(lambda: b.peer_id not in a.connected_peers())
        await eventually(lambda: a.peer_id not in b.connected_peers())
        # still known (address book): a request dials it again by itself
        assert b.peer_id in [p.peer_id for p in a.known_peers()]
        b.set_request_handler(ECHO, echo_handler)
        assert await a.request(b.peer_id, ECHO, b"redial") == a.peer_id.encode() + b"|redial"
        assert b.peer_id in a.connected_peers()
        await a.disconnect(b.peer_id)
        await eventually(lambda: b.peer_id not in a.connected_peers())
        assert await a.connect(b.listen_addrs[0]) == b.peer_id


async def test_connect_refuses_self_and_malformed_addrs(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        (a,) = await cluster.start(1)
        with pytest.raises(ValueError):
            await a.connect(a.listen_addrs[0])
        with pytest.raises(ValueError):
            await a.connect("not a multiaddr")


async def test_leaving_node_is_seen_gone(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        a, b, c = await cluster.start(3, [(0, 1), (2, 1)])
        await cluster.stop(c)
        await eventually(lambda: c.peer_id not in b.connected_peers())
        assert a.peer_id in b.connected_peers()
        with pytest.raises(NetworkError):
            await b.request(c.peer_id, "/raven/test/echo/1", b"x", timeout=3)


# --- pubsub ---------------------------------------------------------------------------------


async def test_pubsub_two_hops(cluster: Cluster) -> None:
    topic = "raven/test/topic"
    with trio.fail_after(TEST_DEADLINE):
        nets = await cluster.start(3, line(3))
        subs = [await net.subscribe(topic) for net in nets]
        a, b, c = nets
        await eventually(lambda: b.peer_id in a.topic_peers(topic))
        await eventually(lambda: set(b.topic_peers(topic)) == {a.peer_id, c.peer_id})
        await eventually(lambda: b.peer_id in c.topic_peers(topic))
        assert c.peer_id not in a.topic_peers(topic)  # not connected

        async def publish_until_seen(done: trio.Event) -> None:
            i = 0
            while not done.is_set():
                await a.publish(topic, b"hello-%d" % i)
                i += 1
                with trio.move_on_after(0.5):
                    await done.wait()

        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_until_seen, done)
            far = await next_message(subs[2], timeout=15)
            done.set()
        assert far.topic == topic
        assert far.data.startswith(b"hello-")
        assert far.source == a.peer_id
        assert far.via == b.peer_id

        middle = await next_message(subs[1])
        assert (middle.source, middle.via) == (a.peer_id, a.peer_id)
        own = await next_message(subs[0])
        assert (own.source, own.via) == (a.peer_id, a.peer_id)

        await subs[2].aclose()
        await eventually(lambda: c.peer_id not in b.topic_peers(topic))
        with trio.fail_after(2):
            assert [m async for m in subs[2]] == []


async def test_pubsub_carries_large_messages(cluster: Cluster) -> None:
    """Both implementations deliver a 900 kB message (py-libp2p's RPC cap is 1 MiB)."""
    topic = "raven/test/large"
    payload = os.urandom(900_000)
    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        sub = await b.subscribe(topic)
        await eventually(lambda: b.peer_id in a.topic_peers(topic))
        got = None
        with trio.fail_after(15):
            while got is None:
                await a.publish(topic, payload)
                with trio.move_on_after(1):
                    got = await sub.__anext__()
        assert got.data == payload and got.source == a.peer_id


async def _publish_until(
    net: Network, topic: str, payloads: Callable[[int], list[bytes]], sub: Subscription, want: bytes
) -> list[bytes]:
    """Publish `payloads(i)`, i = 0, 1, ..., until `sub` gets a message starting with `want`.

    Returns every payload `sub` received meanwhile.
    """
    received: list[bytes] = []
    with trio.fail_after(15):
        for i in itertools.count():
            for data in payloads(i):
                await net.publish(topic, data)
            with trio.move_on_after(0.3):
                while True:
                    received.append((await sub.__anext__()).data)
                    if received[-1].startswith(want):
                        return received
    raise AssertionError("unreachable")


def _drain(sub: Subscription) -> list[bytes]:
    """Payloads already queued on `sub` (a `QueuedSubscription`), without waiting."""
    got = []
    receive = sub._receive  # type: ignore[attr-defined]
    while True:
        try:
            got.append(receive.receive_nowait().data)
        except trio.WouldBlock:
            return got


async def test_topic_validator_stops_delivery_and_relaying(cluster: Cluster) -> None:
    """A message the validator rejects reaches no subscriber and is not relayed onwards."""
    topic = "raven/test/validated"
    seen: dict[str, list[tuple[str, bytes]]] = {"b": [], "c": []}

    def validator_for(name: str) -> Callable[[str, bytes], bool]:
        def validate(source: str, data: bytes) -> bool:
            seen[name].append((source, data))
            return not data.startswith(b"bad")

        return validate

    with trio.fail_after(TEST_DEADLINE):
        a, b, c = await cluster.start(3, line(3))
        b.set_topic_validator(topic, validator_for("b"))
        c.set_topic_validator(topic, validator_for("c"))
        sub_b, sub_c = await b.subscribe(topic), await c.subscribe(topic)
        await eventually(lambda: b.peer_id in a.topic_peers(topic))
        await eventually(lambda: c.peer_id in b.topic_peers(topic))

        got_c = await _publish_until(
            a, topic, lambda i: [b"bad-%d" % i, b"good-%d" % i], sub_c, b"good"
        )
        await trio.sleep(0.3)  # a relayed bad message would have arrived by now
        assert [d for d in got_c + _drain(sub_c) if not d.startswith(b"good")] == []
        assert any(data.startswith(b"bad") for _, data in seen["b"]), "B never saw a bad one"
        assert all(source == a.peer_id for source, _ in seen["b"])
        # C's validator sees everything that reaches C: B relayed no bad message
        assert [d for _, d in seen["c"] if d.startswith(b"bad")] == []
        assert any(d.startswith(b"good") for _, d in seen["c"])
        got_b = _drain(sub_b)
        assert got_b and [d for d in got_b if not d.startswith(b"good")] == []
        if cluster.kind == "memory":
            assert cluster._hub.stats.pubsub_dropped_invalid > 0


async def test_topic_validator_exception_counts_as_rejection(cluster: Cluster) -> None:
    topic = "raven/test/validator-raises"

    def fragile(source: str, data: bytes) -> bool:
        if data.startswith(b"boom"):
            raise RuntimeError("validator bug")
        return True

    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_topic_validator(topic, fragile)
        sub = await b.subscribe(topic)
        await eventually(lambda: b.peer_id in a.topic_peers(topic))
        got = await _publish_until(
            a, topic, lambda i: [b"boom-%d" % i, b"fine-%d" % i], sub, b"fine"
        )
        await trio.sleep(0.3)
        got += _drain(sub)
        assert [d for d in got if d.startswith(b"boom")] == []
        # the node is unharmed: pubsub and requests still work
        got = await _publish_until(a, topic, lambda i: [b"again-%d" % i], sub, b"again")
        assert [d for d in got if d.startswith(b"boom")] == []
        b.set_request_handler(ECHO, echo_handler)
        assert await a.request(b.peer_id, ECHO, b"x") == a.peer_id.encode() + b"|x"


# --- request / response ----------------------------------------------------------------------


ECHO = "/raven/test/echo/1"


async def echo_handler(remote: str, data: bytes) -> bytes:
    return remote.encode() + b"|" + data


async def test_request_response(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_request_handler(ECHO, echo_handler)
        assert await a.request(b.peer_id, ECHO, b"ping") == a.peer_id.encode() + b"|ping"
        assert await a.request(b.peer_id, ECHO, b"") == a.peer_id.encode() + b"|"
        big = os.urandom(MiB)
        assert await a.request(b.peer_id, ECHO, big) == a.peer_id.encode() + b"|" + big


async def test_oversized_request_refused(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_request_handler(ECHO, echo_handler)
        with pytest.raises(RequestFailed, match="4194304") as info:
            await a.request(b.peer_id, ECHO, bytes(4 * MiB + 1))
        assert isinstance(info.value, ValueError)
        assert await a.request(b.peer_id, ECHO, b"still ok") == a.peer_id.encode() + b"|still ok"


async def test_handler_error_is_request_failed_and_node_keeps_serving(cluster: Cluster) -> None:
    async def picky(remote: str, data: bytes) -> bytes:
        if data == b"bad":
            raise ValueError("boom 42")
        return b"ok"

    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_request_handler("/raven/test/picky/1", picky)
        with pytest.raises(RequestFailed, match="boom 42"):
            await a.request(b.peer_id, "/raven/test/picky/1", b"bad")
        assert await a.request(b.peer_id, "/raven/test/picky/1", b"good") == b"ok"
        b.set_request_handler(ECHO, echo_handler)
        assert await a.request(b.peer_id, ECHO, b"x") == a.peer_id.encode() + b"|x"


async def test_unknown_protocol(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_request_handler(ECHO, echo_handler)
        with pytest.raises(ProtocolNotSupported):
            await a.request(b.peer_id, "/raven/test/nope/1", b"x")
        with pytest.raises(ProtocolNotSupported):
            await a.open_stream(b.peer_id, "/raven/test/nope/1")
        assert await a.request(b.peer_id, ECHO, b"x") == a.peer_id.encode() + b"|x"


async def test_request_timeout_is_network_error(cluster: Cluster) -> None:
    release = trio.Event()

    async def slow(remote: str, data: bytes) -> bytes:
        with trio.move_on_after(20):
            await release.wait()
        return b"late"

    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_request_handler("/raven/test/slow/1", slow)
        started = trio.current_time()
        with pytest.raises(NetworkError, match="timed out"):
            await a.request(b.peer_id, "/raven/test/slow/1", b"x", timeout=0.5)
        assert trio.current_time() - started < 5
        release.set()


async def test_request_handler_timeout(cluster: Cluster) -> None:
    """A handler that never returns is cancelled; the caller hears why, the node keeps serving."""

    async def stuck(remote: str, data: bytes) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)], request_handler_timeout_s=0.3)
        b.set_request_handler("/raven/test/stuck/1", stuck)
        b.set_request_handler(ECHO, echo_handler)
        for _ in range(2):
            started = trio.current_time()
            with pytest.raises(RequestFailed, match=r"handler for .* timed out after 0\.3 s"):
                await a.request(b.peer_id, "/raven/test/stuck/1", b"x", timeout=10)
            assert trio.current_time() - started < 5
        assert await a.request(b.peer_id, ECHO, b"y") == a.peer_id.encode() + b"|y"


async def test_inbound_requests_are_capped_per_peer(cluster: Cluster) -> None:
    """Above the cap, one peer's further requests fail at once; other peers are unaffected."""
    release = trio.Event()
    waiting: list[str] = []

    async def gate(remote: str, data: bytes) -> bytes:
        waiting.append(remote)
        with trio.move_on_after(20):
            await release.wait()
        return b"done:" + data

    with trio.fail_after(TEST_DEADLINE):
        a, b, c = await cluster.start(3, [(0, 1), (2, 1)], max_inbound_requests_per_peer=2)
        b.set_request_handler("/raven/test/gate/1", gate)
        results: list[bytes] = []

        async def call(data: bytes) -> None:
            results.append(await a.request(b.peer_id, "/raven/test/gate/1", data, timeout=15))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, b"1")
            nursery.start_soon(call, b"2")
            await eventually(lambda: len(waiting) == 2)
            started = trio.current_time()
            with pytest.raises(RequestFailed, match="too many concurrent requests"):
                await a.request(b.peer_id, "/raven/test/gate/1", b"3", timeout=10)
            assert trio.current_time() - started < 3
            # the cap is per peer: c is served while a is at its limit
            nursery.start_soon(lambda: c.request(b.peer_id, "/raven/test/gate/1", b"c"))
            await eventually(lambda: waiting.count(c.peer_id) == 1)
            release.set()
        assert sorted(results) == [b"done:1", b"done:2"]
        # slots are given back when requests finish
        assert await a.request(b.peer_id, "/raven/test/gate/1", b"4") == b"done:4"


async def test_request_to_unknown_peer_is_unreachable(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        (a,) = await cluster.start(1)
        stranger = NodeIdentity.generate().peer_id
        with pytest.raises(NetworkError):
            await a.request(stranger, ECHO, b"x", timeout=2)


# --- streams ---------------------------------------------------------------------------------


async def test_stream_echo_and_eof(cluster: Cluster) -> None:
    seen_remote: list[str] = []

    async def upper(stream: Stream) -> None:
        seen_remote.append(stream.remote_peer)
        data = await read_all(stream)
        await stream.write(data.upper())

    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_stream_handler("/raven/test/upper/1", upper)
        stream = await a.open_stream(b.peer_id, "/raven/test/upper/1")
        assert stream.remote_peer == b.peer_id
        await stream.write(b"hello ")
        await stream.write(b"world")
        await stream.close()
        assert await read_all(stream) == b"HELLO WORLD"
        assert await stream.read() == b""  # EOF is sticky
        assert seen_remote == [a.peer_id]


async def test_stream_reset_reaches_the_other_side(cluster: Cluster) -> None:
    outcome: list[str] = []
    handled = trio.Event()

    async def reader(stream: Stream) -> None:
        try:
            with trio.fail_after(10):
                while await stream.read():
                    pass
            outcome.append("eof")
        except NetworkError:
            outcome.append("reset")
        finally:
            handled.set()

    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_stream_handler("/raven/test/reader/1", reader)
        stream = await a.open_stream(b.peer_id, "/raven/test/reader/1")
        await stream.write(b"some bytes")
        await trio.sleep(0.2)
        await stream.reset()
        with trio.fail_after(10):
            await handled.wait()
        assert outcome == ["reset"]
        with pytest.raises(NetworkError):
            await stream.write(b"more")


async def test_stream_handler_error_resets_the_stream(cluster: Cluster) -> None:
    """A handler that fails half-way must not look like a complete (short) answer."""

    async def half_then_fail(stream: Stream) -> None:
        await stream.write(b"partial answer")
        await trio.sleep(0.2)
        raise RuntimeError("disk on fire")

    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_stream_handler("/raven/test/fail/1", half_then_fail)
        stream = await a.open_stream(b.peer_id, "/raven/test/fail/1")
        with pytest.raises(NetworkError):
            await read_all(stream)


async def test_bulk_stream_moves_megabytes(cluster: Cluster) -> None:
    async def digest(stream: Stream) -> None:
        hasher = hashlib.sha256()
        size = 0
        while chunk := await stream.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
        await stream.write(hasher.digest() + size.to_bytes(8, "big"))

    payload = os.urandom(6 * MiB)
    with trio.fail_after(TEST_DEADLINE):
        a, b = await cluster.start(2, [(0, 1)])
        b.set_stream_handler("/raven/test/digest/1", digest)
        stream = await a.open_bulk_stream(b.peer_id, "/raven/test/digest/1")
        view = memoryview(payload)
        for offset in range(0, len(payload), 256 * 1024):
            await stream.write(bytes(view[offset : offset + 256 * 1024]))
        await stream.close()
        reply = await read_all(stream)
        assert reply == hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "big")


# --- DHT ---------------------------------------------------------------------------------------


def only_ok(key: str, value: bytes) -> None:
    if not value.startswith(b"ok:"):
        raise ValueError(f"record under {key} must start with ok:")


async def test_dht_put_get_and_validation(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        nets = await cluster.start(3, line(3))
        for net in nets:
            net.set_record_validator("raventest", only_ok)
        a, _, c = nets
        await retry(lambda: _put(a, "/raventest/job-1", b"ok:1"))
        assert await retry(lambda: c.get_value("/raventest/job-1", timeout=3)) == b"ok:1"
        assert await a.get_value("/raventest/job-1") == b"ok:1"

        with pytest.raises(ValueError, match="ok:"):
            await a.put_value("/raventest/job-2", b"bad")
        with pytest.raises(ValueError):
            await a.put_value("/unregistered/job-2", b"ok:2")
        with pytest.raises(ValueError):
            await a.put_value("no-namespace", b"ok:2")
        assert await c.get_value("/raventest/job-2", timeout=2) is None


async def _put(net: Network, key: str, value: bytes) -> bool:
    await net.put_value(key, value, timeout=5)
    return True


async def test_provide_and_find_providers(cluster: Cluster) -> None:
    key = "/raventest/shard/abc123"
    with trio.fail_after(TEST_DEADLINE):
        a, _, c = await cluster.start(3, line(3))

        async def provide_twice() -> bool:
            await a.provide(key, timeout=5)
            await a.provide(key, timeout=5)
            return True

        await retry(provide_twice)
        found = await retry(lambda: c.find_providers(key, timeout=3))
        assert isinstance(found, list)
        assert [p.peer_id for p in found] == [a.peer_id]
        assert found[0].addrs
        assert await c.find_providers("/raventest/shard/nobody", timeout=2) == []


async def test_find_peer(cluster: Cluster) -> None:
    with trio.fail_after(TEST_DEADLINE):
        a, _, c = await cluster.start(3, line(3))
        assert c.peer_id not in a.connected_peers()

        async def lookup() -> PeerInfo | None:
            return await a.find_peer(c.peer_id, timeout=3)

        info = await retry(lookup)
        assert isinstance(info, PeerInfo)
        assert info.peer_id == c.peer_id and info.addrs
        for addr in dialable(info):
            try:
                assert await a.connect(addr, timeout=5) == c.peer_id
                break
            except NetworkError:
                continue
        assert c.peer_id in a.connected_peers()
        assert await a.find_peer(NodeIdentity.generate().peer_id, timeout=2) is None
