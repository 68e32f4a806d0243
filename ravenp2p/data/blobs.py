"""The blob protocol: fetch content-addressed blobs from peers, chunk by chunk, verified.

A blob (weights, a dataset shard, a gradient) is named by the sha256 of its
bytes. Any peer holding it may serve it; a fetcher trusts no provider: every
chunk is checked as it arrives, the whole blob is checked against its name
before it is stored, and a transfer that breaks or turns out bad continues
with another provider from the last verified chunk. docs/data-repository.md
is the wire specification; in short, on a bulk stream for `BLOB_PROTOCOL`:

    request  = u32 length (big endian) + msgpack {"digest", "offset"[, "chunk_size"]}
    response = u32 length + msgpack {"status", "size", "chunk_size", "chunks"}
               then the blob's bytes from `offset` to its end

Lifecycle: `BlobService.attach()` makes the node serve its store (the network
runs the handlers). Fetching needs the service running, because a fetch may
start work that outlives the call (the shared transfer, the announcement of a
fetched blob)::

    async with service.running():      # attaches, owns the background tasks
        data = await service.fetch(digest, providers=[peer])

Leaving `running()` cancels in-flight transfers and announcements.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import struct
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgpack
import trio

from ravenp2p.blocking import run_blocking
from ravenp2p.data.store import BlobStore, StoreFullError, check_digest, chunk_digests
from ravenp2p.network.base import Network, NetworkError, PeerInfo, PeerUnreachable, Stream
from ravenp2p.training.tensors import digest_of

__all__ = [
    "BLOB_NAMESPACE",
    "BLOB_PROTOCOL",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "MAX_REQUEST_BYTES",
    "MIN_CHUNK_SIZE",
    "BlobError",
    "BlobIntegrityError",
    "BlobNotFound",
    "BlobService",
    "BlobStats",
    "provider_key",
]

BLOB_PROTOCOL = "/ravenp2p/blob/1.0.0"
BLOB_NAMESPACE = "ravenp2p-blob"

MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 16 << 20
MAX_CHUNKS = 1 << 16
"""Most chunks one blob may have at the requested chunk size (bounds the header)."""
MAX_REQUEST_BYTES = 1024
"""Largest request body a server reads; a real request is about 100 bytes."""

STATUS_OK = "ok"
STATUS_NOT_FOUND = "not_found"
STATUS_BUSY = "busy"

REQUEST_READ_TIMEOUT = 10.0
"""Seconds a server waits for a request once a stream is open."""
STALL_TIMEOUT = 15.0
"""Seconds a read or write may make no progress before the transfer counts as dropped."""
DRAIN_TIMEOUT = 2.0
"""Seconds a server waits for the client's end of stream after its response."""
OPEN_TIMEOUT = 10.0
"""Seconds to dial a provider and open a bulk stream to it."""
LOOKUP_TIMEOUT = 10.0
"""Seconds for the DHT provider lookup."""
BUSY_RETRIES = 2
"""Times a provider that answered "busy" is asked again (after a short pause)."""
BUSY_BACKOFF = 0.2
"""Seconds of pause before asking a busy provider again, times the number of refusals."""
LISTING_CACHE = 64
"""Chunk lists a server keeps (computing one reads the whole blob)."""
THREAD_THRESHOLD = 1 << 20
"""Blobs above this many bytes are hashed in a worker thread, not on the event loop."""

_LEN = struct.Struct(">I")
_HEADER_BASE = 128  # msgpack bytes of a header besides its chunk list
_HEADER_PER_CHUNK = 70  # bytes one hex digest takes in the chunk list (with its prefix)
_REQUEST_KEYS = frozenset({"digest", "offset", "chunk_size"})
_HEADER_KEYS = frozenset({"status", "size", "chunk_size", "chunks"})

logger = logging.getLogger("ravenp2p.data")


def provider_key(digest: str) -> str:
    """The DHT provider key of a blob: `/ravenp2p-blob/<digest>`.

    At 79 bytes it is longer than the 50 bytes py-libp2p's FIND_NODE accepts as
    a raw key; `Libp2pNetwork.provide`/`find_providers` look every key up by
    its sha2-256 multihash, so the key works on both network implementations.
    """
    return f"/{BLOB_NAMESPACE}/{check_digest(digest)}"


class BlobError(Exception):
    """A blob could not be fetched (the message says why, per provider where useful)."""


class BlobNotFound(BlobError):
    """No reachable provider has the blob."""


class BlobIntegrityError(BlobError):
    """The bytes offered for a blob do not match its digest or the trusted chunk list."""


