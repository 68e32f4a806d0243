"""The blob protocol (`ravenp2p.data.blobs`) on both network implementations.

Each test runs on `MemoryNetwork` and on real `Libp2pNetwork` hosts on
127.0.0.1. Misbehaving providers are written here from the wire format in
docs/data-repository.md (msgpack + u32 length prefixes), independently of the
module under test: they stand in for a peer running other, faulty code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from ravenp2p.data.blobs import (
    BLOB_PROTOCOL,
    BlobIntegrityError,
    BlobNotFound,
    BlobService,
    provider_key,
)
from ravenp2p.data.store import BlobStore, chunk_digests
from ravenp2p.identity import NodeIdentity
from ravenp2p.network.base import Network, NetworkError, Stream
from ravenp2p.network.memory import MemoryHub, MemoryNetwork

KINDS = ("memory", "libp2p")
DEADLINE = 30.0
KiB = 1024
MiB = 1024 * KiB


@dataclass
class Peer:
    """A running network with a store and a running blob service."""

    network: Network
    store: BlobStore
    service: BlobService

    @property
    def peer_id(self) -> str:
        return self.network.peer_id


class World:
    """Starts peers of one network kind, each in its own task, until the test ends."""

    def __init__(self, kind: str, nursery: trio.Nursery) -> None:
        self.kind = kind
        self._nursery = nursery
        self._hub = MemoryHub(seed=0)
        self._stop = trio.Event()

    def _network(self) -> Network:
        identity = NodeIdentity.generate()
        if self.kind == "memory":
            return MemoryNetwork(self._hub, identity)
        from ravenp2p.network.libp2p import Libp2pNetwork

        return Libp2pNetwork(identity, listen_addrs=("/ip4/127.0.0.1/tcp/0",))

    async def _run(self, peer: Peer, *, task_status: trio.TaskStatus[None]) -> None:
        async with peer.network, peer.service.running():
            task_status.started()
            await self._stop.wait()

    async def start(
        self, n: int, edges: Sequence[tuple[int, int]] = (), **options: Any
    ) -> list[Peer]:
        """`n` peers whose services take `options`, connected `a -> b` for each edge."""
        peers = []
        for _ in range(n):
            network = self._network()
            store = BlobStore(None)
            peer = Peer(network, store, BlobService(network, store, **options))
            await self._nursery.start(self._run, peer)
            peers.append(peer)
        for a, b in edges:
            await peers[a].network.connect(peers[b].network.listen_addrs[0])
        for a, b in edges:
            await eventually(
                lambda a=a, b=b: peers[a].peer_id in peers[b].network.connected_peers()
            )
        return peers

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture(params=KINDS)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    async with trio.open_nursery() as nursery:
        w = World(request.param, nursery)
        try:
            yield w
        finally:
            w.stop()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def providers_of(peer: Peer, digest: str) -> set[str]:
    try:
        found = await peer.network.find_providers(provider_key(digest), timeout=3)
    except NetworkError:
        return set()
    return {info.peer_id for info in found}


async def wait_for_provider(asker: Peer, digest: str, provider: Peer, timeout: float = 15) -> None:
    """Until the DHT, as seen from `asker`, lists `provider` for `digest`."""
    with trio.fail_after(timeout):
        while provider.peer_id not in await providers_of(asker, digest):
            await provider.service.announce(digest, timeout=5)
            await trio.sleep(0.2)


# --- a second implementation of the wire format, for misbehaving providers ---------------------


async def read_exactly(stream: Stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = await stream.read(n - len(data))
        if not more:
            raise EOFError(f"stream ended after {len(data)} of {n} bytes")
        data += more
    return data


async def read_message(stream: Stream) -> Any:
    length = int.from_bytes(await read_exactly(stream, 4), "big")
    return msgpack.unpackb(await read_exactly(stream, length), raw=False)


def message(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def ok_header(blob: bytes, chunk_size: int) -> bytes:
    chunks = [
        hashlib.sha256(blob[i : i + chunk_size]).hexdigest()
        for i in range(0, len(blob), chunk_size)
    ]
    return message({"status": "ok", "size": len(blob), "chunk_size": chunk_size, "chunks": chunks})


@dataclass
class FaultLog:
    """What a misbehaving provider was asked for and what it sent."""

    offsets: list[int]
    sent: int = 0


def cutting_provider(blob: bytes, cut: int, log: FaultLog) -> Callable[[Stream], Awaitable[None]]:
    """Answers honestly, sends `cut` bytes from the requested offset, then resets the stream."""

    async def handler(stream: Stream) -> None:
        request = await read_message(stream)
        offset, chunk_size = request["offset"], request["chunk_size"]
        log.offsets.append(offset)
        await stream.write(ok_header(blob, chunk_size))
        part = blob[offset : offset + cut]
        await stream.write(part)
        log.sent += len(part)
        await trio.sleep(0.3)  # let the bytes arrive before the reset overtakes them
        await stream.reset()

    return handler


def serving_provider(
    blob: bytes, log: FaultLog, served: bytes | None = None, header_of: bytes | None = None
) -> Callable[[Stream], Awaitable[None]]:
    """Sends the header of `header_of` (default `blob`) then `served` (default `blob`)."""

    async def handler(stream: Stream) -> None:
        request = await read_message(stream)
        offset, chunk_size = request["offset"], request["chunk_size"]
        log.offsets.append(offset)
        await stream.write(ok_header(header_of if header_of is not None else blob, chunk_size))
        body = (served if served is not None else blob)[offset:]
        await stream.write(body)
        log.sent += len(body)
        await stream.close()

    return handler


def flipped(blob: bytes, position: int) -> bytes:
    changed = bytearray(blob)
    changed[position] ^= 0xFF
    return bytes(changed)


# --- fetching ------------------------------------------------------------------------------


async def test_fetch_from_explicit_provider(world: World) -> None:
    blob = os.urandom(300 * KiB + 7)
    with trio.fail_after(DEADLINE):
        a, b = await world.start(2, [(1, 0)], chunk_size=64 * KiB, announce=False)
        digest = a.store.put(blob)
        assert await b.service.fetch(digest, providers=[a.peer_id]) == blob
        assert b.store.get(digest) == blob
        assert a.service.stats.served_bytes == len(blob)
        stats = b.service.stats
        assert (stats.fetches, stats.fetched_bytes, stats.resumes) == (1, len(blob), 0)
        assert (stats.integrity_failures, stats.providers_failed) == (0, 0)

        # Now local: no second transfer.
        assert await b.service.fetch(digest, providers=[a.peer_id]) == blob
        assert a.service.stats.served_bytes == len(blob)
        assert b.service.stats.fetches == 1

        empty = a.store.put(b"")
        assert await b.service.fetch(empty, providers=[a.peer_id], size=0) == b""

        # A manifest's chunk list made with another chunk size: the fetch asks for that size.
        other = os.urandom(50 * KiB)
        listed = chunk_digests(other, 16 * KiB)
        got = await b.service.fetch(
            a.store.put(other), providers=[a.peer_id], chunks=listed, chunk_size=16 * KiB
        )
        assert got == other
        assert b.service.stats.integrity_failures == 0


async def test_fetch_through_dht_and_fetcher_becomes_provider(world: World) -> None:
    blob = os.urandom(200 * KiB)
    with trio.fail_after(DEADLINE):
        p0, p1, _, p3 = await world.start(4, [(0, 1), (1, 2), (2, 3)], chunk_size=32 * KiB)
        assert p0.peer_id not in p3.network.connected_peers()
        digest = await p0.service.publish(blob)
        await wait_for_provider(p3, digest, p0)

        assert await p3.service.fetch(digest) == blob  # nobody named: the DHT finds p0
        assert p0.service.stats.served_bytes == len(blob)

        # p3 announced what it fetched; once p0 no longer has it, p3 is the one to serve it.
        await wait_for_provider(p1, digest, p3)
        p0.store.delete(digest)
        assert await p1.service.fetch(digest) == blob
        assert p3.service.stats.served_bytes == len(blob)
        assert p0.service.stats.served_bytes == len(blob)
        assert p1.service.stats.fetched_bytes == len(blob)


async def test_a_provider_named_by_peer_id_alone_is_found_in_the_dht(world: World) -> None:
    """The requester is named as a shard's provider; a worker never met it: it looks it up."""
    blob = os.urandom(100 * KiB)
    with trio.fail_after(DEADLINE):
        owner, _, _, fetcher = await world.start(4, [(0, 1), (1, 2), (2, 3)],
                                                 chunk_size=32 * KiB, announce=False)
        assert owner.peer_id not in fetcher.network.connected_peers()
        digest = owner.store.put(blob)
        assert await fetcher.service.fetch(digest, providers=[owner.peer_id]) == blob
        assert owner.peer_id in fetcher.network.connected_peers()


