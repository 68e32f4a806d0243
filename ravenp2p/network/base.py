"""The `Network` interface the roles are written against, and the types it speaks.

Two implementations exist: `Libp2pNetwork` (real py-libp2p hosts) and
`MemoryNetwork` (in-process, with modelled links, for unit tests and the
simulator). Roles never import either directly; they receive a `Network`.

Payloads are opaque bytes at this layer. Signing, schemas and replay protection
live in `ravenp2p.wire`; reliable delivery lives in `ravenp2p.topics`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import trio

_log = logging.getLogger("ravenp2p.network")


class NetworkError(Exception):
    """A network operation failed (peer unreachable, stream reset, timeout, ...)."""


class PeerUnreachable(NetworkError):
    """No connection to the peer could be made."""


class ProtocolNotSupported(NetworkError):
    """The remote peer does not speak the requested protocol id."""


class RequestFailed(NetworkError):
    """A request/response exchange failed: the handler raised, or the reply was too large."""


class RequestTooLarge(RequestFailed, ValueError):
    """A request or response exceeds the size limit; the message names the limit."""


@dataclass(frozen=True)
class PeerInfo:
    """A peer and the multiaddrs it can be reached at."""

    peer_id: str
    addrs: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class TopicMessage:
    """One message received on a pubsub topic.

    `source` is the original publisher as the transport reports it; `via` is the
    neighbour that handed it to us. Neither is authenticated at the envelope
    level: use `ravenp2p.wire` for that.
    """

    topic: str
    data: bytes
    source: str
    via: str


@runtime_checkable
class Stream(Protocol):
    """A bidirectional byte stream to one peer."""

    @property
    def remote_peer(self) -> str: ...

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to `max_bytes`; b"" means the remote closed its side."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None:
        """Close our writing side; reading may continue until the remote closes."""
        ...

    async def reset(self) -> None:
        """Abort the stream in both directions."""
        ...


RequestHandler = Callable[[str, bytes], Awaitable[bytes]]
"""`handler(remote_peer_id, request_bytes) -> response_bytes`."""

StreamHandler = Callable[[Stream], Awaitable[None]]
"""`handler(stream)`: owns the stream until it returns; the stream is closed afterwards."""

RecordValidator = Callable[[str, bytes], None]
"""`validator(key, value)`: raise `ValueError` naming the problem when a DHT record is invalid."""

TopicValidator = Callable[[str, bytes], bool]
"""`validator(source_peer_id, data) -> bool`: False (or an exception) drops a pubsub message."""


@runtime_checkable
class Subscription(Protocol):
    """Messages arriving on a topic, as an async iterator. Closing it unsubscribes."""

    topic: str

    def __aiter__(self) -> AsyncIterator[TopicMessage]: ...

    async def __anext__(self) -> TopicMessage: ...

    async def aclose(self) -> None: ...


def topic_validator_accepts(
    validator: TopicValidator, topic: str, source: str, data: bytes
) -> bool:
    """Run a topic validator failing closed: an exception or any result but True drops."""
    try:
        accepted = validator(source, data) is True
    except Exception as exc:
        # Debug only: a remote peer can trigger this at will.
        _log.debug("topic validator for %s raised %r: message dropped", topic, exc)
        return False
    if not accepted:
        _log.debug("topic validator for %s rejected a message from %s", topic, source)
    return accepted


class QueuedSubscription:
    """A `Subscription` fed by its network through a bounded in-process queue.

    Implementations call `offer` for each arriving message and implement
    `aclose` (unsubscribe, then `_close_queue`).
    """

    def __init__(self, topic: str, buffer: int) -> None:
        self.topic = topic
        self._send, self._receive = trio.open_memory_channel[TopicMessage](buffer)
        self._closed = False

    def __aiter__(self) -> QueuedSubscription:
        return self

    async def __anext__(self) -> TopicMessage:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def offer(self, message: TopicMessage) -> bool:
        """Queue `message`; False when the subscriber is too far behind and it was dropped."""
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True

    def _close_queue(self) -> bool:
        """Close the queue once; False if it was already closed."""
        if self._closed:
            return False
        self._closed = True
        self._send.close()
        self._receive.close()
        return True

    async def aclose(self) -> None:
        raise NotImplementedError


@runtime_checkable
class Network(Protocol):
    """What a node needs from the network, independent of how it is carried.

    An implementation is started by entering it as an async context manager
    (`async with network:`) and stopped by leaving it; leaving disconnects every
    peer first so the other side does not keep a stale link.
    """

    @property
    def peer_id(self) -> str: ...

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs, including `/p2p/<peer id>`, that other peers can dial."""
        ...

    async def __aenter__(self) -> Network: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    # --- connections -------------------------------------------------------
    async def connect(self, addr: str, timeout: float = 10.0) -> str:
        """Dial a multiaddr ending in `/p2p/<peer id>`; returns the peer id."""
        ...

    async def disconnect(self, peer_id: str) -> None: ...

    def connected_peers(self) -> list[str]: ...

    def known_peers(self) -> list[PeerInfo]:
        """Every peer this node knows an address for (connected or not)."""
        ...

    # --- pubsub ------------------------------------------------------------
    async def subscribe(self, topic: str) -> Subscription: ...

    async def publish(self, topic: str, data: bytes) -> None: ...

    def topic_peers(self, topic: str) -> list[str]:
        """Connected peers known to be subscribed to `topic`."""
        ...

    def set_topic_validator(self, topic: str, validator: TopicValidator) -> None:
        """Check every message on `topic` before it is delivered locally or forwarded.

        `validator(source_peer_id, data)` runs before a message is delivered
        locally or forwarded; False drops it (not delivered, not relayed). An
        exception raised by the validator counts as False (and is logged at
        debug level); it never reaches the network's own tasks. Any result other
        than True (e.g. a forgotten `return`, None) also drops the message.
        `source_peer_id` is the original publisher as the transport reports it
        (the `TopicMessage.source`), not authenticated at the envelope level.

        It runs on every node the message reaches, once per message (a
        duplicate is dropped before validation, or gets the cached verdict),
        and on messages this node publishes itself: a rejected own message is
        dropped silently, like any other. It must be cheap and synchronous: it
        runs inline on the receive path, and a slow validator stalls the topic.
        A later call for the same topic replaces the validator. It may be set
        before or after the network is started.
        """
        ...

    # --- request / response ------------------------------------------------
    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None: ...

    async def request(
        self, peer_id: str, protocol: str, data: bytes, timeout: float = 10.0
    ) -> bytes: ...

    # --- streams -----------------------------------------------------------
    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    async def open_stream(self, peer_id: str, protocol: str, timeout: float = 10.0) -> Stream: ...

    async def open_bulk_stream(
        self, peer_id: str, protocol: str, timeout: float = 10.0
    ) -> Stream:
        """A stream tuned for moving many megabytes (weights, shards, gradients).

        Same semantics and the same handlers as `open_stream`; an implementation
        may carry it on a dedicated encrypted connection with larger frames.
        """
        ...

    # --- DHT ---------------------------------------------------------------
    def set_record_validator(self, namespace: str, validator: RecordValidator) -> None:
        """Accept DHT records under `/namespace/...` only when `validator` passes them."""
        ...

    async def put_value(self, key: str, value: bytes, timeout: float = 10.0) -> None:
        """Store a record under `key` (a `/namespace/...` path) on the closest peers."""
        ...

    async def get_value(self, key: str, timeout: float = 10.0) -> bytes | None: ...

    async def provide(self, key: str, timeout: float = 10.0) -> None:
        """Announce that this node can serve the content named `key`."""
        ...

    async def find_providers(self, key: str, timeout: float = 10.0) -> list[PeerInfo]: ...

    async def find_peer(self, peer_id: str, timeout: float = 10.0) -> PeerInfo | None: ...