@dataclass
class BlobStats:
    """Counters of one `BlobService`, for tests, metrics and the simulator.

    `served_bytes` / `fetched_bytes` count blob bytes (not headers) written to
    and received from peers, including bytes of a chunk later found bad or cut
    off. `fetches` counts completed network transfers (joined fetches and store
    hits are not counted). `resumes` counts requests sent with an offset > 0.
    `integrity_failures` counts providers caught serving bytes that do not
    match. `providers_failed` counts providers given up on during a fetch, for
    any reason (unreachable, not found, busy, broken, bad data).
    """

    served_bytes: int = 0
    fetched_bytes: int = 0
    fetches: int = 0
    resumes: int = 0
    integrity_failures: int = 0
    providers_failed: int = 0


class _Malformed(ValueError):
    """A request or header that breaks the protocol."""


class _Dropped(Exception):
    """The stream ended, was reset or stalled before the response was complete."""


class _Outcome(Enum):
    DONE = "done"
    NOT_FOUND = "not found"
    BUSY = "busy"
    DROPPED = "connection dropped"
    UNREACHABLE = "unreachable"
    PROTOCOL = "protocol error"
    INTEGRITY = "integrity failure"
    CONFLICT = "chunk list conflict"


# --- framing ------------------------------------------------------------------------------


