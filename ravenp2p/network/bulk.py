"""A dedicated encrypted channel for bulk transfers (weights, shards, gradients).

Why: py-libp2p moves data over Noise + yamux at ~150-190 MB/s on loopback while
raw TCP moves ~4.5 GB/s (see docs/bulk-transfer.md). The time goes into Python
per-frame work: 64 KiB yamux frames that each become two Noise messages, one
window update per frame, two socket reads per Noise message, several copies and
locks. This module keeps libp2p for what it is good at (finding the peer,
authenticating it, agreeing on keys) and moves the bytes over a separate TCP
connection in large AES-256-GCM frames.

How a bulk stream is set up::

    dialer (A)                                   responder (B, runs `serve`)
    open_stream(B, BULK_PROTOCOL)  -- Noise-secured libp2p stream -->
    REQUEST: version, A's X25519 ephemeral key, target protocol id
                                    <--  REPLY: ok, B's ephemeral key,
                                         16-byte one-time ticket, bulk ip+port
    TCP connect to ip:port
    ticket || HELLO frame (AEAD, nonce 0)  ------------------------------>
                                    B: ticket known, unused, unexpired?
                                       HELLO authenticates with the keys?
                                    <--  HELLO frame (AEAD, nonce 0)
    DATA frames both ways ... CLOSE frame per direction (half-close)

Keys: HKDF-SHA256 over the X25519 shared secret, salted with the ticket, with a
hash of the transcript (both peer ids, protocol id, both ephemeral keys) as
info; one 32-byte key per direction. Frames are ``type (1) | length (4, big
endian) | ciphertext+tag``; the 5-byte header is the AEAD's associated data and
the nonce is a per-direction frame counter, so reordering, replay, splicing,
length or type changes all fail authentication.

Security notes:

- Who authenticates what: the libp2p stream is Noise-secured, so A knows it
  talks to B's peer id and B knows A's; `remote_peer` of a bulk stream is that
  authenticated id. Only the two ends of that stream know the ephemeral keys'
  pairing and the ticket, so only they can derive the frame keys; the TCP
  connection is bound to the handshake by the ticket *and* by the HELLO frame
  that only holders of the derived key can produce (key confirmation both ways).
- Tickets are random 128-bit values, single use (removed on first presentation,
  right or wrong HELLO), expire after `ticket_ttl` seconds, and at most
  `max_pending` are outstanding, at most `max_pending_per_peer` of them for one
  peer. A stolen ticket without the keys only lets an attacker burn it (denial
  of service), never read or inject data.
- The TCP port is open to anyone, so connections that have not presented a
  ticket yet are capped (`max_unticketed`; excess ones are closed at once) and
  must send their ticket within `ticket_read_timeout` seconds. Accept errors
  (EMFILE, ENFILE, ...) are logged and retried after a short pause: they never
  stop `serve`. A stream's 1 MiB frame buffers are allocated on first use.
- Truncation: each direction ends with an authenticated CLOSE frame. A TCP EOF
  without it raises `BulkTruncatedError`; a bad tag raises `BulkIntegrityError`.
  Both are never silently turned into b"".
- Forward secrecy: ephemeral X25519 per stream; nothing long-lived is used.
- Limits: frames carry at most `MAX_FRAME` plaintext bytes; a header announcing
  more is a protocol error. Counters stop a stream at 2**48 frames (far below
  AES-GCM's limits).

API (for the network adapter)::

    endpoint = BulkEndpoint(local_peer_id, host_ip="127.0.0.1")
    await nursery.start(endpoint.serve)               # TCP listener, until cancelled
    # responder: in the stream handler registered for BULK_PROTOCOL
    protocol, stream = await endpoint.accept(hs_stream, supported=lambda p: ...)
    # dialer
    stream = await endpoint.open(hs_stream, protocol)  # hs_stream: open_stream(BULK_PROTOCOL)

`hs_stream` is any `base.Stream` (the adapter's wrapper of a libp2p stream).
Both calls close it before returning. The returned `BulkStream` implements
`base.Stream`; `aclose()` releases its socket at once (the adapter should call
it after a handler returns). Leaving `serve` closes every bulk stream the
endpoint still owns, dialed or accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import socket as stdlib_socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ravenp2p.network.base import NetworkError, ProtocolNotSupported, Stream
from ravenp2p.network.framing import FrameError, read_exactly

BULK_PROTOCOL = "/ravenp2p/bulk/1.0.0"
VERSION = 1
MAX_FRAME = 1 << 20  # plaintext bytes per DATA frame
TAG_LEN = 16
HEADER = struct.Struct("!BI")  # frame type, ciphertext length
HEADER_LEN = HEADER.size
TICKET_LEN = 16
KEY_LEN = 32
MAX_PROTOCOL_LEN = 512
MAX_FRAMES = 1 << 48
ACCEPT_BACKOFF_MIN = 0.1  # seconds to pause after a failed accept (as trio.serve_listeners)
ACCEPT_BACKOFF_MAX = 1.0  # ... doubling while accept keeps failing

T_DATA = 0
T_CLOSE = 1
T_RESET = 2
T_HELLO = 3

_ST_OK = 0
_ST_UNSUPPORTED = 1
_ST_REFUSED = 2

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw

logger = logging.getLogger("ravenp2p.network.bulk")


class BulkError(NetworkError):
    """A bulk channel could not be set up or failed while in use."""


class BulkHandshakeError(BulkError):
    """The handshake failed: bad reply, ticket refused, key confirmation failed, timeout."""


class BulkIntegrityError(BulkError):
    """A frame failed authentication (tampered, reordered or forged) or was malformed."""


class BulkTruncatedError(BulkIntegrityError):
    """The connection ended without the sender's authenticated CLOSE frame."""


