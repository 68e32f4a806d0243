"""Tests of the encrypted bulk channel (`ravenp2p.network.bulk`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ravenp2p.network.base import ProtocolNotSupported, Stream
from ravenp2p.network.bulk import (
    HEADER,
    HEADER_LEN,
    KEY_LEN,
    MAX_FRAME,
    T_HELLO,
    TICKET_LEN,
    VERSION,
    BulkEndpoint,
    BulkError,
    BulkHandshakeError,
    BulkIntegrityError,
    BulkStream,
    BulkStreamReset,
    BulkTruncatedError,
    derive_keys,
)

PEER_A = "peer-A"
PEER_B = "peer-B"
PROTO = "/test/blob/1"


class PipeStream:
    """One end of an in-memory handshake stream, shaped like `base.Stream`."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, remote: str) -> None:
        self._inner = inner
        self._remote = remote
        self.on_read: Callable[[bytes], bytes] = lambda data: data

    @property
    def remote_peer(self) -> str:
        return self._remote

    async def read(self, max_bytes: int = 65536) -> bytes:
        return self.on_read(await self._inner.receive_some(max_bytes))

    async def write(self, data: bytes) -> None:
        await self._inner.send_all(data)

    async def close(self) -> None:
        await self._inner.send_eof()

    async def reset(self) -> None:
        await self._inner.aclose()


def pipe_pair() -> tuple[PipeStream, PipeStream]:
    """(dialer's end, responder's end) of a handshake stream between PEER_A and PEER_B."""
    left, right = trio.testing.memory_stream_pair()
    return PipeStream(left, PEER_B), PipeStream(right, PEER_A)