async def test_five_megabytes_in_256k_chunks_with_trusted_list(world: World) -> None:
    chunk = 256 * KiB
    blob = os.urandom(5 * MiB + 1234)
    chunks = chunk_digests(blob, chunk)
    assert len(chunks) == 21
    with trio.fail_after(DEADLINE):
        a, b = await world.start(2, [(1, 0)], chunk_size=chunk, announce=False)
        digest = a.store.put(blob)
        got = await b.service.fetch(digest, providers=[a.peer_id], chunks=chunks, size=len(blob))
        assert hashlib.sha256(got).hexdigest() == digest
        assert a.service.stats.served_bytes == len(blob)
        assert b.service.stats.fetched_bytes == len(blob)


async def test_dropped_connection_resumes_from_last_verified_chunk(world: World) -> None:
    chunk = 64 * KiB
    blob = os.urandom(20 * chunk + 100)
    log = FaultLog([])
    with trio.fail_after(DEADLINE):
        flaky, honest, fetcher = await world.start(
            3, [(2, 0), (2, 1)], chunk_size=chunk, announce=False
        )
        digest = honest.store.put(blob)
        flaky.network.set_stream_handler(BLOB_PROTOCOL, cutting_provider(blob, 5 * chunk // 2, log))

        got = await fetcher.service.fetch(digest, providers=[flaky.peer_id, honest.peer_id])
        assert got == blob and fetcher.store.has(digest)
        # First try from 0; one retry of the same provider from the 2 chunks it verified;
        # then the honest provider from the 4 verified chunks on.
        assert log.offsets == [0, 2 * chunk]
        assert honest.service.stats.served_bytes == len(blob) - 4 * chunk
        stats = fetcher.service.stats
        assert stats.resumes == 2
        assert stats.fetched_bytes == log.sent + honest.service.stats.served_bytes
        assert stats.providers_failed == 1 and stats.integrity_failures == 0


async def test_corrupt_chunk_is_caught_and_another_provider_used(world: World) -> None:
    chunk = 64 * KiB
    blob = os.urandom(10 * chunk)
    bad_chunk = 6
    log = FaultLog([])
    with trio.fail_after(DEADLINE):
        liar, honest, fetcher = await world.start(
            3, [(2, 0), (2, 1)], chunk_size=chunk, announce=False
        )
        digest = honest.store.put(blob)
        liar.network.set_stream_handler(
            BLOB_PROTOCOL, serving_provider(blob, log, served=flipped(blob, bad_chunk * chunk + 9))
        )
        got = await fetcher.service.fetch(digest, providers=[liar.peer_id, honest.peer_id])
        assert got == blob
        stats = fetcher.service.stats
        assert stats.integrity_failures == 1
        assert stats.providers_failed == 1
        assert log.offsets == [0]  # a provider caught lying is not asked again
        assert honest.service.stats.served_bytes == len(blob) - bad_chunk * chunk
        assert stats.resumes == 1


async def test_false_chunk_list_is_caught_by_the_whole_digest(world: World) -> None:
    """A provider whose header and bytes agree with each other but not with the digest."""
    chunk = 32 * KiB
    blob = os.urandom(6 * chunk)
    fake = flipped(blob, 3 * chunk)
    log = FaultLog([])
    with trio.fail_after(DEADLINE):
        liar, honest, fetcher = await world.start(
            3, [(2, 0), (2, 1)], chunk_size=chunk, announce=False
        )
        digest = honest.store.put(blob)
        liar.network.set_stream_handler(
            BLOB_PROTOCOL, serving_provider(blob, log, served=fake, header_of=fake)
        )
        got = await fetcher.service.fetch(digest, providers=[liar.peer_id, honest.peer_id])
        assert got == blob
        stats = fetcher.service.stats
        assert stats.integrity_failures == 1
        assert honest.service.stats.served_bytes == len(blob)  # nothing of the liar's kept
        assert stats.fetched_bytes == 2 * len(blob)


async def test_trusted_chunk_list_mismatch_is_refused(world: World) -> None:
    chunk = 16 * KiB
    blob = os.urandom(5 * chunk)
    with trio.fail_after(DEADLINE):
        a, b = await world.start(2, [(1, 0)], chunk_size=chunk, announce=False)
        digest = a.store.put(blob)
        wrong = chunk_digests(flipped(blob, 2 * chunk), chunk)
        with pytest.raises(BlobIntegrityError, match="chunk list"):
            await b.service.fetch(digest, providers=[a.peer_id], chunks=wrong)
        with pytest.raises(BlobIntegrityError, match="expected"):
            await b.service.fetch(digest, providers=[a.peer_id], size=len(blob) - 1)
        assert b.service.stats.fetched_bytes == 0  # refused on the header, no body read
        assert not b.store.has(digest)
        assert b.service.stats.integrity_failures == 2

        with pytest.raises(ValueError, match="chunks lists 5 digests"):
            await b.service.fetch(digest, chunks=chunk_digests(blob, chunk), size=len(blob) + chunk)
        # The right list works, and a stored blob is still checked against a list given later.
        right = chunk_digests(blob, chunk)
        assert await b.service.fetch(digest, providers=[a.peer_id], chunks=right) == blob
        with pytest.raises(BlobIntegrityError, match="trusted chunk list"):
            await b.service.fetch(digest, chunks=wrong)


async def test_not_found_anywhere(world: World) -> None:
    with trio.fail_after(DEADLINE):
        a, b, c = await world.start(3, [(1, 0), (2, 1)], announce=False)
        missing = hashlib.sha256(b"nobody has this").hexdigest()
        with pytest.raises(BlobNotFound, match=a.peer_id):
            await b.service.fetch(missing, providers=[a.peer_id], timeout=15)
        with pytest.raises(BlobNotFound):
            await c.service.fetch(missing, timeout=15)
        assert b.service.stats.providers_failed == 1
        assert a.service.stats.served_bytes == 0


async def test_malformed_requests_leave_the_server_serving(world: World) -> None:
    blob = os.urandom(40 * KiB)
    with trio.fail_after(DEADLINE):
        server, client = await world.start(
            2, [(1, 0)], chunk_size=4 * KiB, max_blob_bytes=MiB, announce=False
        )
        digest = server.store.put(blob)
        bad_requests = [
            b"",  # closes without a request
            (5000).to_bytes(4, "big") + b"x" * 16,  # announces more than a request may be
            (3).to_bytes(4, "big") + b"\xc1\xc1\xc1",  # not msgpack
            message([digest, 0]),
            message({"digest": "../" + "a" * 61, "offset": 0}),
            message({"digest": digest.upper(), "offset": 0}),
            message({"digest": digest, "offset": -1}),
            message({"digest": digest, "offset": 41 * KiB}),  # past the end
            message({"digest": digest, "offset": 100}),  # not on a chunk boundary
            message({"digest": digest, "offset": "0"}),
            message({"digest": digest}),
            message({"digest": digest, "offset": 0, "please": "everything"}),
            message({"digest": digest, "offset": 0, "chunk_size": 1}),
            (10).to_bytes(4, "big") + b"\x81",  # cut short
        ]
        for raw in bad_requests:
            stream = await client.network.open_bulk_stream(server.peer_id, BLOB_PROTOCOL)
            await stream.write(raw)
            await stream.close()
            answer = b""
            with trio.fail_after(12):
                try:
                    while more := await stream.read():
                        answer += more
                except NetworkError:
                    pass
            assert answer == b"", f"server answered {raw[:40]!r}"
            await stream.reset()

        stream = await client.network.open_bulk_stream(server.peer_id, BLOB_PROTOCOL)
        absent = hashlib.sha256(b"absent").hexdigest()
        await stream.write(message({"digest": absent, "offset": 0}))
        await stream.close()
        with trio.fail_after(10):
            assert await read_message(stream) == {"status": "not_found"}
        await stream.reset()

        assert await client.service.fetch(digest, providers=[server.peer_id]) == blob
        assert server.service.stats.served_bytes == len(blob)


async def test_busy_beyond_max_concurrent_serves(world: World) -> None:
    # Big enough that an unread response fills the stream's buffers and stalls the server
    # (socket buffers on loopback TCP hold several MiB).
    blob = os.urandom(2 * MiB if world.kind == "memory" else 32 * MiB)
    with trio.fail_after(DEADLINE):
        server, client, other = await world.start(
            3, [(1, 0), (2, 0)], max_concurrent_serves=1, announce=False
        )
        digest = server.store.put(blob)
        hog = await client.network.open_bulk_stream(server.peer_id, BLOB_PROTOCOL)
        await hog.write(message({"digest": digest, "offset": 0}))
        await hog.close()
        header = await read_message(hog)  # then reads no more: the server's writes stall
        assert header["status"] == "ok" and header["size"] == len(blob)

        probe = await client.network.open_bulk_stream(server.peer_id, BLOB_PROTOCOL)
        await probe.write(message({"digest": digest, "offset": 0}))
        await probe.close()
        assert await read_message(probe) == {"status": "busy"}
        await probe.reset()

        async def release_later() -> None:
            await trio.sleep(0.3)
            await hog.reset()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_later)
            # Asked while busy, asked again after a pause, served once the slot is free.
            got = await other.service.fetch(digest, providers=[server.peer_id])
        assert got == blob
        assert other.service.stats.providers_failed == 0


async def test_concurrent_fetches_share_one_transfer(world: World) -> None:
    blob = os.urandom(2 * MiB)
    with trio.fail_after(DEADLINE):
        a, b = await world.start(2, [(1, 0)], chunk_size=128 * KiB, announce=False)
        digest = a.store.put(blob)
        results: list[bytes] = []

        async def fetch_one() -> None:
            results.append(await b.service.fetch(digest, providers=[a.peer_id]))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(fetch_one)
        assert results == [blob] * 4
        assert a.service.stats.served_bytes == len(blob), b.service.stats
        assert b.service.stats.fetches == 1
        assert b.service.stats.fetched_bytes == len(blob)


# --- API edges (memory network only) ---------------------------------------------------------


async def test_fetch_arguments_and_lifecycle() -> None:
    hub = MemoryHub(seed=1)
    network = MemoryNetwork(hub, NodeIdentity.generate())
    store = BlobStore(None)
    service = BlobService(network, store, chunk_size=64 * KiB)
    digest = store.put(b"local")
    with trio.fail_after(10):
        async with network:
            with pytest.raises(RuntimeError, match="running"):
                await service.fetch(digest)
            async with service.running():
                assert await service.fetch(digest) == b"local"
                with pytest.raises(ValueError, match="64 lowercase hex"):
                    await service.fetch("../etc/passwd")
                with pytest.raises(ValueError, match=r"chunks\[1\]"):
                    await service.fetch(digest, chunks=[digest, "x"])
                with pytest.raises(ValueError, match="providers"):
                    await service.fetch(digest, providers=[""])
                with pytest.raises(ValueError, match="size"):
                    await service.fetch(digest, size=-1)
                with pytest.raises(ValueError, match="chunk_size"):
                    await service.fetch(digest, chunk_size=100)
                with pytest.raises(RuntimeError, match="already running"):
                    async with service.running():
                        pass
                # Nobody to ask, and nothing in the DHT.
                with pytest.raises(BlobNotFound):
                    await service.fetch(hashlib.sha256(b"elsewhere").hexdigest())
    for bad in ({"chunk_size": 10}, {"max_concurrent_serves": 0}, {"max_blob_bytes": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BlobService(network, store, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="raise chunk_size"):
        BlobService(network, store, chunk_size=1024, max_blob_bytes=1 << 30)
    assert provider_key(digest) == f"/ravenp2p-blob/{digest}"
    with pytest.raises(ValueError):
        provider_key("ABC")


async def test_fetch_times_out_on_a_stalled_provider() -> None:
    """A provider that never answers: the caller's timeout ends the fetch with TooSlowError."""
    hub = MemoryHub(seed=2)
    nets = [MemoryNetwork(hub, NodeIdentity.generate()) for _ in range(2)]
    services = [BlobService(net, BlobStore(None), announce=False) for net in nets]

    async def silent(stream: Stream) -> None:
        await trio.sleep(60)

    digest = hashlib.sha256(b"slow").hexdigest()
    with trio.fail_after(10):
        async with nets[0], nets[1], services[1].running():
            nets[0].set_stream_handler(BLOB_PROTOCOL, silent)
            await nets[1].connect(nets[0].listen_addrs[0])
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await services[1].fetch(digest, providers=[nets[0].peer_id], timeout=0.5)
            assert trio.current_time() - start < 2
            # Nobody waits for the transfer any more: it is cancelled and forgotten.
            await eventually(lambda: not services[1]._inflight, timeout=3)


async def test_corrupt_file_on_a_providers_disk_is_not_served(tmp_path: Path) -> None:
    """A provider whose stored copy rotted answers not_found (and drops it); others serve."""
    hub = MemoryHub(seed=3)
    nets = [MemoryNetwork(hub, NodeIdentity.generate()) for _ in range(3)]
    stores = [BlobStore(tmp_path / "rotten"), BlobStore(None), BlobStore(None)]
    services = [
        BlobService(net, store, chunk_size=16 * KiB, announce=False)
        for net, store in zip(nets, stores, strict=True)
    ]
    blob = os.urandom(100 * KiB)
    digest = stores[0].put(blob)
    stores[1].put(blob)
    path = tmp_path / "rotten" / digest[:2] / digest
    path.write_bytes(flipped(blob, 70 * KiB))
    with trio.fail_after(10):
        async with (
            nets[0],
            nets[1],
            nets[2],
            services[0].running(),
            services[1].running(),
            services[2].running(),
        ):
            for net in nets[:2]:
                await nets[2].connect(net.listen_addrs[0])
            got = await services[2].fetch(digest, providers=[nets[0].peer_id, nets[1].peer_id])
    assert got == blob
    assert not stores[0].has(digest) and not path.exists()
    assert services[0].stats.served_bytes == 0
    assert services[1].stats.served_bytes == len(blob)
    assert services[2].stats.providers_failed == 1