class BulkStreamReset(BulkError):
    """The stream was reset (by the remote, or locally)."""


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def derive_keys(
    shared: bytes,
    ticket: bytes,
    dialer_peer: str,
    responder_peer: str,
    protocol: str,
    dialer_eph: bytes,
    responder_eph: bytes,
) -> tuple[bytes, bytes]:
    """Per-direction keys (dialer->responder, responder->dialer) for one bulk stream."""
    transcript = hashlib.sha256(
        b"ravenp2p/bulk/1"
        + _lp(dialer_peer.encode())
        + _lp(responder_peer.encode())
        + _lp(protocol.encode())
        + dialer_eph
        + responder_eph
    ).digest()
    okm = HKDF(algorithm=SHA256(), length=2 * KEY_LEN, salt=ticket, info=transcript).derive(shared)
    return okm[:KEY_LEN], okm[KEY_LEN:]


async def _read_exactly(stream: Stream, n: int) -> bytes:
    """Read exactly `n` bytes from a `base.Stream`, or raise `BulkHandshakeError`."""
    try:
        return await read_exactly(stream, n)
    except FrameError as exc:
        raise BulkHandshakeError(f"handshake {exc}") from None


async def _close_quietly(stream: Stream) -> None:
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        with contextlib.suppress(Exception):  # the handshake stream is done with either way
            await stream.close()