@asynccontextmanager
async def endpoints(**kwargs: float) -> AsyncIterator[tuple[BulkEndpoint, BulkEndpoint]]:
    """A dialer endpoint and a serving responder endpoint on 127.0.0.1."""
    dialer = BulkEndpoint(PEER_A)
    responder = BulkEndpoint(PEER_B, **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(responder.serve)
        yield dialer, responder
        nursery.cancel_scope.cancel()


async def bulk_pair(
    dialer: BulkEndpoint,
    responder: BulkEndpoint,
    supported: Callable[[str], bool] = lambda _p: True,
    tamper_reply: Callable[[bytes], bytes] | None = None,
) -> tuple[BulkStream, BulkStream]:
    """Run `open` and `accept` against each other; returns (dialer stream, responder stream)."""
    a_end, b_end = pipe_pair()
    if tamper_reply is not None:
        a_end.on_read = tamper_reply
    got: dict[str, BulkStream] = {}

    async def accept() -> None:
        protocol, stream = await responder.accept(b_end, supported)
        assert protocol == PROTO
        got["b"] = stream

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        got["a"] = await dialer.open(a_end, PROTO)
    return got["a"], got["b"]


async def read_all(stream: Stream) -> bytes:
    parts = []
    while chunk := await stream.read(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


async def test_round_trip_both_directions() -> None:
    up = os.urandom(3 * MAX_FRAME + 12345)
    down = os.urandom(MAX_FRAME // 3)
    with trio.fail_after(10):
        async with endpoints() as (dialer, responder):
            a, b = await bulk_pair(dialer, responder)
            assert a.remote_peer == PEER_B and b.remote_peer == PEER_A
            results: dict[str, bytes] = {}

            async def send(stream: BulkStream, data: bytes) -> None:
                view = memoryview(data)
                for start in range(0, len(data), 700_001):  # odd sizes span frames
                    await stream.write(view[start : start + 700_001])
                await stream.close()

            async def receive(stream: BulkStream, key: str) -> None:
                results[key] = await read_all(stream)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, a, up)
                nursery.start_soon(send, b, down)
                nursery.start_soon(receive, b, "up")
                nursery.start_soon(receive, a, "down")
            assert hashlib.sha256(results["up"]).digest() == hashlib.sha256(up).digest()
            assert results["down"] == down


async def test_eof_and_half_close() -> None:
    with trio.fail_after(10):
        async with endpoints() as (dialer, responder):
            a, b = await bulk_pair(dialer, responder)
            await a.write(b"question")
            await a.close()
            assert await b.read(3) == b"que"
            assert await b.read() == b"stion"
            assert await b.read() == b""
            assert await b.read() == b""  # EOF is sticky
            with pytest.raises(BulkError):
                await a.write(b"after close")
            await b.write(b"answer")  # the other direction still works
            await b.close()
            buf = bytearray(100)
            assert await a.read_into(buf) == 6 and bytes(buf[:6]) == b"answer"
            assert await a.read() == b""


async def test_unsupported_protocol() -> None:
    with trio.fail_after(10):
        async with endpoints() as (dialer, responder):
            a_end, b_end = pipe_pair()
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    with pytest.raises(BulkHandshakeError):
                        await responder.accept(b_end, lambda _p: False)

                nursery.start_soon(accept)
                with pytest.raises(ProtocolNotSupported):
                    await dialer.open(a_end, PROTO)


async def test_wrong_ticket_is_refused() -> None:
    def corrupt_ticket(reply: bytes) -> bytes:
        if len(reply) >= 1 + KEY_LEN + TICKET_LEN:  # the whole reply arrives in one piece
            at = 1 + KEY_LEN
            reply = reply[:at] + bytes(b ^ 0xFF for b in reply[at : at + 4]) + reply[at + 4 :]
        return reply

    with trio.fail_after(10):
        async with endpoints(ticket_ttl=1.0) as (dialer, responder):
            a_end, b_end = pipe_pair()
            a_end.on_read = corrupt_ticket
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    with pytest.raises(BulkHandshakeError):  # when the real ticket expires
                        await responder.accept(b_end)

                nursery.start_soon(accept)
                with pytest.raises(BulkHandshakeError, match="refused"):
                    await dialer.open(a_end, PROTO)
            assert not responder._pending  # nothing left behind


@asynccontextmanager
async def manual_handshake(responder: BulkEndpoint) -> AsyncIterator[tuple[bytes, bytes, str, int]]:
    """Play the dialer's libp2p-side handshake by hand while `accept` waits.

    Yields (ticket, a valid HELLO frame for that ticket, ip, port); the test plays
    the TCP side itself.
    """
    a_end, b_end = pipe_pair()
    private = X25519PrivateKey.generate()
    own = private.public_key().public_bytes_raw()
    proto = PROTO.encode()
    await a_end.write(bytes([VERSION]) + own + len(proto).to_bytes(2, "big") + proto)
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            with contextlib.suppress(BulkHandshakeError):
                _, stream = await responder.accept(b_end)
                await stream.aclose()

        nursery.start_soon(accept)
        reply = b""
        while len(reply) < 1 + KEY_LEN + TICKET_LEN + 1:
            reply += await a_end.read()
        eph, ticket = reply[1 : 1 + KEY_LEN], reply[1 + KEY_LEN : 1 + KEY_LEN + TICKET_LEN]
        ip_len = reply[1 + KEY_LEN + TICKET_LEN]
        while len(reply) < 1 + KEY_LEN + TICKET_LEN + 1 + ip_len + 2:
            reply += await a_end.read()
        rest = reply[2 + KEY_LEN + TICKET_LEN :]
        ip, port = rest[:ip_len].decode(), int.from_bytes(rest[ip_len : ip_len + 2])
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph))
        d2r, _ = derive_keys(shared, ticket, PEER_A, PEER_B, PROTO, own, eph)
        header = HEADER.pack(T_HELLO, 16)
        hello = header + AESGCM(d2r).encrypt(bytes(12), b"", header)
        yield ticket, hello, ip, port
        nursery.cancel_scope.cancel()


async def _present(ip: str, port: int, ticket: bytes, hello: bytes) -> bytes:
    """Connect, present `ticket` and `hello`; return what the responder sends back."""
    conn = await trio.open_tcp_stream(ip, port)
    try:
        await conn.send_all(ticket + hello)
        try:
            return await conn.receive_some(100)
        except trio.BrokenResourceError:
            return b""
    finally:
        await conn.aclose()