def _frame(obj: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _unpack(body: bytes, max_array: int) -> Any:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=64,
            max_bin_len=0,
            max_array_len=max_array,
            max_map_len=len(_HEADER_KEYS),
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _Malformed(f"not a valid msgpack message: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_request(body: bytes, default_chunk_size: int) -> tuple[str, int, int]:
    """(digest, offset, chunk_size) from a request body; `_Malformed` names the problem."""
    message = _unpack(body, max_array=0)
    if not isinstance(message, dict):
        raise _Malformed(f"request must be a map, got {type(message).__name__}")
    unknown = set(message) - _REQUEST_KEYS
    if unknown:
        raise _Malformed(
            f"request has unknown keys {sorted(unknown)}; allowed {sorted(_REQUEST_KEYS)}"
        )
    if "digest" not in message or "offset" not in message:
        raise _Malformed("request must have 'digest' and 'offset'")
    try:
        digest = check_digest(message["digest"], "request digest")
    except ValueError as exc:
        raise _Malformed(str(exc)) from None
    offset = message["offset"]
    if not _is_int(offset) or offset < 0:
        raise _Malformed(f"request offset must be an int >= 0, got {offset!r}")
    chunk_size = message.get("chunk_size", default_chunk_size)
    if not _is_int(chunk_size) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise _Malformed(
            f"request chunk_size must be an int in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}, "
            f"got {chunk_size!r}"
        )
    return digest, offset, chunk_size


@dataclass(frozen=True)
class _Header:
    status: str
    size: int = 0
    chunk_size: int = 0
    chunks: tuple[str, ...] = ()


def _parse_header(body: bytes, max_blob_bytes: int, chunk_size: int) -> _Header:
    """A response header, checked for shape and self-consistency; `_Malformed` otherwise."""
    message = _unpack(body, max_array=MAX_CHUNKS)
    if not isinstance(message, dict):
        raise _Malformed(f"header must be a map, got {type(message).__name__}")
    status = message.get("status")
    if status in (STATUS_BUSY, STATUS_NOT_FOUND):
        return _Header(status)
    if status != STATUS_OK:
        raise _Malformed(f"header status must be ok, not_found or busy, got {status!r}")
    if set(message) != _HEADER_KEYS:
        raise _Malformed(f"an ok header has exactly the keys {sorted(_HEADER_KEYS)}")
    size, size_of_chunks, chunks = message["size"], message["chunk_size"], message["chunks"]
    if not _is_int(size) or not 0 <= size <= max_blob_bytes:
        raise _Malformed(f"header size must be an int in 0..{max_blob_bytes}, got {size!r}")
    if size_of_chunks != chunk_size:
        raise _Malformed(f"header chunk_size is {size_of_chunks!r}, {chunk_size} was requested")
    if not isinstance(chunks, list) or len(chunks) != math.ceil(size / chunk_size):
        raise _Malformed(
            f"header chunks must list ceil(size / chunk_size) digests for {size} bytes"
        )
    try:
        listed = tuple(check_digest(c, "header chunk digest") for c in chunks)
    except ValueError as exc:
        raise _Malformed(str(exc)) from None
    return _Header(STATUS_OK, size, chunk_size, listed)


class _Reader:
    """Exact reads from a stream, each bounded by `STALL_TIMEOUT`; failures raise `_Dropped`.

    Once `on_bytes` is set it is told the size of everything read from then on.
    """

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self.on_bytes: Callable[[int], None] | None = None

    async def exactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        have = 0
        while have < n:
            data = await self._read(n - have)
            if not data:
                raise _Dropped(f"stream ended with {n - have} of {n} bytes missing")
            parts.append(data)
            have += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def frame(self, limit: int) -> bytes:
        (length,) = _LEN.unpack(await self.exactly(_LEN.size))
        if length > limit:
            raise _Malformed(f"message of {length} bytes exceeds the limit of {limit}")
        return await self.exactly(length)

    async def at_eof(self) -> bool:
        """Whether the remote closes cleanly now (waits briefly)."""
        with trio.move_on_after(1.0):
            try:
                return await self._read(1) == b""
            except _Dropped:
                return False
        return False

    async def _read(self, n: int) -> bytes:
        with trio.move_on_after(STALL_TIMEOUT):
            try:
                data = await self._stream.read(min(n, MAX_CHUNK_SIZE))
            except (
                NetworkError,
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as exc:
                raise _Dropped(f"stream broke: {exc}") from None
            if self.on_bytes is not None and data:
                self.on_bytes(len(data))
            return data
        raise _Dropped(f"no data for {STALL_TIMEOUT:g} s")


async def _drain(stream: Stream) -> None:
    """Read the client's end of stream before the handler returns (bounded in time).

    A TCP socket closed with unread bytes (here: the client's close marker)
    makes the kernel send RST, which can destroy the tail of a response still
    in flight to the client.
    """
    with trio.move_on_after(DRAIN_TIMEOUT):
        try:
            while await stream.read(MAX_REQUEST_BYTES):
                pass  # a client sends nothing after its request
        except (NetworkError, OSError):
            pass


async def _reset_quietly(stream: Stream) -> None:
    with trio.move_on_after(1.0) as scope, contextlib.suppress(Exception):
        scope.shield = True  # runs in cleanup paths, possibly while being cancelled
        await stream.reset()


# --- fetch state ----------------------------------------------------------------------------


class _Progress:
    """The verified prefix of a blob being fetched, and what it is checked against."""

    def __init__(self, size: int | None, trusted: tuple[str, ...] | None) -> None:
        self.known_size = size  # from the caller: never reset
        self.trusted = trusted
        self.reset()

    def reset(self) -> None:
        """Forget every verified byte (the untrusted reference list proved false)."""
        self.size: int | None = self.known_size
        self.ref: tuple[str, ...] | None = self.trusted
        self.ref_from: set[str] = set()  # providers that served under an untrusted ref
        self.buf = bytearray()
        self.hasher = hashlib.sha256()
        self.verified = 0  # chunks

    def accept(self, piece: bytes) -> None:
        self.buf += piece
        self.hasher.update(piece)
        self.verified += 1


_TransferKey = tuple[str, int, tuple[str, ...] | None]  # digest, chunk size, trusted chunks


@dataclass(eq=False)
class _Transfer:
    """One fetch of one blob over the network, shared by every caller asking for it."""

    digest: str
    chunk_size: int
    trusted: tuple[str, ...] | None
    size: int | None
    scope: trio.CancelScope
    pending: deque[str] = field(default_factory=deque)
    seen: set[str] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)
    result: bytes | None = None
    error: tuple[type[Exception], str] | None = None
    waiters: int = 0
    announce: bool = True

    def offer(self, peers: Sequence[str], own_id: str) -> None:
        """Queue providers not seen before (in order)."""
        for peer in peers:
            if peer not in self.seen and peer != own_id:
                self.seen.add(peer)
                self.pending.append(peer)


# --- the service ------------------------------------------------------------------------------


class BlobService:
    """Serves this node's store to peers and fetches blobs from them: chunked, verified, resumable.

    `chunk_size` is what this node asks providers for unless a fetch names
    its own (a trusted chunk list must use the same), and what it serves when
    a request names none.
    `max_blob_bytes` bounds what a fetch accepts. With `announce`, a fetched
    blob is announced on the DHT so the fetcher becomes a provider too.
    Beyond `max_concurrent_serves` transfers at once, requests get "busy".
    """

    def __init__(
        self,
        network: Network,
        store: BlobStore,
        *,
        chunk_size: int = 1 << 20,
        max_blob_bytes: int = 512 << 20,
        announce: bool = True,
        max_concurrent_serves: int = 16,
    ) -> None:
        if not _is_int(chunk_size) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(
                f"chunk_size must be an int in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}, "
                f"got {chunk_size!r}"
            )
        if not _is_int(max_blob_bytes) or max_blob_bytes < 0:
            raise ValueError(f"max_blob_bytes must be an int >= 0, got {max_blob_bytes!r}")
        if math.ceil(max_blob_bytes / chunk_size) > MAX_CHUNKS:
            raise ValueError(
                f"max_blob_bytes={max_blob_bytes} needs more than {MAX_CHUNKS} chunks of "
                f"chunk_size={chunk_size}: raise chunk_size or lower max_blob_bytes"
            )
        if not _is_int(max_concurrent_serves) or max_concurrent_serves < 1:
            raise ValueError(
                f"max_concurrent_serves must be an int >= 1, got {max_concurrent_serves!r}"
            )
        self.network = network
        self.store = store
        self.chunk_size = chunk_size
        self.max_blob_bytes = max_blob_bytes
        self.announce_fetched = announce
        self.stats = BlobStats()
        self._serve_slots = trio.Semaphore(max_concurrent_serves)
        self._listings: OrderedDict[tuple[str, int], tuple[int, tuple[str, ...]]] = OrderedDict()
        self._inflight: dict[_TransferKey, _Transfer] = {}
        self._nursery: trio.Nursery | None = None
        self._attached = False

    # --- lifecycle --------------------------------------------------------------------------
    def attach(self) -> None:
        """Serve this node's store on `BLOB_PROTOCOL` (before or after the network starts)."""
        if not self._attached:
            self.network.set_stream_handler(BLOB_PROTOCOL, self._serve)
            self._attached = True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BlobService]:
        """Attach, and own the tasks fetches start; leaving cancels them."""
        if self._nursery is not None:
            raise RuntimeError("this BlobService is already running")
        self.attach()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    # --- publishing ---------------------------------------------------------------------------
    async def announce(self, digest: str, timeout: float = 10.0) -> None:
        """Tell the DHT this node provides `digest`; failures are logged at debug, not raised."""
        key = provider_key(digest)
        if not self.store.has(digest):
            logger.debug("not announcing blob %s: it is not in the store", digest)
            return
        with trio.move_on_after(timeout + 1.0):
            try:
                await self.network.provide(key, timeout=timeout)
                return
            except (NetworkError, OSError) as exc:
                logger.debug("announcing blob %s failed: %s", digest, exc)
                return
        logger.debug("announcing blob %s timed out", digest)

    async def publish(self, data: bytes, timeout: float = 10.0) -> str:
        """Store `data`, announce it, and return its digest."""
        digest = self.store.put(data)
        await self.announce(digest, timeout)
        return digest

    # --- fetching -----------------------------------------------------------------------------
    async def fetch(
        self,
        digest: str,
        *,
        providers: Sequence[str] = (),
        chunks: Sequence[str] | None = None,
        size: int | None = None,
        timeout: float = 60.0,
        chunk_size: int | None = None,
        announce: bool | None = None,
    ) -> bytes:
        """The blob named `digest`, from the store or else from providers; stored when fetched.

        `providers` (peer ids) are tried first, in order, then those the DHT
        knows. `chunks` is a trusted chunk list (e.g. from a signed manifest)
        computed with `chunk_size` (default: the service's), and `size` the
        blob's known length: providers that disagree are dropped. Concurrent
        fetches of the same digest (and chunk size and list) share one transfer.
        `announce` overrides the service's `announce` setting for this blob
        (ephemeral blobs, such as one round's weights, are not worth announcing).

        Raises `BlobNotFound` when no reachable provider has it,
        `BlobIntegrityError` when only bad data (or data that contradicts
        `chunks`/`size`) was offered, `BlobError` for other failures (every
        provider busy or broken), `trio.TooSlowError` after `timeout` seconds,
        ValueError for malformed arguments and RuntimeError outside `running()`.
        """
        check_digest(digest)
        peers = list(providers)
        for i, peer in enumerate(peers):
            if not isinstance(peer, str) or not peer:
                raise ValueError(f"providers[{i}] must be a non-empty peer id string, got {peer!r}")
        chunk_size = self._check_chunk_size(chunk_size)
        trusted = self._check_trusted(chunks, size, chunk_size)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError(
                "BlobService.fetch needs the service running: `async with service.running():`"
            )
        with trio.fail_after(timeout):
            data = await self._from_store(digest)
            if data is not None:
                _check_result(digest, data, trusted, size, chunk_size)
                return data
            key = (digest, chunk_size, trusted)
            transfer = self._inflight.get(key)
            deadline = trio.current_time() + timeout
            if transfer is None:
                scope = trio.CancelScope(deadline=deadline)
                transfer = _Transfer(digest, chunk_size, trusted, size, scope)
                transfer.announce = self.announce_fetched if announce is None else announce
                self._inflight[key] = transfer
                transfer.offer(peers, self.network.peer_id)
                nursery.start_soon(self._run_transfer, key, transfer)
            else:
                transfer.offer(peers, self.network.peer_id)
                transfer.scope.deadline = max(transfer.scope.deadline, deadline)
            transfer.waiters += 1
            try:
                await transfer.done.wait()
            finally:
                transfer.waiters -= 1
                if transfer.waiters == 0 and not transfer.done.is_set():
                    # Nobody waits for it any more; a later caller starts afresh.
                    transfer.scope.cancel()
                    if self._inflight.get(key) is transfer:
                        del self._inflight[key]
        if transfer.error is not None:
            kind, message = transfer.error
            raise kind(message)
        assert transfer.result is not None
        # The transfer checked the bytes against `trusted` already; `size` may be this caller's own.
        _check_result(digest, transfer.result, None, size, chunk_size)
        return transfer.result

    def _check_chunk_size(self, chunk_size: int | None) -> int:
        if chunk_size is None:
            return self.chunk_size
        if not _is_int(chunk_size) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(
                f"chunk_size must be None or an int in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}, "
                f"got {chunk_size!r}"
            )
        if math.ceil(self.max_blob_bytes / chunk_size) > MAX_CHUNKS:
            raise ValueError(
                f"chunk_size={chunk_size} is too small for max_blob_bytes={self.max_blob_bytes} "
                f"(more than {MAX_CHUNKS} chunks)"
            )
        return chunk_size

    def _check_trusted(
        self, chunks: Sequence[str] | None, size: int | None, chunk_size: int
    ) -> tuple[str, ...] | None:
        if size is not None and (not _is_int(size) or not 0 <= size <= self.max_blob_bytes):
            raise ValueError(
                f"size must be None or an int in 0..{self.max_blob_bytes}, got {size!r}"
            )
        if chunks is None:
            return None
        if isinstance(chunks, str | bytes):
            raise ValueError("chunks must be a sequence of hex digests, not a single string")
        trusted = tuple(check_digest(c, f"chunks[{i}]") for i, c in enumerate(chunks))
        if len(trusted) > MAX_CHUNKS:
            raise ValueError(f"chunks lists {len(trusted)} digests, more than {MAX_CHUNKS}")
        if size is not None and len(trusted) != math.ceil(size / chunk_size):
            raise ValueError(
                f"chunks lists {len(trusted)} digests but a blob of {size} bytes has "
                f"{math.ceil(size / chunk_size)} chunks of {chunk_size} bytes"
            )
        return trusted

    async def _from_store(self, digest: str) -> bytes | None:
        stored = self.store.size(digest)
        if stored is None:
            return None
        if self.store.root is not None and stored > THREAD_THRESHOLD:
            return await run_blocking(self.store.get, digest)
        return self.store.get(digest)

    async def _run_transfer(self, key: _TransferKey, t: _Transfer) -> None:
        try:
            with t.scope:
                t.result = await self._transfer(t)
            if t.result is None and t.error is None:
                if trio.current_time() >= t.scope.deadline:
                    t.error = (trio.TooSlowError, f"fetching blob {t.digest} timed out")
                else:
                    t.error = (BlobError, f"fetching blob {t.digest} was abandoned")
        except BlobError as exc:
            t.error = (type(exc), str(exc))
        finally:
            if t.result is None and t.error is None:
                t.error = (BlobError, f"fetching blob {t.digest} was cancelled (service stopped)")
            if self._inflight.get(key) is t:
                del self._inflight[key]
            t.done.set()

    async def _transfer(self, t: _Transfer) -> bytes:
        """Fetch `t.digest` from its providers; returns the verified bytes (already stored)."""
        digest = t.digest
        progress = _Progress(t.size, t.trusted)
        addrs: dict[str, tuple[str, ...]] = {}
        reasons: dict[str, str] = {}
        deferred: list[str] = []
        drops: dict[str, int] = {}
        refusals: dict[str, int] = {}
        looked_up = False
        while True:
            if not t.pending:
                if not looked_up:
                    looked_up = True
                    for info in await self._lookup(digest):
                        addrs.setdefault(info.peer_id, info.addrs)
                        t.offer([info.peer_id], self.network.peer_id)
                    continue
                break
            peer = t.pending.popleft()
            if refusals.get(peer):
                await trio.sleep(BUSY_BACKOFF * refusals[peer])
            outcome, detail = await self._attempt(peer, addrs.get(peer, ()), t, progress)
            if outcome is _Outcome.DONE:
                if progress.hasher.hexdigest() == digest:
                    return await self._finish(t, progress)
                self._blame_reference(digest, progress, reasons)
                if progress.trusted is not None:
                    raise BlobIntegrityError(
                        f"blob {digest}: bytes matching the trusted chunk list do not hash to "
                        "the digest (the chunk list is wrong)"
                    )
                for again in deferred:  # their differing lists may have been the honest ones
                    t.pending.append(again)
                deferred.clear()
                continue
            if outcome is _Outcome.BUSY and refusals.get(peer, 0) < BUSY_RETRIES:
                refusals[peer] = refusals.get(peer, 0) + 1
                t.pending.append(peer)
                continue
            if outcome is _Outcome.DROPPED and drops.get(peer, 0) < 1:
                logger.debug("blob %s: %s dropped (%s); asking it once more", digest, peer, detail)
                drops[peer] = 1
                t.pending.appendleft(peer)
                continue
            if outcome is _Outcome.CONFLICT:
                deferred.append(peer)
                reasons[peer] = f"{outcome.value}: {detail}"
                continue
            if outcome is _Outcome.INTEGRITY:
                self.stats.integrity_failures += 1
            self.stats.providers_failed += 1
            reasons[peer] = f"{outcome.value}: {detail}"
            logger.debug(
                "blob %s: dropped provider %s (%s: %s)", digest, peer, outcome.value, detail
            )
        raise _failure(digest, reasons)

    def _blame_reference(self, digest: str, progress: _Progress, reasons: dict[str, str]) -> None:
        """The assembled blob is not `digest`: drop whoever vouched for its chunk list."""
        culprits = sorted(progress.ref_from)
        for peer in culprits:
            self.stats.integrity_failures += 1
            self.stats.providers_failed += 1
            reasons[peer] = "integrity failure: its chunk list and bytes do not hash to the digest"
        logger.debug("blob %s: assembled bytes do not match; blamed %s", digest, culprits)
        progress.reset()

    async def _finish(self, t: _Transfer, progress: _Progress) -> bytes:
        data = bytes(progress.buf)
        assert progress.ref is not None
        self.stats.fetches += 1
        listing = (len(data), progress.ref)
        stored = True
        try:
            if len(data) > THREAD_THRESHOLD:
                await run_blocking(self.store.put_verified, t.digest, data)
            else:
                self.store.put_verified(t.digest, data)
        except (StoreFullError, OSError) as exc:
            stored = False
            logger.warning("fetched blob %s but could not store it: %s", t.digest, exc)
        if stored:
            self._remember_listing(t.digest, t.chunk_size, listing)
            if t.announce and self._nursery is not None:
                self._nursery.start_soon(self.announce, t.digest)
        return data

    async def _lookup(self, digest: str) -> list[PeerInfo]:
        """Providers the DHT knows for `digest` (other than us); [] when the lookup fails."""
        with trio.move_on_after(LOOKUP_TIMEOUT + 1.0):
            try:
                found = await self.network.find_providers(provider_key(digest), LOOKUP_TIMEOUT)
            except (NetworkError, OSError) as exc:
                logger.debug("provider lookup for blob %s failed: %s", digest, exc)
                return []
            return [info for info in found if info.peer_id != self.network.peer_id]
        return []

    async def _open(self, peer: str, addrs: tuple[str, ...]) -> Stream:
        """A blob stream to `peer`: dialled at `addrs`, else wherever the DHT says it is."""
        network = self.network
        await self._dial(peer, addrs)
        try:
            return await network.open_bulk_stream(peer, BLOB_PROTOCOL, OPEN_TIMEOUT)
        except PeerUnreachable:
            if addrs or peer in network.connected_peers():
                raise
        # A provider named by peer id only (the requester, the master) that this node has
        # no address for: look it up, as a node does for any peer it has never met.
        info = None
        with trio.move_on_after(LOOKUP_TIMEOUT + 1.0):
            info = await network.find_peer(peer, LOOKUP_TIMEOUT)
        if info is None or not info.addrs:
            raise PeerUnreachable(f"{peer}: not connected, and the DHT knows no address")
        await self._dial(peer, tuple(info.addrs))
        return await network.open_bulk_stream(peer, BLOB_PROTOCOL, OPEN_TIMEOUT)

    async def _dial(self, peer: str, addrs: tuple[str, ...]) -> None:
        network = self.network
        if addrs and peer not in network.connected_peers():
            suffix = f"/p2p/{peer}"
            for addr in addrs:
                try:
                    await network.connect(
                        addr if addr.endswith(suffix) else addr + suffix, OPEN_TIMEOUT
                    )
                    break
                except (NetworkError, ValueError, OSError) as exc:
                    logger.debug("dialing provider %s at %s failed: %s", peer, addr, exc)

    async def _attempt(
        self, peer: str, addrs: tuple[str, ...], t: _Transfer, progress: _Progress
    ) -> tuple[_Outcome, str]:
        """One request to `peer`, resuming after the verified prefix; raises only Cancelled."""
        chunk_size = t.chunk_size
        offset = progress.verified * chunk_size
        try:
            stream = await self._open(peer, addrs)
        except (NetworkError, ValueError, OSError) as exc:
            return _Outcome.UNREACHABLE, str(exc)
        if offset > 0:
            self.stats.resumes += 1
        clean = False
        try:
            reader = _Reader(stream)
            request = {"digest": t.digest, "offset": offset, "chunk_size": chunk_size}
            with trio.move_on_after(STALL_TIMEOUT) as scope:
                await stream.write(_frame(request))
                await stream.close()
            if scope.cancelled_caught:
                return _Outcome.DROPPED, "sending the request stalled"
            max_chunks = math.ceil(self.max_blob_bytes / chunk_size)
            header = _parse_header(
                await reader.frame(_HEADER_BASE + _HEADER_PER_CHUNK * max_chunks),
                self.max_blob_bytes,
                chunk_size,
            )
            if header.status == STATUS_BUSY:
                return _Outcome.BUSY, "refused: too many transfers"
            if header.status == STATUS_NOT_FOUND:
                return _Outcome.NOT_FOUND, "does not have the blob"
            problem = self._check_header(header, progress)
            if problem is not None:
                return problem
            if progress.ref is None:
                progress.ref = header.chunks
            if progress.size is None:
                progress.size = header.size
            if progress.trusted is None:
                progress.ref_from.add(peer)
            reader.on_bytes = self._count_fetched
            ref = progress.ref
            assert ref is not None and progress.size is not None
            while progress.verified < len(ref):
                index = progress.verified
                want = min(chunk_size, progress.size - index * chunk_size)
                piece = await reader.exactly(want)
                if len(piece) > THREAD_THRESHOLD:
                    got = await run_blocking(digest_of, piece)
                else:
                    got = digest_of(piece)
                if got != ref[index]:
                    return _Outcome.INTEGRITY, f"chunk {index} does not match its digest"
                progress.accept(piece)
            clean = await reader.at_eof()
            return _Outcome.DONE, ""
        except _Malformed as exc:
            return _Outcome.PROTOCOL, str(exc)
        except _Dropped as exc:
            return _Outcome.DROPPED, str(exc)
        except (NetworkError, OSError) as exc:
            return _Outcome.DROPPED, str(exc)
        finally:
            if not clean:
                await _reset_quietly(stream)

    def _count_fetched(self, n: int) -> None:
        self.stats.fetched_bytes += n

    def _check_header(self, header: _Header, progress: _Progress) -> tuple[_Outcome, str] | None:
        """Whether an ok header agrees with what is known; None when it does."""
        if progress.size is not None and header.size != progress.size:
            return _Outcome.INTEGRITY, f"offers {header.size} bytes, expected {progress.size}"
        if progress.ref is not None and header.chunks != progress.ref:
            if progress.trusted is not None:
                return _Outcome.INTEGRITY, "its chunk list differs from the trusted chunk list"
            return _Outcome.CONFLICT, "its chunk list differs from the one being followed"
        return None

    # --- serving ------------------------------------------------------------------------------
    async def _serve(self, stream: Stream) -> None:
        """Stream handler for `BLOB_PROTOCOL`: one request, one response."""
        remote = stream.remote_peer
        try:
            with trio.fail_after(REQUEST_READ_TIMEOUT):
                body = await _Reader(stream).frame(MAX_REQUEST_BYTES)
            digest, offset, chunk_size = _parse_request(body, self.chunk_size)
        except (_Malformed, _Dropped, trio.TooSlowError) as exc:
            logger.debug("bad blob request from %s: %s", remote, exc)
            await _reset_quietly(stream)
            return
        try:
            self._serve_slots.acquire_nowait()
        except trio.WouldBlock:
            clean = await self._send_status(stream, STATUS_BUSY)
        else:
            try:
                clean = await self._respond(stream, digest, offset, chunk_size)
            finally:
                self._serve_slots.release()
        if clean:
            await _drain(stream)

    async def _send_status(self, stream: Stream, status: str) -> bool:
        """Answer with a bare status; True when it went out and the stream is closed cleanly."""
        with trio.move_on_after(STALL_TIMEOUT):
            try:
                await stream.write(_frame({"status": status}))
                await stream.close()
                return True
            except (NetworkError, OSError) as exc:
                logger.debug("answering %s to %s failed: %s", status, stream.remote_peer, exc)
        await _reset_quietly(stream)
        return False

    async def _respond(self, stream: Stream, digest: str, offset: int, chunk_size: int) -> bool:
        """Send the header and the bytes from `offset`; True when all went out."""
        listing = await self._listing(digest, chunk_size)
        if listing is None:
            return await self._send_status(stream, STATUS_NOT_FOUND)
        size, chunks = listing
        if offset > size or offset % chunk_size or len(chunks) > MAX_CHUNKS:
            logger.debug(
                "bad blob request from %s: offset %d for %d bytes in chunks of %d",
                stream.remote_peer,
                offset,
                size,
                chunk_size,
            )
            await _reset_quietly(stream)
            return False
        header = {
            "status": STATUS_OK,
            "size": size,
            "chunk_size": chunk_size,
            "chunks": list(chunks),
        }
        try:
            with trio.fail_after(STALL_TIMEOUT):
                await stream.write(_frame(header))
            for position in range(offset, size, chunk_size):
                piece = self.store.read(digest, position, chunk_size)
                with trio.fail_after(STALL_TIMEOUT):
                    await stream.write(piece)
                self.stats.served_bytes += len(piece)
            with trio.fail_after(STALL_TIMEOUT):
                await stream.close()
            return True
        except (NetworkError, OSError, KeyError, trio.TooSlowError) as exc:
            logger.debug("serving blob %s to %s stopped: %s", digest, stream.remote_peer, exc)
            await _reset_quietly(stream)
            return False

    async def _listing(self, digest: str, chunk_size: int) -> tuple[int, tuple[str, ...]] | None:
        """(size, chunk digests) of a stored blob, verified against its digest; None if absent."""
        size = self.store.size(digest)
        if size is None:
            return None
        key = (digest, chunk_size)
        cached = self._listings.get(key)
        if cached is not None:
            self._listings.move_to_end(key)
            return cached
        if size > THREAD_THRESHOLD:
            listing = await run_blocking(
                _compute_listing, self.store, digest, chunk_size
            )
        else:
            listing = _compute_listing(self.store, digest, chunk_size)
        if listing is not None:
            self._remember_listing(digest, chunk_size, listing)
        return listing

    def _remember_listing(
        self, digest: str, chunk_size: int, listing: tuple[int, tuple[str, ...]]
    ) -> None:
        self._listings[(digest, chunk_size)] = listing
        self._listings.move_to_end((digest, chunk_size))
        while len(self._listings) > LISTING_CACHE:
            self._listings.popitem(last=False)


def _compute_listing(
    store: BlobStore, digest: str, chunk_size: int
) -> tuple[int, tuple[str, ...]] | None:
    """Hash a stored blob chunk by chunk; a blob that does not match its digest is deleted."""
    size = store.size(digest)
    if size is None:
        return None
    whole = hashlib.sha256()
    chunks: list[str] = []
    try:
        for position in range(0, size, chunk_size):
            piece = store.read(digest, position, chunk_size)
            whole.update(piece)
            chunks.append(digest_of(piece))
    except KeyError:
        return None
    except OSError as exc:
        logger.warning("cannot read stored blob %s: %s", digest, exc)
        return None
    if whole.hexdigest() != digest or len(chunks) != math.ceil(size / chunk_size):
        logger.warning("stored blob %s is corrupt: deleted", digest)
        store.delete(digest)
        return None
    return size, tuple(chunks)


def _check_result(
    digest: str, data: bytes, trusted: tuple[str, ...] | None, size: int | None, chunk_size: int
) -> None:
    """A verified blob still has to agree with the caller's size and trusted chunk list."""
    if size is not None and len(data) != size:
        raise BlobIntegrityError(f"blob {digest} is {len(data)} bytes, not the expected {size}")
    if trusted is not None and tuple(chunk_digests(data, chunk_size)) != trusted:
        raise BlobIntegrityError(f"blob {digest} does not match the trusted chunk list")


def _failure(digest: str, reasons: dict[str, str]) -> BlobError:
    """The error for a fetch that ran out of providers."""
    if not reasons:
        return BlobNotFound(f"no provider of blob {digest} was found")
    shown = "; ".join(f"{peer}: {why}" for peer, why in list(reasons.items())[:8])
    more = f" (and {len(reasons) - 8} more)" if len(reasons) > 8 else ""
    values = list(reasons.values())
    integrity = _Outcome.INTEGRITY.value
    if any(v.startswith(integrity) for v in values):
        return BlobIntegrityError(
            f"blob {digest}: no provider served matching bytes: {shown}{more}"
        )
    absent = (_Outcome.NOT_FOUND.value, _Outcome.UNREACHABLE.value)
    if all(v.startswith(absent) for v in values):
        return BlobNotFound(f"no reachable provider has blob {digest}: {shown}{more}")
    return BlobError(f"fetching blob {digest} failed with every provider: {shown}{more}")