class BulkStream:
    """One end of an encrypted bulk channel; implements `base.Stream`.

    Reads are cancel-safe (partial frame progress is kept); a cancelled write
    leaves the stream unusable for writing (the peer would see a broken frame).
    """

    def __init__(
        self,
        sock: trio.SocketStream,
        remote_peer: str,
        protocol: str,
        send_key: bytes,
        recv_key: bytes,
        owner: BulkEndpoint | None = None,
    ) -> None:
        self._sock = sock
        self._raw = sock.socket
        self._remote_peer = remote_peer
        self.protocol = protocol
        self._send_aead = AESGCM(send_key)
        self._recv_aead = AESGCM(recv_key)
        self._send_ctr = 0
        self._recv_ctr = 0
        self._owner = owner
        self._write_lock = trio.Lock()
        self._read_lock = trio.Lock()
        # Frame buffers start small (HELLO/CLOSE frames carry no payload) and are
        # replaced by full-size ones the first time a DATA frame needs them.
        self._send_buf = bytearray(HEADER_LEN + TAG_LEN)
        self._send_view = memoryview(self._send_buf)
        # receive state: header, then ciphertext, then decrypted plaintext
        self._hdr = bytearray(HEADER_LEN)
        self._hdr_have = 0
        self._ct = bytearray(TAG_LEN)
        self._ct_view = memoryview(self._ct)
        self._ct_need = -1  # -1: reading the header
        self._ct_have = 0
        self._pt = bytearray(0)
        self._pt_view = memoryview(self._pt)
        self._pt_pos = 0
        self._pt_end = 0
        self._write_closed = False
        self._read_eof = False
        self._broken: BulkError | None = None
        self._write_broken = False
        self._closed = False

    # --- identity ------------------------------------------------------------
    @property
    def remote_peer(self) -> str:
        """The peer id authenticated by the libp2p handshake stream."""
        return self._remote_peer

    # --- frames ----------------------------------------------------------------
    async def _send_frame(self, ftype: int, payload: memoryview | bytes) -> None:
        if self._send_ctr >= MAX_FRAMES:
            raise BulkError("frame counter exhausted; open a new bulk stream")
        n = len(payload)
        total = HEADER_LEN + n + TAG_LEN
        if total > len(self._send_buf):  # grown to the largest frame sent so far
            self._send_buf = bytearray(total)
            self._send_view = memoryview(self._send_buf)
        HEADER.pack_into(self._send_buf, 0, ftype, n + TAG_LEN)
        header = bytes(self._send_view[:HEADER_LEN])
        self._send_aead.encrypt_into(
            _nonce(self._send_ctr), payload, header, self._send_view[HEADER_LEN:total]
        )
        self._send_ctr += 1
        self._write_broken = True  # until send_all completes: a cancel leaves half a frame
        try:
            await self._sock.send_all(self._send_view[:total])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BulkStreamReset(f"bulk connection broke while writing: {exc}") from exc
        self._write_broken = False

    async def _recv_into(self, view: memoryview) -> int:
        try:
            return await self._raw.recv_into(view)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise BulkStreamReset(f"bulk connection reset by peer: {exc}") from exc
        except trio.ClosedResourceError as exc:
            raise BulkStreamReset("bulk stream was closed locally") from exc
        except OSError as exc:
            if self._closed:
                raise BulkStreamReset("bulk stream was closed locally") from exc
            raise

    async def _next_frame(self) -> tuple[int, int]:
        """Receive and authenticate one frame into the plaintext buffer: (type, length)."""
        while self._ct_need < 0:
            got = await self._recv_into(memoryview(self._hdr)[self._hdr_have :])
            if got == 0:
                if self._hdr_have == 0:
                    raise BulkTruncatedError(
                        "bulk connection ended without the sender's CLOSE frame (truncated)"
                    )
                raise BulkTruncatedError("bulk connection ended inside a frame header")
            self._hdr_have += got
            if self._hdr_have == HEADER_LEN:
                ftype, ct_len = HEADER.unpack(self._hdr)
                if ct_len < TAG_LEN or ct_len > MAX_FRAME + TAG_LEN or ftype > T_HELLO:
                    raise BulkIntegrityError(
                        f"malformed bulk frame header (type {ftype}, length {ct_len})"
                    )
                if ct_len > len(self._ct):  # grown to the largest frame received so far
                    self._ct = bytearray(ct_len)
                    self._ct_view = memoryview(self._ct)
                self._ct_need = ct_len
                self._ct_have = 0
        need = self._ct_need
        while self._ct_have < need:
            got = await self._recv_into(self._ct_view[self._ct_have : need])
            if got == 0:
                raise BulkTruncatedError("bulk connection ended inside a frame")
            self._ct_have += got
        header = bytes(self._hdr)
        ftype = self._hdr[0]
        n = need - TAG_LEN
        self._hdr_have = 0
        self._ct_need = -1
        if n > len(self._pt):  # only when all earlier plaintext has been consumed
            self._pt = bytearray(n)
            self._pt_view = memoryview(self._pt)
        try:
            self._recv_aead.decrypt_into(
                _nonce(self._recv_ctr), self._ct_view[:need], header, self._pt_view[:n]
            )
        except InvalidTag as exc:
            raise BulkIntegrityError(
                f"bulk frame {self._recv_ctr} failed authentication (tampered or forged)"
            ) from exc
        self._recv_ctr += 1
        return ftype, n

    def _fail(self, exc: BulkError) -> BulkError:
        self._broken = exc
        return exc

    async def _fill(self) -> bool:
        """Make plaintext available; False at the remote's clean CLOSE."""
        while self._pt_pos == self._pt_end:
            if self._read_eof:
                return False
            if self._broken is not None:
                raise self._broken
            try:
                ftype, n = await self._next_frame()
            except BulkError as exc:
                raise self._fail(exc) from None
            if ftype == T_DATA:
                self._pt_pos, self._pt_end = 0, n
            elif ftype == T_CLOSE:
                self._read_eof = True
                self._maybe_release()
                return False
            elif ftype == T_RESET:
                exc2 = self._fail(BulkStreamReset("bulk stream was reset by the remote"))
                self._release(abort=False)
                raise exc2
            else:
                raise self._fail(BulkIntegrityError("unexpected HELLO frame after setup"))
        return True

    # --- base.Stream ------------------------------------------------------------
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to `max_bytes` of plaintext; b"" once the remote has closed cleanly."""
        if max_bytes <= 0:
            return b""
        async with self._read_lock:
            if not await self._fill():
                return b""
            end = min(self._pt_end, self._pt_pos + max_bytes)
            data = bytes(self._pt_view[self._pt_pos : end])
            self._pt_pos = end
            return data

    async def read_into(self, buffer: bytearray | memoryview) -> int:
        """Like `read`, but into `buffer` (one copy less); 0 means clean EOF."""
        view = memoryview(buffer)
        if len(view) == 0:
            return 0
        async with self._read_lock:
            if not await self._fill():
                return 0
            end = min(self._pt_end, self._pt_pos + len(view))
            n = end - self._pt_pos
            view[:n] = self._pt_view[self._pt_pos : end]
            self._pt_pos = end
            return n

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of `data` in frames of up to `MAX_FRAME` bytes."""
        view = memoryview(data).cast("B")
        async with self._write_lock:
            self._check_writable()
            for start in range(0, len(view), MAX_FRAME):
                await self._send_frame(T_DATA, view[start : start + MAX_FRAME])

    def _check_writable(self) -> None:
        if self._broken is not None and isinstance(self._broken, BulkStreamReset):
            raise self._broken
        if self._write_closed:
            raise BulkError("bulk stream is closed for writing")
        if self._write_broken:
            raise BulkError("an earlier write was interrupted; the stream cannot be written")
        if self._closed:
            raise BulkStreamReset("bulk stream was closed")

    async def close(self) -> None:
        """Half-close: send the authenticated CLOSE frame; reading may continue."""
        if self._write_closed or self._closed:
            return
        async with self._write_lock:
            if self._write_closed or self._write_broken or self._closed:
                return
            self._write_closed = True
            try:
                await self._send_frame(T_CLOSE, b"")
                self._raw.shutdown(stdlib_socket.SHUT_WR)
            except (BulkError, OSError):
                pass  # the remote is gone; its reads will report the truncation
        self._maybe_release()

    async def reset(self) -> None:
        """Abort both directions: tell the remote (best effort) and drop the connection."""
        if self._closed:
            return
        self._broken = BulkStreamReset("bulk stream was reset locally")
        if not self._write_closed and not self._write_broken and not self._write_lock.locked():
            with trio.move_on_after(0.5):
                try:
                    async with self._write_lock:
                        await self._send_frame(T_RESET, b"")
                except (BulkError, OSError):
                    pass
        self._release(abort=True)

    async def aclose(self) -> None:
        """Release the connection now (after `close`, or instead of it); idempotent."""
        if self._closed:
            return
        if not self._write_closed and not self._write_broken and not self._write_lock.locked():
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                await self.close()
        self._release(abort=False)
        await trio.lowlevel.checkpoint()

    def _maybe_release(self) -> None:
        if self._write_closed and self._read_eof:
            self._release(abort=False)

    def _release(self, abort: bool) -> None:
        """Close the socket now (with an RST when `abort`); synchronous, safe under cancel."""
        if self._closed:
            return
        self._closed = True
        if abort:
            with contextlib.suppress(OSError):
                self._raw.setsockopt(
                    stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        if self._owner is not None:
            self._owner._streams.discard(self)
        self._raw.close()


@dataclass
class _Pending:
    """A ticket handed out and the state needed to complete its stream."""

    remote_peer: str
    protocol: str
    send_key: bytes  # responder -> dialer
    recv_key: bytes  # dialer -> responder
    expires: float
    ready: trio.MemorySendChannel[BulkStream]


class BulkEndpoint:
    """Serves and dials bulk channels for one node. See the module docstring."""

    def __init__(
        self,
        local_peer_id: str,
        host_ip: str = "127.0.0.1",
        *,
        advertise_ip: str | None = None,
        handshake_timeout: float = 10.0,
        ticket_ttl: float = 10.0,
        max_pending: int = 256,
        max_pending_per_peer: int = 16,
        max_unticketed: int = 64,
        ticket_read_timeout: float = 2.0,
    ) -> None:
        if min(max_pending, max_pending_per_peer, max_unticketed) < 1:
            raise ValueError("max_pending, max_pending_per_peer and max_unticketed must be >= 1")
        self.local_peer_id = local_peer_id
        self.host_ip = host_ip
        self.advertise_ip = advertise_ip or host_ip
        self.handshake_timeout = handshake_timeout
        self.ticket_ttl = ticket_ttl
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self.max_unticketed = max_unticketed
        self.ticket_read_timeout = ticket_read_timeout
        self.port: int | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._streams: set[BulkStream] = set()
        # Connections accepted that have not presented a ticket yet.
        self._unticketed = trio.Semaphore(max_unticketed)

    # --- responder -----------------------------------------------------------
    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for bulk TCP connections until cancelled; `task_status` gets the port."""
        listeners = await trio.open_tcp_listeners(0, host=self.host_ip)
        listener = listeners[0]
        self.port = listener.socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started(self.port)
                await trio.sleep_forever()
        finally:
            self.port = None
            for stream in list(self._streams):
                stream._release(abort=True)
            for pending in self._pending.values():
                pending.ready.close()
            self._pending.clear()
            await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept until cancelled; accept errors (EMFILE, ENFILE, ...) pause, never stop it."""
        backoff = ACCEPT_BACKOFF_MIN
        failing = False
        while True:
            try:
                conn = await listener.accept()
            except OSError as exc:
                # Out of file descriptors or kernel memory: what trio.serve_listeners
                # does (log, sleep, retry), with a capped doubling pause.
                log = logger.debug if failing else logger.warning
                log("bulk listener: accept failed (%s); retrying in %.1f s", exc, backoff)
                failing = True
                await trio.sleep(backoff)
                backoff = min(2 * backoff, ACCEPT_BACKOFF_MAX)
                continue
            if failing:
                logger.info("bulk listener: accepting again")
            failing, backoff = False, ACCEPT_BACKOFF_MIN
            try:
                self._unticketed.acquire_nowait()
            except trio.WouldBlock:
                await _abort(conn)  # too many connections still owe their ticket
                continue
            nursery.start_soon(self._on_tcp, conn)

    async def _read_ticket(self, conn: trio.SocketStream) -> bytes | None:
        """The ticket a new connection presents, or None when it is too slow or closes.

        Holds one of the `max_unticketed` slots (taken by `_accept_loop`) until it returns.
        """
        try:
            with trio.move_on_after(self.ticket_read_timeout):
                return await _receive_exactly(conn, TICKET_LEN)
            return None
        finally:
            self._unticketed.release()

    async def _on_tcp(self, conn: trio.SocketStream) -> None:
        """Check a connection's ticket and HELLO, then hand it to the waiting `accept`."""
        handed_off = False
        try:
            ticket = await self._read_ticket(conn)
            if ticket is None:
                return
            with trio.move_on_after(self.handshake_timeout):
                pending = self._pending.pop(ticket, None)  # single use, right or wrong
                if pending is None or pending.expires < trio.current_time():
                    return
                stream = BulkStream(
                    conn,
                    pending.remote_peer,
                    pending.protocol,
                    pending.send_key,
                    pending.recv_key,
                    owner=self,
                )
                try:
                    ftype, n = await stream._next_frame()
                    if ftype != T_HELLO or n != 0:
                        raise BulkIntegrityError("first frame is not a HELLO")
                    await stream._send_frame(T_HELLO, b"")
                except BaseException:
                    pending.ready.close()  # wake `accept` at once: this ticket is spent
                    raise
                self._streams.add(stream)
                try:
                    pending.ready.send_nowait(stream)
                    handed_off = True
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    self._streams.discard(stream)
        except (BulkError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            if not handed_off:
                await _abort(conn)

    async def accept(
        self,
        hs_stream: Stream,
        supported: Callable[[str], bool] = lambda _protocol: True,
    ) -> tuple[str, BulkStream]:
        """Responder side: run the handshake on `hs_stream`, wait for the bulk connection.

        Returns (target protocol id, stream). Raises `BulkHandshakeError` on any
        failure (after telling the dialer when possible).
        """
        if self.port is None:
            raise BulkHandshakeError("bulk endpoint is not serving")
        try:
            with trio.fail_after(self.handshake_timeout):
                return await self._accept(hs_stream, supported)
        except trio.TooSlowError as exc:
            raise BulkHandshakeError("bulk handshake timed out") from exc
        finally:
            await _close_quietly(hs_stream)

    async def _accept(
        self, hs_stream: Stream, supported: Callable[[str], bool]
    ) -> tuple[str, BulkStream]:
        head = await _read_exactly(hs_stream, 1 + KEY_LEN + 2)
        version, dialer_eph, plen = head[0], head[1 : 1 + KEY_LEN], int.from_bytes(head[-2:])
        if version != VERSION or plen == 0 or plen > MAX_PROTOCOL_LEN:
            await _send_refusal(hs_stream, _ST_REFUSED, "unsupported bulk version or protocol")
            raise BulkHandshakeError(f"bad bulk request (version {version}, length {plen})")
        try:
            protocol = (await _read_exactly(hs_stream, plen)).decode()
        except UnicodeDecodeError as exc:
            raise BulkHandshakeError("protocol id is not UTF-8") from exc
        if not supported(protocol):
            await _send_refusal(hs_stream, _ST_UNSUPPORTED, f"no handler for {protocol}")
            raise BulkHandshakeError(f"dialer asked for unsupported protocol {protocol!r}")
        self._expire_tickets()
        if len(self._pending) >= self.max_pending:
            await _send_refusal(hs_stream, _ST_REFUSED, "too many pending bulk handshakes")
            raise BulkHandshakeError("too many pending bulk handshakes")
        peer = hs_stream.remote_peer
        quota = self.max_pending_per_peer
        if sum(p.remote_peer == peer for p in self._pending.values()) >= quota:
            reason = f"too many pending bulk handshakes from this peer (max {quota})"
            await _send_refusal(hs_stream, _ST_REFUSED, reason)
            raise BulkHandshakeError(f"{peer}: {reason}")
        private = X25519PrivateKey.generate()
        own_eph = private.public_key().public_bytes(_RAW, _RAW_PUB)
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(dialer_eph))
        except ValueError as exc:
            raise BulkHandshakeError("invalid ephemeral key from dialer") from exc
        ticket = os.urandom(TICKET_LEN)
        d2r, r2d = derive_keys(
            shared,
            ticket,
            hs_stream.remote_peer,
            self.local_peer_id,
            protocol,
            dialer_eph,
            own_eph,
        )
        send, receive = trio.open_memory_channel[BulkStream](1)
        self._pending[ticket] = _Pending(
            hs_stream.remote_peer,
            protocol,
            r2d,
            d2r,
            trio.current_time() + self.ticket_ttl,
            send,
        )
        try:
            ip = self.advertise_ip.encode()
            assert self.port is not None
            await hs_stream.write(
                bytes([_ST_OK])
                + own_eph
                + ticket
                + bytes([len(ip)])
                + ip
                + self.port.to_bytes(2, "big")
            )
            with trio.move_on_after(self.ticket_ttl):
                try:
                    stream = await receive.receive()
                except trio.EndOfChannel as exc:
                    raise BulkHandshakeError("bulk endpoint stopped") from exc
                return protocol, stream
            raise BulkHandshakeError("dialer did not present its ticket in time")
        finally:
            self._pending.pop(ticket, None)
            send.close()

    def _expire_tickets(self) -> None:
        now = trio.current_time()
        for ticket in [t for t, p in self._pending.items() if p.expires < now]:
            self._pending.pop(ticket).ready.close()

    # --- dialer ----------------------------------------------------------------
    async def open(
        self, hs_stream: Stream, protocol: str, remote_ip: str | None = None
    ) -> BulkStream:
        """Dialer side: handshake on `hs_stream` (open on `BULK_PROTOCOL`), connect, confirm.

        `remote_ip` overrides the address the responder advertises (use the IP
        the libp2p connection went to when the responder listens on 0.0.0.0).
        Raises `ProtocolNotSupported` or `BulkHandshakeError`.
        """
        try:
            with trio.fail_after(self.handshake_timeout):
                return await self._open(hs_stream, protocol, remote_ip)
        except trio.TooSlowError as exc:
            raise BulkHandshakeError("bulk handshake timed out") from exc
        finally:
            await _close_quietly(hs_stream)

    async def _open(self, hs_stream: Stream, protocol: str, remote_ip: str | None) -> BulkStream:
        proto = protocol.encode()
        if not proto or len(proto) > MAX_PROTOCOL_LEN:
            raise ValueError(f"protocol id must be 1..{MAX_PROTOCOL_LEN} bytes")
        private = X25519PrivateKey.generate()
        own_eph = private.public_key().public_bytes(_RAW, _RAW_PUB)
        await hs_stream.write(bytes([VERSION]) + own_eph + _lp(proto))
        status = (await _read_exactly(hs_stream, 1))[0]
        if status != _ST_OK:
            length = int.from_bytes(await _read_exactly(hs_stream, 2))
            reason = (await _read_exactly(hs_stream, length)).decode(errors="replace")
            if status == _ST_UNSUPPORTED:
                raise ProtocolNotSupported(f"{hs_stream.remote_peer}: {reason}")
            raise BulkHandshakeError(f"bulk handshake refused: {reason}")
        body = await _read_exactly(hs_stream, KEY_LEN + TICKET_LEN + 1)
        responder_eph, ticket = body[:KEY_LEN], body[KEY_LEN : KEY_LEN + TICKET_LEN]
        ip = (await _read_exactly(hs_stream, body[-1])).decode(errors="replace")
        port = int.from_bytes(await _read_exactly(hs_stream, 2))
        try:
            ipaddress.ip_address(ip)
            shared = private.exchange(X25519PublicKey.from_public_bytes(responder_eph))
        except ValueError as exc:
            raise BulkHandshakeError(f"malformed bulk handshake reply: {exc}") from exc
        d2r, r2d = derive_keys(
            shared,
            ticket,
            self.local_peer_id,
            hs_stream.remote_peer,
            protocol,
            own_eph,
            responder_eph,
        )
        try:
            conn = await trio.open_tcp_stream(remote_ip or ip, port)
        except OSError as exc:
            raise BulkHandshakeError(f"cannot reach bulk port {ip}:{port}: {exc}") from exc
        stream = BulkStream(conn, hs_stream.remote_peer, protocol, d2r, r2d, owner=self)
        ok = False
        try:
            await conn.send_all(ticket)
            await stream._send_frame(T_HELLO, b"")
            ftype, n = await stream._next_frame()
            if ftype != T_HELLO or n != 0:
                raise BulkHandshakeError("responder did not confirm the bulk channel")
            ok = True
        except (BulkTruncatedError, BulkStreamReset) as exc:
            raise BulkHandshakeError(
                "responder refused the bulk connection (ticket rejected or expired)"
            ) from exc
        except BulkIntegrityError as exc:
            raise BulkHandshakeError(f"bulk key confirmation failed: {exc}") from exc
        finally:
            if not ok:
                stream._release(abort=True)
        self._streams.add(stream)
        return stream


async def _receive_exactly(conn: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await conn.receive_some(n - len(buf))
        if not chunk:
            raise BulkTruncatedError("connection closed during bulk ticket")
        buf += chunk
    return bytes(buf)


async def _send_refusal(hs_stream: Stream, status: int, reason: str) -> None:
    text = reason.encode()[:1024]
    with contextlib.suppress(Exception):  # the dialer may be gone; best effort
        await hs_stream.write(bytes([status]) + len(text).to_bytes(2, "big") + text)


async def _abort(conn: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        conn.socket.setsockopt(
            stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    await conn.aclose()