async def test_replayed_and_expired_tickets_are_refused() -> None:
    junk_hello = HEADER.pack(T_HELLO, 16) + bytes(16)
    with trio.fail_after(10):
        async with endpoints(ticket_ttl=0.3) as (_dialer, responder):
            # a valid ticket + HELLO is answered once; the exact replay gets nothing
            async with manual_handshake(responder) as (ticket, hello, ip, port):
                assert len(await _present(ip, port, ticket, hello)) == HEADER_LEN + 16
                assert await _present(ip, port, ticket, hello) == b""
            # a ticket burnt by a wrong HELLO is gone too
            async with manual_handshake(responder) as (ticket, hello, ip, port):
                assert await _present(ip, port, ticket, junk_hello) == b""
                assert await _present(ip, port, ticket, hello) == b""
            # an unused ticket expires
            async with manual_handshake(responder) as (ticket, hello, ip, port):
                await trio.sleep(0.4)
                assert await _present(ip, port, ticket, hello) == b""
            assert not responder._pending


@asynccontextmanager
async def relayed_pair(
    mutate: Callable[[bytearray], bytearray],
) -> AsyncIterator[tuple[BulkStream, BulkStream]]:
    """A sender and a receiver whose wire bytes (sender -> receiver) pass through `mutate`.

    The sender's whole output (until it closes) is collected, mutated, then
    delivered; the receiver's socket is closed after delivery.
    """
    k1, k2 = os.urandom(32), os.urandom(32)
    s_send, s_wire = trio.socket.socketpair()
    r_wire, r_recv = trio.socket.socketpair()
    sender = BulkStream(trio.SocketStream(s_send), PEER_B, PROTO, k1, k2)
    receiver = BulkStream(trio.SocketStream(r_recv), PEER_A, PROTO, k2, k1)
    wire_in, wire_out = trio.SocketStream(s_wire), trio.SocketStream(r_wire)

    async def relay() -> None:
        captured = bytearray()
        while chunk := await wire_in.receive_some(1 << 20):
            captured += chunk
        await wire_out.send_all(bytes(mutate(captured)))
        await wire_out.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay)
        yield sender, receiver
        nursery.cancel_scope.cancel()  # a receiver that failed early stops draining
    await wire_in.aclose()
    for stream in (sender, receiver):
        await stream.aclose()


def _frames(wire: bytearray) -> list[tuple[int, int]]:
    """(offset, total length) of each frame in captured wire bytes."""
    out, at = [], 0
    while at < len(wire):
        _, n = HEADER.unpack_from(wire, at)
        out.append((at, HEADER_LEN + n))
        at += HEADER_LEN + n
    return out


async def _send_and_close(sender: BulkStream, data: bytes) -> None:
    await sender.write(data)
    await sender.close()


async def test_tampered_frame_is_detected() -> None:
    def flip(wire: bytearray) -> bytearray:
        at, length = _frames(wire)[1]
        wire[at + length // 2] ^= 0x01
        return wire

    with trio.fail_after(10):
        async with relayed_pair(flip) as (sender, receiver):
            await _send_and_close(sender, os.urandom(2 * MAX_FRAME))
            assert len(await receiver.read(MAX_FRAME)) == MAX_FRAME  # frame 0 is intact
            with pytest.raises(BulkIntegrityError, match="authentication"):
                await receiver.read()
            with pytest.raises(BulkIntegrityError):  # the stream stays failed
                await receiver.read()


async def test_reordered_frames_are_detected() -> None:
    def swap(wire: bytearray) -> bytearray:
        (a0, al), (b0, bl) = _frames(wire)[:2]
        return wire[b0 : b0 + bl] + wire[a0 : a0 + al] + wire[b0 + bl :]

    with trio.fail_after(10):
        async with relayed_pair(swap) as (sender, receiver):
            await _send_and_close(sender, os.urandom(2 * MAX_FRAME))
            with pytest.raises(BulkIntegrityError):
                await receiver.read()


async def test_changed_frame_type_is_detected() -> None:
    def data_to_close(wire: bytearray) -> bytearray:
        wire[0] = 1  # T_CLOSE: a forged early end of stream
        return wire

    with trio.fail_after(10):
        async with relayed_pair(data_to_close) as (sender, receiver):
            await _send_and_close(sender, b"x" * 1000)
            with pytest.raises(BulkIntegrityError):
                await receiver.read()


@pytest.mark.parametrize("cut", ["close_frame", "mid_frame"])
async def test_truncation_is_detected(cut: str) -> None:
    def truncate(wire: bytearray) -> bytearray:
        frames = _frames(wire)
        if cut == "close_frame":
            return wire[: frames[-1][0]]  # drop the CLOSE frame only
        return wire[: frames[-2][0] + 100]

    data = os.urandom(MAX_FRAME + 5000)
    with trio.fail_after(10):
        async with relayed_pair(truncate) as (sender, receiver):
            await _send_and_close(sender, data)
            got = bytearray()
            with pytest.raises(BulkTruncatedError, match=r"trunc|ended"):
                while True:
                    chunk = await receiver.read(1 << 20)
                    assert chunk, "truncation must not look like a clean EOF"
                    got += chunk
            assert bytes(got) == data[: len(got)]


async def test_reset_reaches_the_remote() -> None:
    with trio.fail_after(10):
        async with endpoints() as (dialer, responder):
            a, b = await bulk_pair(dialer, responder)
            await a.write(b"partial")
            await a.reset()
            assert await b.read() == b"partial"
            with pytest.raises(BulkStreamReset):
                await b.read()
            with pytest.raises(BulkError):
                await a.write(b"more")


async def test_stopping_the_endpoint_closes_its_streams() -> None:
    with trio.fail_after(10):
        async with endpoints() as (dialer, responder):
            a, _b = await bulk_pair(dialer, responder)
        # `responder.serve` has been cancelled: its accepted stream is gone
        assert not responder._streams
        with pytest.raises(BulkError):
            await a.read()
        await a.aclose()
        assert not dialer._streams


async def test_libp2p_network_bulk_streams() -> None:
    """`Libp2pNetwork.open_bulk_stream`: handshake over Noise, data over the bulk channel."""
    from ravenp2p.identity import NodeIdentity
    from ravenp2p.network.base import ProtocolNotSupported
    from ravenp2p.network.libp2p import Libp2pNetwork

    data = os.urandom(5 * MAX_FRAME + 17)
    digest: dict[str, bytes] = {}
    with trio.fail_after(30):
        id_a, id_b = NodeIdentity.generate(), NodeIdentity.generate()
        async with Libp2pNetwork(id_a) as net_a, Libp2pNetwork(id_b) as net_b:

            async def on_bulk(stream: Stream) -> None:
                assert isinstance(stream, BulkStream)
                assert stream.remote_peer == net_a.peer_id
                digest["got"] = hashlib.sha256(await read_all(stream)).digest()
                await stream.write(digest["got"])
                await stream.close()

            net_b.set_stream_handler(PROTO, on_bulk)
            await net_a.connect(net_b.listen_addrs[0])
            stream = await net_a.open_bulk_stream(net_b.peer_id, PROTO)
            assert isinstance(stream, BulkStream)
            assert stream.remote_peer == net_b.peer_id
            await stream.write(data)
            await stream.close()
            assert await read_all(stream) == hashlib.sha256(data).digest()
            await stream.aclose()
            with pytest.raises(ProtocolNotSupported):
                await net_a.open_bulk_stream(net_b.peer_id, "/not/served/1.0.0")
    assert digest["got"] == hashlib.sha256(data).digest()


async def test_accept_errors_do_not_stop_serving(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE/ENFILE from accept() (out of descriptors) pause the listener, never kill it."""
    real_accept = trio.SocketListener.accept
    failures = [errno.EMFILE, errno.ENFILE]

    async def flaky_accept(self: trio.SocketListener) -> trio.SocketStream:
        if failures:
            await trio.lowlevel.checkpoint()
            code = failures.pop(0)
            raise OSError(code, os.strerror(code))
        return await real_accept(self)

    monkeypatch.setattr(trio.SocketListener, "accept", flaky_accept)
    with trio.fail_after(10), caplog.at_level("DEBUG", logger="ravenp2p.network.bulk"):
        async with endpoints() as (dialer, responder):
            a, b = await bulk_pair(dialer, responder)
            await a.write(b"still serving")
            await a.close()
            assert await read_all(b) == b"still serving"
            assert not failures
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "accept failed" in warnings[0].getMessage()


async def _closed_by_peer(conn: trio.SocketStream, within: float) -> bool:
    """Whether the remote closes (or resets) `conn` within `within` seconds."""
    with trio.move_on_after(within):
        try:
            return await conn.receive_some(100) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def test_connections_without_ticket_are_capped_and_timed_out() -> None:
    with trio.fail_after(10):
        async with endpoints(max_unticketed=3, ticket_read_timeout=0.6) as (dialer, responder):
            assert responder.port is not None
            port = responder.port
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await trio.sleep(0.1)  # all three accepted, each holding a slot
            try:  # over the cap: closed at once (loopback may even report it to connect)
                extra = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                pass
            else:
                assert await _closed_by_peer(extra, within=0.5), "over the cap: closed at once"
                await extra.aclose()
            started = trio.current_time()
            for conn in idle:  # closed once the ticket timeout has passed
                assert await _closed_by_peer(conn, within=2.0)
                await conn.aclose()
            assert trio.current_time() - started > 0.3
            a, b = await bulk_pair(dialer, responder)  # the slots are free again
            await a.write(b"x")
            await a.close()
            assert await read_all(b) == b"x"


async def _ask_for_ticket(responder: BulkEndpoint, remote: str, nursery: trio.Nursery) -> int:
    """Send a bulk request from `remote` by hand; return the responder's status byte.

    The `accept` call runs in `nursery` (waiting for a ticket that never comes).
    """
    left, right = trio.testing.memory_stream_pair()
    a_end, b_end = PipeStream(left, PEER_B), PipeStream(right, remote)

    async def accept() -> None:
        with contextlib.suppress(BulkHandshakeError):
            await responder.accept(b_end)

    nursery.start_soon(accept)
    own = X25519PrivateKey.generate().public_key().public_bytes_raw()
    proto = PROTO.encode()
    await a_end.write(bytes([VERSION]) + own + len(proto).to_bytes(2, "big") + proto)
    return (await a_end.read(1))[0]


async def test_one_peer_holds_at_most_its_ticket_quota() -> None:
    with trio.fail_after(10):
        async with (
            endpoints(max_pending_per_peer=2) as (_dialer, responder),
            trio.open_nursery() as nursery,
        ):
            assert await _ask_for_ticket(responder, PEER_A, nursery) == 0
            assert await _ask_for_ticket(responder, PEER_A, nursery) == 0
            assert await _ask_for_ticket(responder, PEER_A, nursery) != 0  # refused
            assert await _ask_for_ticket(responder, "peer-C", nursery) == 0
            holders = sorted(p.remote_peer for p in responder._pending.values())
            assert holders == [PEER_A, PEER_A, "peer-C"]
            nursery.cancel_scope.cancel()


async def test_frame_buffers_are_allocated_on_first_use() -> None:
    with trio.fail_after(10):
        async with endpoints() as (dialer, responder):
            a, b = await bulk_pair(dialer, responder)
            for stream in (a, b):  # after the HELLO exchange: small buffers only
                assert len(stream._send_buf) + len(stream._ct) + len(stream._pt) < 1024
            data = os.urandom(MAX_FRAME + 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_and_close, a, data)
                assert await read_all(b) == data
            assert len(b._pt) == MAX_FRAME and len(a._send_buf) > MAX_FRAME
            assert len(a._pt) == 0  # a received only HELLO and nothing else yet


def test_header_layout() -> None:
    assert HEADER_LEN == 5 and struct.calcsize("!BI") == HEADER_LEN
