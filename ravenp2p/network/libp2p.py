"""`Libp2pNetwork`: the `Network` interface on real py-libp2p (0.8.1) hosts.

TCP + Noise (only) + yamux, identify, ping, a Kademlia DHT in server mode,
FloodSub or GossipSub, and our own length-prefixed request/response framing.

py-libp2p 0.8.1 has sharp edges that this adapter works around, each covered by
a test in tests/network/test_libp2p.py:

1. every dial waits a 250 ms "happy eyeballs" delay even after success: the
   module constant is patched to 0 when this module is imported;
2. default security options include plaintext (and secio, TLS): we pass a
   Noise-only `sec_opt`;
3. connecting does not seed the DHT routing table: a network notifee adds every
   newly connected peer (inbound and outbound) once identify has told us its
   listen addresses;
4. a host leaving `run()` leaves its links open on the other side: leaving the
   context disconnects every peer first;
5. routing-table refresh connects to everyone it looks up and never prunes: our
   connection manager closes least recently used idle connections above a cap;
6. normal DHT stream closes log WARNINGs: libp2p loggers are quietened.

Found while building this adapter, also worked around here:

- a failed dial puts the peer in a 60 s negative cache: an explicit `connect()`
  clears that entry first, so a peer that just came back is reachable;
- the auto-connector dials every peer in the peerstore up to (low + high
  watermark) / 2 connections: it is disabled;
- FIND_NODE ignores keys longer than 50 bytes that are not multihashes, so
  lookups for "/ravenp2p-cap/<peer id>" never left the first hop: long keys
  are looked up by their sha2-256 multihash (records keep their real key);
- `find_providers` returns only the local store when that knows any provider:
  we merge the local store with a network lookup and de-duplicate;
- yamux reports a remote reset as a clean EOF: `read` checks the stream's
  reset flag and raises `NetworkError`;
- each Pubsub starts a never-stopped sweeper thread: replaced by a lazy cache;
- the DHT maintenance loop (refresh + republish) runs unbounded: replaced by
  one with a configurable interval and a time budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import libp2p.network.swarm as _swarm_module
import multiaddr
import multihash
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.x25519 import create_new_key_pair as _create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.pubsub.floodsub import FloodSub
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.validator import Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from ravenp2p.identity import NodeIdentity
from ravenp2p.network.base import (
    NetworkError,
    PeerInfo,
    PeerUnreachable,
    ProtocolNotSupported,
    QueuedSubscription,
    RecordValidator,
    RequestFailed,
    RequestHandler,
    RequestTooLarge,
    Stream,
    StreamHandler,
    TopicMessage,
    TopicValidator,
    topic_validator_accepts,
)
from ravenp2p.network.bulk import BULK_PROTOCOL, BulkEndpoint

# --- pitfall 1: the 250 ms happy-eyeballs delay on every dial -----------------
_swarm_module._HAPPY_EYEBALLS_DELAY = 0.0

# --- pitfall 6: noisy libp2p logs on normal operation ------------------------
# Normal events (a DHT stream closed by the remote, a peer leaving while
# identify or pubsub opens a stream) are logged by py-libp2p as WARNING/ERROR
# with multi-line dumps. Our own logger reports connects/disconnects instead.
_QUIET_LOGGERS = {
    "libp2p.kad_dht": logging.CRITICAL,
    "libp2p.host.basic_host": logging.CRITICAL,
    "libp2p.protocol_muxer": logging.CRITICAL,
    "libp2p.stream_muxer": logging.CRITICAL,
    "libp2p.pubsub": logging.CRITICAL,
    "libp2p.network": logging.CRITICAL,
    "libp2p.identity": logging.CRITICAL,
    "libp2p.rcmgr": logging.ERROR,
    "libp2p.transport": logging.ERROR,
    "libp2p.security": logging.ERROR,
}


def quiet_libp2p_loggers() -> None:
    """Raise the level of py-libp2p loggers that complain about normal events.

    Skipped when LIBP2P_DEBUG is set: then py-libp2p's own logging setup rules.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


quiet_libp2p_loggers()

logger = logging.getLogger("ravenp2p.network")

MiB = 1024 * 1024
_LEN = struct.Struct(">I")  # request frame: u32 length + payload
_RESP = struct.Struct(">BI")  # response frame: status byte + u32 length + payload
_STATUS_OK = 0
_STATUS_ERROR = 1
_MAX_ERROR_BYTES = 4096
_FORWARDER: contextvars.ContextVar[ID | None] = contextvars.ContextVar(
    "ravenp2p_pubsub_forwarder", default=None
)


@dataclass(frozen=True)
class Libp2pConfig:
    """Tunables of `Libp2pNetwork`; the defaults suit a loopback devnet and small clusters.

    Connection manager: above `max_connections` open connections, the least
    recently used peers with no open streams (and not connected within
    `connection_grace_s`) are disconnected, checked every `prune_interval_s`.

    Inbound requests: a handler running longer than `request_handler_timeout_s`
    is cancelled and the caller gets an error reply naming the timeout; a peer
    with `max_inbound_requests_per_peer` requests in progress here gets an
    error reply at once for any further one.
    """

    max_connections: int = 64
    connection_grace_s: float = 2.0
    prune_interval_s: float = 1.0
    max_request_bytes: int = 4 * MiB
    max_response_bytes: int = 4 * MiB
    request_handler_timeout_s: float = 30.0
    max_inbound_requests_per_peer: int = 32
    pubsub: Literal["floodsub", "gossipsub"] = "floodsub"
    gossip_degree: int = 6
    gossip_degree_low: int = 4
    gossip_degree_high: int = 12
    gossip_heartbeat_s: int = 1
    gossip_max_messages_per_topic_per_second: float = 10_000.0
    subscription_buffer: int = 1024
    pubsub_seen_ttl_s: int = 120
    dht_strict_validation: bool = True
    dht_seed_wait_s: float = 5.0
    dht_refresh_interval_s: float = 600.0
    dht_refresh_budget_s: float = 30.0
    dial_timeout_s: float = 10.0
    negotiate_timeout_s: int = 10
    stop_timeout_s: float = 5.0
    disconnect_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_request_bytes < 1 or self.max_response_bytes < 1:
            raise ValueError("max_request_bytes and max_response_bytes must be positive")
        if not self.request_handler_timeout_s > 0:
            raise ValueError("request_handler_timeout_s must be positive")
        if self.max_inbound_requests_per_peer < 1:
            raise ValueError("max_inbound_requests_per_peer must be at least 1")
        if self.pubsub not in ("floodsub", "gossipsub"):
            raise ValueError(f"pubsub must be 'floodsub' or 'gossipsub', not {self.pubsub!r}")


# --- streams ------------------------------------------------------------------


class Libp2pStream:
    """A py-libp2p stream behind the `Stream` protocol: `read` returns b"" at EOF."""

    def __init__(self, stream: INetStream, remote_peer: str, on_activity: Any = None) -> None:
        self._stream = stream
        self._remote_peer = remote_peer
        self._eof = False
        self._on_activity = on_activity

    @property
    def remote_peer(self) -> str:
        return self._remote_peer

    @property
    def raw(self) -> INetStream:
        """The wrapped py-libp2p stream (for adapters that need it)."""
        return self._stream

    async def read(self, max_bytes: int = 65536) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if self._eof:
            return b""
        try:
            data = await self._stream.read(max_bytes)
        except StreamEOF:
            data = b""
        except StreamReset as exc:
            raise NetworkError(f"stream from {self._remote_peer} was reset") from exc
        except Exception as exc:
            raise NetworkError(f"read from {self._remote_peer} failed: {exc}") from exc
        if not data:
            if self._was_reset():
                raise NetworkError(f"stream from {self._remote_peer} was reset")
            self._eof = True
        return data

    def _was_reset(self) -> bool:
        # py-libp2p's yamux drops a stream's bookkeeping as soon as an RST
        # arrives, so the next read reports a clean EOF; the flag survives on
        # the muxed stream object, and tells a reset from a FIN.
        muxed = getattr(self._stream, "muxed_stream", None)
        return bool(getattr(muxed, "reset_received", False))

    async def write(self, data: bytes) -> None:
        try:
            await self._stream.write(data)
        except (StreamClosed, StreamReset) as exc:
            raise NetworkError(f"write to {self._remote_peer} failed: stream closed") from exc
        except Exception as exc:
            raise NetworkError(f"write to {self._remote_peer} failed: {exc}") from exc

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._close_write()

    async def _close_write(self) -> None:
        close_write = getattr(self._stream, "close_write", None)
        if callable(close_write):
            await close_write()
        else:
            await self._stream.close()

    async def reset(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.reset()

    async def _release(self) -> None:
        """Close both sides (after a handler returned), never raising."""
        with contextlib.suppress(Exception):
            await self._close_write()
        with contextlib.suppress(Exception):
            await self._stream.close()


async def _release_shielded(stream: Libp2pStream, timeout: float = 1.0) -> None:
    """`stream._release()`, bounded by `timeout` and shielded from cancellation."""
    with trio.move_on_after(timeout, shield=True):
        await stream._release()


async def _read_exactly(stream: Libp2pStream, n: int) -> bytes:
    chunks: list[bytes] = []
    remaining = n
    while remaining > 0:
        chunk = await stream.read(min(remaining, 1 << 20))
        if not chunk:
            raise EOFError(f"stream ended with {remaining} of {n} bytes missing")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# --- pubsub -------------------------------------------------------------------


class _SeenCache:
    """py-libp2p's LastSeenCache without its background thread (one leaked per Pubsub).

    Same semantics: a key's expiry moves forward on every add/has; expired keys
    are swept lazily, at most once per `ttl / 4` seconds.
    """

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.cache: dict[bytes, float] = {}
        self._next_sweep = time.monotonic() + max(ttl / 4, 1.0)

    def _maybe_sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + max(self.ttl / 4, 1.0)
        expired = [k for k, expiry in self.cache.items() if expiry < now]
        for k in expired:
            del self.cache[k]

    def add(self, key: bytes) -> bool:
        now = time.monotonic()
        self._maybe_sweep(now)
        is_new = key not in self.cache
        self.cache[key] = now + self.ttl
        return is_new

    def has(self, key: bytes) -> bool:
        now = time.monotonic()
        self._maybe_sweep(now)
        expiry = self.cache.get(key)
        if expiry is None or expiry < now:
            return False
        self.cache[key] = now + self.ttl
        return True

    def length(self) -> int:
        return len(self.cache)

    def stop(self) -> None:
        return None


class _RavenPubsub(Pubsub):
    """Pubsub that hands messages (with the neighbour that forwarded them) to our queues."""

    def __init__(
        self, host: IHost, router: FloodSub | GossipSub, *, seen_ttl: int = 120, **kwargs: Any
    ) -> None:
        super().__init__(host, router, seen_ttl=seen_ttl, **kwargs)
        # No threads: stop py-libp2p's sweeper thread and use a lazy cache.
        self.seen_messages.stop()
        self.seen_messages = _SeenCache(seen_ttl)  # type: ignore[assignment]
        self.deliver: Any = None  # set by Libp2pNetwork: (msg, via) -> None

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        token = _FORWARDER.set(msg_forwarder)
        try:
            await super().push_msg(msg_forwarder, msg)
        finally:
            _FORWARDER.reset(token)

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        if self.deliver is not None:
            self.deliver(publish_message, _FORWARDER.get())


class Libp2pSubscription(QueuedSubscription):
    """Messages on one topic; `aclose()` unsubscribes (the last local one leaves the topic)."""

    def __init__(self, network: Libp2pNetwork, topic: str, buffer: int) -> None:
        super().__init__(topic, buffer)
        self._network = network

    async def aclose(self) -> None:
        if self._closed:
            return
        await self._network._unsubscribe(self)
        self._close_queue()

    def _offer(self, message: TopicMessage) -> None:
        if not self.offer(message):
            logger.warning("dropping a message on %s: subscriber is not keeping up", self.topic)


# --- DHT validators -----------------------------------------------------------


class _CallbackValidator(Validator):
    """A py-libp2p DHT record validator that calls our `RecordValidator`."""

    def __init__(self, fn: RecordValidator) -> None:
        self._fn = fn

    def validate(self, key: str, value: bytes) -> None:
        self._fn(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


def _lookup_key(key: bytes) -> bytes:
    """The FIND_NODE target for a DHT key.

    py-libp2p's FIND_NODE handler ignores keys that are neither a multihash nor
    at most 50 bytes long, so a lookup for "/ravenp2p-cap/<peer id>" (67 bytes)
    never leaves the first hop. Longer keys are looked up by their sha2-256
    multihash instead; records are still stored and fetched under the real key.
    """
    if len(key) <= 50:
        return key
    try:
        multihash.decode(key)
        return key
    except Exception:
        return b"\x12\x20" + hashlib.sha256(key).digest()


def _bounded_maintenance(dht: KadDHT, interval: float, budget: float) -> None:
    """Replace KadDHT's maintenance loop: first run after `interval`, each run bounded.

    The stock loop refreshes the routing table at start and every 600 s with no
    time bound; a refresh dials every peer it looks up (our connection manager
    then trims the idle ones).
    """

    async def run_main_loop() -> None:
        while dht.manager.is_running:
            await trio.sleep(interval)
            with trio.move_on_after(budget):
                try:
                    await dht.refresh_routing_table()
                    await dht.provider_store._republish_provider_records()
                    await dht.value_store._republish_records(dht.peer_routing)
                except Exception as exc:
                    logger.debug("DHT maintenance failed: %s", exc)
            with contextlib.suppress(Exception):
                dht.value_store.cleanup_expired()
                dht.provider_store.cleanup_expired()

    dht._run_main_loop = run_main_loop  # type: ignore[method-assign]


def _patch_lookups(dht: KadDHT) -> None:
    routing = dht.peer_routing
    original = routing.find_closest_peers_network

    async def find_closest_peers_network(target_key: bytes, count: int = 20) -> list[ID]:
        return await original(_lookup_key(target_key), count)

    routing.find_closest_peers_network = find_closest_peers_network  # type: ignore[method-assign]


def _disable_auto_connector(network: Any) -> None:
    """Stop py-libp2p's auto-connector from dialing every peer in the peerstore.

    It aims at (low + high watermark) / 2 connections, i.e. it dials up to 150
    known peers by default; our connection manager decides instead.
    """
    connector = getattr(network, "auto_connector", None)
    if connector is None:
        return

    async def maybe_connect() -> None:
        await trio.lowlevel.checkpoint()

    connector.maybe_connect = maybe_connect


def _is_protocol_refusal(exc: BaseException) -> bool:
    """True when multistream-select said "na" to our protocol (anywhere in the cause chain)."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, MultiselectClientError) and "not supported" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _innermost(exc: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group: the error that actually happened."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _provider_key(key: str) -> str:
    """A content name as the hex of a sha2-256 multihash, which py-libp2p's provider API accepts."""
    return "1220" + hashlib.sha256(key.encode("utf-8")).hexdigest()


# --- connection events --------------------------------------------------------


class _Notifee(INotifee):
    def __init__(self, network: Libp2pNetwork) -> None:
        self._network = network

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        with contextlib.suppress(Exception):
            self._network._touch(str(stream.muxed_conn.peer_id))

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._network._on_connected(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._network._on_disconnected(conn)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None



def _bulk_host_ip(listen: Sequence[multiaddr.Multiaddr]) -> str:
    """The IP the bulk endpoint listens on: that of the first IPv4 listen address."""
    for addr in listen:
        try:
            return addr.value_for_protocol("ip4")
        except Exception:  # no ip4 component in this address
            continue
    return "127.0.0.1"

# --- the adapter --------------------------------------------------------------


class Libp2pNetwork:
    """The `Network` interface on a py-libp2p host (TCP, Noise, yamux, Kademlia, pubsub).

    Enter it (`async with net:`) to start listening; leaving disconnects every
    peer, then stops the DHT, pubsub and host, each step bounded by a timeout.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        listen_addrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        config: Libp2pConfig | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or Libp2pConfig()
        self._listen = [multiaddr.Multiaddr(a) for a in listen_addrs]
        self._peer_id = identity.peer_id
        self._bulk = BulkEndpoint(self._peer_id, host_ip=_bulk_host_ip(self._listen))
        self._host: IHost | None = None
        self._dht: KadDHT | None = None
        self._pubsub: _RavenPubsub | None = None
        self._router: FloodSub | GossipSub | None = None
        self._nursery: trio.Nursery | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._stop = trio.Event()
        self._run_done = trio.Event()
        self._running = False
        self._validators: dict[str, RecordValidator] = {}
        self._request_handlers: dict[str, RequestHandler] = {}
        self._inbound_requests: dict[str, int] = {}  # peer id -> requests being served
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._topic_validators: dict[str, TopicValidator] = {}
        self._subscriptions: dict[str, list[Libp2pSubscription]] = {}
        self._last_used: dict[str, float] = {}
        self._connected_at: dict[str, float] = {}
        self._prune_wakeup = trio.Event()

    # --- identity / addresses -------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs (`.../tcp/<bound port>/p2p/<peer id>`) other peers can dial."""
        host = self._require_host()
        return [str(a) for a in host.get_addrs()]

    @property
    def host(self) -> IHost:
        """The underlying py-libp2p host (for tests and the bulk-transfer adapter)."""
        return self._require_host()

    @property
    def dht(self) -> KadDHT:
        """The underlying Kademlia DHT service."""
        if self._dht is None:
            raise NetworkError("network is not started")
        return self._dht

    def connection_count(self) -> int:
        """Open connections (a peer may have more than one)."""
        if self._host is None:
            return 0
        return sum(len(c) for c in self._host.get_network().get_connections_map().values())

    # --- lifecycle --------------------------------------------------------------
    async def __aenter__(self) -> Libp2pNetwork:
        if self._running or self._nursery is not None:
            raise NetworkError("Libp2pNetwork is already running")
        self._stop = trio.Event()
        self._run_done = trio.Event()
        self._prune_wakeup = trio.Event()
        cfg = self.config
        key_pair = self.identity.libp2p_key_pair()
        noise = NoiseTransport(key_pair, noise_privkey=_create_x25519_key_pair().private_key)
        conn_config = ConnectionConfig(
            # libp2p's own limits stay loose: our manager enforces `max_connections`
            # by pruning idle links, rather than refusing inbound handshakes.
            max_connections=max(4 * cfg.max_connections, cfg.max_connections + 64),
            min_connections=0,
            low_watermark=0,
            high_watermark=max(4 * cfg.max_connections, cfg.max_connections + 64),
            max_connections_per_peer=1,
            dial_timeout=cfg.dial_timeout_s,
            auto_connect_interval=3600.0,
        )
        host = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=self._listen,
            negotiate_timeout=cfg.negotiate_timeout_s,
            connection_config=conn_config,
        )
        network = host.get_network()
        if hasattr(network, "retry_config"):
            network.retry_config = RetryConfig(max_retries=0)
        _disable_auto_connector(network)
        self._host = host
        self._dht = KadDHT(host, DHTMode.SERVER, strict_validation=cfg.dht_strict_validation)
        _patch_lookups(self._dht)
        _bounded_maintenance(self._dht, cfg.dht_refresh_interval_s, cfg.dht_refresh_budget_s)
        for namespace, fn in self._validators.items():
            self._dht.register_validator(namespace, _CallbackValidator(fn))
        if cfg.pubsub == "gossipsub":
            self._router = GossipSub(
                protocols=[GOSSIPSUB_PROTOCOL_ID],
                degree=cfg.gossip_degree,
                degree_low=cfg.gossip_degree_low,
                degree_high=cfg.gossip_degree_high,
                heartbeat_interval=cfg.gossip_heartbeat_s,
                heartbeat_initial_delay=0.1,
                adaptive_gossip_enabled=False,
                max_messages_per_topic_per_second=cfg.gossip_max_messages_per_topic_per_second,
                eclipse_protection_enabled=False,
            )
        else:
            self._router = FloodSub(protocols=[TProtocol("/floodsub/1.0.0")])
        self._pubsub = _RavenPubsub(
            host, self._router, cache_size=4096, seen_ttl=cfg.pubsub_seen_ttl_s
        )
        self._pubsub.deliver = self._deliver
        for topic in self._topic_validators:
            self._install_topic_validator(topic)
        network.register_notifee(_Notifee(self))
        for protocol in self._request_handlers:
            self._install_request_handler(protocol)
        for protocol in self._stream_handlers:
            self._install_stream_handler(protocol)

        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            with trio.fail_after(cfg.stop_timeout_s + 10):
                await self._nursery.start(self._run)
        except BaseException:
            self._stop.set()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            try:
                await stack.__aexit__(None, None, None)
            finally:
                self._nursery = None
            raise
        self._exit_stack = stack
        self._running = True
        logger.debug("node %s listening on %s", self._peer_id, ", ".join(self.listen_addrs))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._exit_stack is None or self._nursery is None:
            return
        stack, nursery = self._exit_stack, self._nursery
        self._exit_stack = None
        self._stop.set()
        # Shielded: a cancelled caller still gets a bounded, orderly stop, and the
        # nursery entered in __aenter__ is always exited here.
        with trio.move_on_after(
            self.config.stop_timeout_s + self.config.disconnect_timeout_s, shield=True
        ):
            await self._run_done.wait()
        nursery.cancel_scope.cancel()
        try:
            # The body's own exception propagates unchanged: our nursery only
            # raises if one of our background tasks failed.
            await stack.__aexit__(None, None, None)
        finally:
            self._running = False
            self._nursery = None
            logger.debug("node %s stopped", self._peer_id)

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, dht, pubsub, router = self._host, self._dht, self._pubsub, self._router
        assert host is not None and dht is not None and pubsub is not None and router is not None
        try:
            # `outer` bounds the shutdown: once stopping starts, its deadline is set
            # so leaving pubsub, the DHT and the host can never hang.
            with trio.CancelScope() as outer:
                async with contextlib.AsyncExitStack() as stack:
                    await stack.enter_async_context(host.run(self._listen))
                    await stack.enter_async_context(background_trio_service(dht))
                    await stack.enter_async_context(background_trio_service(pubsub))
                    if isinstance(router, GossipSub):
                        await stack.enter_async_context(background_trio_service(router))
                    with trio.fail_after(5):
                        await pubsub.wait_until_ready()
                    async with trio.open_nursery() as inner:
                        inner.start_soon(self._connection_manager)
                        # Bulk streams die with the node: the endpoint lives in `inner`.
                        await inner.start(self._bulk.serve)
                        host.set_stream_handler(TProtocol(BULK_PROTOCOL), self._on_bulk_handshake)
                        task_status.started()
                        await self._stop.wait()
                        await self._disconnect_all()
                        inner.cancel_scope.cancel()
                    outer.deadline = trio.current_time() + self.config.stop_timeout_s
            if outer.cancelled_caught:
                logger.warning("node %s: stopping services timed out", self._peer_id)
        except Exception as exc:
            # py-libp2p's services can trip over their own closing nurseries when a peer's
            # message arrives mid-shutdown ("Nursery is closed to new arrivals"); the node
            # is stopping anyway, so that must not turn a clean stop into a crash.
            if not self._stop.is_set():
                raise
            logger.warning("node %s: py-libp2p failed while stopping (ignored): %r",
                           self._peer_id, _innermost(exc))
        finally:
            self._run_done.set()

    async def _disconnect_all(self) -> None:
        host = self._host
        if host is None:
            return
        peers = list(host.get_network().get_connections_map().keys())
        if not peers:
            return
        with trio.move_on_after(self.config.disconnect_timeout_s):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(self._close_peer, peer)

    async def _close_peer(self, peer: ID) -> None:
        host = self._require_host()
        with contextlib.suppress(Exception):
            await host.disconnect(peer)

    def _require_host(self) -> IHost:
        if self._host is None:
            raise NetworkError("network is not started: use 'async with network:'")
        return self._host

    def _require_running(self) -> IHost:
        if not self._running:
            raise NetworkError("network is not started: use 'async with network:'")
        return self._require_host()

    # --- connection events ----------------------------------------------------
    def _touch(self, peer_id: str) -> None:
        self._last_used[peer_id] = time.monotonic()

    def _on_connected(self, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        peer_s = str(peer)
        now = time.monotonic()
        self._connected_at[peer_s] = now
        self._last_used[peer_s] = now
        direction = getattr(conn, "direction", None)
        label = str(getattr(direction, "name", direction or "unknown")).lower()
        logger.info("connected to peer %s (%s)", peer_s, label)
        if self._nursery is not None and not self._stop.is_set():
            self._nursery.start_soon(self._seed_routing_table, peer)
        self._prune_wakeup.set()

    def _on_disconnected(self, conn: INetConn) -> None:
        peer_s = str(conn.muxed_conn.peer_id)
        host = self._host
        peer = conn.muxed_conn.peer_id
        still = host is not None and bool(host.get_network().get_connections(peer))
        if not still:
            self._connected_at.pop(peer_s, None)
            self._last_used.pop(peer_s, None)
            logger.info("disconnected from peer %s", peer_s)

    async def _seed_routing_table(self, peer: ID) -> None:
        """Pitfall 3: add a newly connected peer to the DHT routing table.

        Waits (bounded) for identify to record the peer's listen addresses, so
        that other nodes we pass this entry to can dial it.
        """
        host, dht = self._host, self._dht
        if host is None or dht is None:
            return
        peerstore = host.get_peerstore()
        deadline = trio.current_time() + self.config.dht_seed_wait_s
        delay = 0.01
        while trio.current_time() < deadline:
            if not host.get_network().get_connections(peer):
                return
            try:
                protocols = peerstore.get_protocols(peer)
            except Exception:
                protocols = []
            if protocols:
                break
            await trio.sleep(delay)
            delay = min(delay * 2, 0.2)
        try:
            if not peerstore.addrs(peer):
                return
        except Exception:
            return
        with trio.move_on_after(self.config.dht_seed_wait_s):
            try:
                added = await dht.add_peer(peer)
            except Exception as exc:
                logger.debug("could not add %s to the routing table: %s", peer, exc)
                return
            if added:
                logger.debug("added %s to the DHT routing table", peer)

    async def _connection_manager(self) -> None:
        """Pitfall 5: keep open connections near `max_connections` by pruning idle LRU peers."""
        while True:
            with trio.move_on_after(self.config.prune_interval_s):
                await self._prune_wakeup.wait()
            self._prune_wakeup = trio.Event()
            try:
                await self._prune()
            except Exception as exc:  # never let housekeeping kill the node
                logger.debug("connection pruning failed: %s", exc)
            await trio.sleep(0.05)

    async def _prune(self) -> None:
        host = self._host
        if host is None:
            return
        conns = host.get_network().get_connections_map()
        total = sum(len(c) for c in conns.values())
        excess = total - self.config.max_connections
        if excess <= 0:
            return
        now = time.monotonic()
        candidates: list[tuple[float, ID]] = []
        for peer, peer_conns in conns.items():
            peer_s = str(peer)
            if now - self._connected_at.get(peer_s, 0.0) < self.config.connection_grace_s:
                continue
            if any(_open_streams(c) for c in peer_conns):
                continue
            candidates.append((self._last_used.get(peer_s, 0.0), peer))
        candidates.sort(key=lambda item: item[0])
        victims = [peer for _, peer in candidates[:excess]]
        if not victims:
            return
        logger.info(
            "connection cap %d exceeded (%d open): closing %d idle connections",
            self.config.max_connections,
            total,
            len(victims),
        )
        with trio.move_on_after(self.config.disconnect_timeout_s):
            async with trio.open_nursery() as nursery:
                for peer in victims:
                    nursery.start_soon(self._close_peer, peer)

    # --- connections ------------------------------------------------------------
    async def connect(self, addr: str, timeout: float = 10.0) -> str:
        """Dial a multiaddr ending in `/p2p/<peer id>`; returns the peer id."""
        host = self._require_running()
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise ValueError(f"not a dialable multiaddr with /p2p/<peer id>: {addr!r}") from exc
        peer_s = str(info.peer_id)
        if peer_s == self._peer_id:
            raise ValueError("refusing to connect to ourselves")
        network = host.get_network()
        negative = getattr(network, "_negative_peer_cache", None)
        if negative is not None:
            negative.evict(peer_s)
        try:
            with trio.fail_after(timeout):
                await host.connect(info)
        except trio.TooSlowError as exc:
            raise PeerUnreachable(f"connecting to {addr} timed out after {timeout} s") from exc
        except Exception as exc:
            raise PeerUnreachable(f"cannot connect to {addr}: {exc}") from exc
        self._touch(peer_s)
        return peer_s

    async def disconnect(self, peer_id: str) -> None:
        host = self._require_running()
        with trio.move_on_after(self.config.disconnect_timeout_s):
            with contextlib.suppress(Exception):
                await host.disconnect(ID.from_base58(peer_id))

    def connected_peers(self) -> list[str]:
        if self._host is None:
            return []
        return [
            str(p)
            for p, conns in self._host.get_network().get_connections_map().items()
            if any(not c.is_closed for c in conns)
        ]

    def known_peers(self) -> list[PeerInfo]:
        """Every peer this node knows an address for (connected or not)."""
        if self._host is None:
            return []
        peerstore = self._host.get_peerstore()
        result = []
        for peer in peerstore.peers_with_addrs():
            peer_s = str(peer)
            if peer_s == self._peer_id:
                continue
            try:
                addrs = tuple(str(a) for a in peerstore.addrs(peer))
            except Exception:
                continue
            if addrs:
                result.append(PeerInfo(peer_s, addrs))
        return result

    # --- pubsub -----------------------------------------------------------------
    async def subscribe(self, topic: str) -> Libp2pSubscription:
        self._require_running()
        pubsub = self._pubsub
        assert pubsub is not None
        sub = Libp2pSubscription(self, topic, self.config.subscription_buffer)
        subs = self._subscriptions.setdefault(topic, [])
        subs.append(sub)
        if len(subs) == 1:
            with trio.fail_after(10):
                await pubsub.subscribe(topic)
        return sub

    async def _unsubscribe(self, sub: Libp2pSubscription) -> None:
        subs = self._subscriptions.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subscriptions.pop(sub.topic, None)
            if self._pubsub is not None and self._running:
                with trio.move_on_after(5), contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(sub.topic)

    def _deliver(self, msg: rpc_pb2.Message, via: ID | None) -> None:
        try:
            source = str(ID(msg.from_id))
        except Exception:
            source = ""
        via_s = str(via) if via is not None else source
        for topic in msg.topicIDs:
            for sub in list(self._subscriptions.get(topic, ())):
                sub._offer(TopicMessage(topic=topic, data=msg.data, source=source, via=via_s))

    async def publish(self, topic: str, data: bytes) -> None:
        self._require_running()
        assert self._pubsub is not None
        try:
            with trio.fail_after(10):
                await self._pubsub.publish(topic, data)
        except trio.TooSlowError as exc:
            raise NetworkError(f"publishing on {topic} timed out") from exc

    def set_topic_validator(self, topic: str, validator: TopicValidator) -> None:
        """Check messages on `topic` before delivery and relaying (see `Network`).

        Installed as a synchronous py-libp2p topic validator: Pubsub runs it in
        `push_msg` after the signature check and before marking the message
        seen, delivering it or handing it to the router, for received and for
        our own published messages; py-libp2p caches the verdict per message id.
        """
        if not topic:
            raise ValueError("topic must be a non-empty string")
        self._topic_validators[topic] = validator
        if self._pubsub is not None:
            self._install_topic_validator(topic)

    def _install_topic_validator(self, topic: str) -> None:
        pubsub = self._pubsub
        assert pubsub is not None

        def check(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            validator = self._topic_validators.get(topic)
            if validator is None:
                return True
            try:
                source = str(ID(msg.from_id))
            except Exception:  # a malformed publisher id cannot be valid
                return False
            return topic_validator_accepts(validator, topic, source, msg.data)

        pubsub.set_topic_validator(topic, check, False)

    def topic_peers(self, topic: str) -> list[str]:
        """Connected peers known to be subscribed to `topic`."""
        if self._pubsub is None:
            return []
        connected = set(self.connected_peers())
        return sorted(
            str(p) for p in self._pubsub.peer_topics.get(topic, ()) if str(p) in connected
        )

    # --- request / response -----------------------------------------------------
    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._request_handlers[protocol] = handler
        if self._host is not None:
            self._install_request_handler(protocol)

    def _install_request_handler(self, protocol: str) -> None:
        host = self._require_host()

        async def on_stream(raw: INetStream) -> None:
            await self._serve_request(protocol, raw)

        host.set_stream_handler(TProtocol(protocol), on_stream)

    async def _serve_request(self, protocol: str, raw: INetStream) -> None:
        remote = str(raw.muxed_conn.peer_id)
        stream = Libp2pStream(raw, remote)
        cap = self.config.max_inbound_requests_per_peer
        active = self._inbound_requests.get(remote, 0)
        if active >= cap:
            await self._refuse_request(stream, remote, protocol, cap)
            return
        self._inbound_requests[remote] = active + 1
        try:
            await self._serve_admitted_request(protocol, remote, stream)
        finally:
            left = self._inbound_requests.get(remote, 1) - 1
            if left > 0:
                self._inbound_requests[remote] = left
            else:
                self._inbound_requests.pop(remote, None)

    async def _refuse_request(
        self, stream: Libp2pStream, remote: str, protocol: str, cap: int
    ) -> None:
        """Answer at once that `remote` has too many requests in progress here.

        The request is then read and discarded (bounded in size and time), so a
        caller still writing a large request is not stuck behind a full window.
        """
        logger.debug("refusing a request on %s from %s: %d in progress", protocol, remote, cap)
        message = (
            f"too many concurrent requests from this peer (max_inbound_requests_per_peer={cap})"
        )
        try:
            await self._send_response(stream, _STATUS_ERROR, message.encode())
            budget = _LEN.size + self.config.max_request_bytes
            with trio.move_on_after(self.config.dial_timeout_s):
                while budget > 0 and (chunk := await stream.read(min(budget, 1 << 16))):
                    budget -= len(chunk)
        except NetworkError:
            pass
        finally:
            await stream._release()

    async def _serve_admitted_request(
        self, protocol: str, remote: str, stream: Libp2pStream
    ) -> None:
        """Read one request, run its handler (bounded by `request_handler_timeout_s`), reply."""
        limit = self.config.max_request_bytes
        handler_timeout = self.config.request_handler_timeout_s
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                (length,) = _LEN.unpack(await _read_exactly(stream, _LEN.size))
                if length > limit:
                    await self._send_response(
                        stream,
                        _STATUS_ERROR,
                        f"request of {length} bytes exceeds the peer's "
                        f"max_request_bytes={limit}".encode(),
                    )
                    return
                request = await _read_exactly(stream, length)
            handler = self._request_handlers.get(protocol)
            if handler is None:
                await self._send_response(stream, _STATUS_ERROR, b"no handler")
                return
            response: object = None
            error: str | None = None
            with trio.move_on_after(handler_timeout) as handler_scope:
                try:
                    response = await handler(remote, request)
                except Exception as exc:
                    logger.warning("request handler for %s raised %r", protocol, exc)
                    error = f"handler raised {type(exc).__name__}: {exc}"
            if handler_scope.cancelled_caught:
                logger.warning(
                    "request handler for %s timed out after %g s", protocol, handler_timeout
                )
                error = f"handler for {protocol} timed out after {handler_timeout:g} s"
            if error is not None:
                await self._send_response(stream, _STATUS_ERROR, error.encode())
                return
            if not isinstance(response, bytes | bytearray | memoryview):
                message = f"handler returned {type(response).__name__}, not bytes"
                await self._send_response(stream, _STATUS_ERROR, message.encode())
                return
            response = bytes(response)
            if len(response) > self.config.max_response_bytes:
                message = (
                    f"response of {len(response)} bytes exceeds the peer's "
                    f"max_response_bytes={self.config.max_response_bytes}"
                )
                await self._send_response(stream, _STATUS_ERROR, message.encode())
                return
            await self._send_response(stream, _STATUS_OK, response)
        except (trio.TooSlowError, EOFError, NetworkError) as exc:
            logger.debug("request on %s from %s failed: %s", protocol, remote, exc)
            await stream.reset()
        finally:
            await stream._release()

    async def _send_response(self, stream: Libp2pStream, status: int, payload: bytes) -> None:
        if status != _STATUS_OK:
            payload = payload[:_MAX_ERROR_BYTES]
        with trio.move_on_after(self.config.dial_timeout_s):
            await stream.write(_RESP.pack(status, len(payload)) + payload)
            await stream.close()

    async def request(
        self, peer_id: str, protocol: str, data: bytes, timeout: float = 10.0
    ) -> bytes:
        limit = self.config.max_request_bytes
        if len(data) > limit:
            raise RequestTooLarge(
                f"request of {len(data)} bytes exceeds max_request_bytes={limit}"
            )
        stream = await self.open_stream(peer_id, protocol, timeout=timeout)
        try:
            with trio.fail_after(timeout):
                await stream.write(_LEN.pack(len(data)) + data)
                await stream.close()
                status, length = _RESP.unpack(await _read_exactly(stream, _RESP.size))
                if status == _STATUS_OK and length > self.config.max_response_bytes:
                    raise RequestTooLarge(
                        f"response of {length} bytes from {peer_id} exceeds "
                        f"max_response_bytes={self.config.max_response_bytes}"
                    )
                if status != _STATUS_OK and length > _MAX_ERROR_BYTES:
                    raise RequestFailed(f"malformed error reply from {peer_id}")
                payload = await _read_exactly(stream, length)
        except trio.TooSlowError as exc:
            await stream.reset()
            raise RequestFailed(f"request to {peer_id} on {protocol} timed out") from exc
        except RequestFailed:
            # Before the NetworkError clause (RequestFailed is one): a too-large or
            # malformed reply keeps its type, e.g. RequestTooLarge.
            await stream.reset()
            raise
        except (EOFError, NetworkError) as exc:
            await stream.reset()
            raise RequestFailed(f"request to {peer_id} on {protocol} failed: {exc}") from exc
        finally:
            await stream._release()
        if status != _STATUS_OK:
            text = payload.decode("utf-8", "replace")
            raise RequestFailed(f"{peer_id} answered {protocol} with an error: {text}")
        return payload

    # --- streams ----------------------------------------------------------------
    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler
        if self._host is not None:
            self._install_stream_handler(protocol)

    def _install_stream_handler(self, protocol: str) -> None:
        host = self._require_host()

        async def on_stream(raw: INetStream) -> None:
            remote = str(raw.muxed_conn.peer_id)
            self._touch(remote)
            stream = Libp2pStream(raw, remote)
            handler = self._stream_handlers.get(protocol)
            try:
                if handler is not None:
                    await handler(stream)
            except Exception as exc:
                logger.warning("stream handler for %s raised %r", protocol, exc)
                await stream.reset()
            finally:
                await stream._release()

        host.set_stream_handler(TProtocol(protocol), on_stream)

    async def open_stream(self, peer_id: str, protocol: str, timeout: float = 10.0) -> Libp2pStream:
        host = self._require_running()
        try:
            peer = ID.from_base58(peer_id)
        except Exception as exc:
            raise ValueError(f"malformed peer id {peer_id!r}") from exc
        if not host.get_network().get_connections(peer):
            try:
                has_addrs = bool(host.get_peerstore().addrs(peer))
            except Exception:
                has_addrs = False
            if not has_addrs:
                raise PeerUnreachable(f"no connection to and no address for {peer_id}")
        try:
            with trio.fail_after(timeout):
                raw = await host.new_stream(peer, [TProtocol(protocol)])
        except trio.TooSlowError as exc:
            raise PeerUnreachable(f"opening {protocol} to {peer_id} timed out") from exc
        except Exception as exc:
            if _is_protocol_refusal(exc):
                raise ProtocolNotSupported(f"{peer_id} does not speak {protocol}") from exc
            text = f"{type(exc).__name__}: {exc}"
            raise PeerUnreachable(f"cannot open {protocol} to {peer_id}: {text}") from exc
        self._touch(peer_id)
        return Libp2pStream(raw, peer_id)

    async def open_bulk_stream(self, peer_id: str, protocol: str, timeout: float = 10.0) -> Stream:
        """A stream on a dedicated AES-256-GCM connection with 1 MiB frames (see `bulk.py`).

        The peer is authenticated and the keys agreed over a Noise-secured libp2p
        stream; the bytes then bypass yamux and Noise framing, which bound a
        libp2p stream to ~150 MB/s in pure Python.
        """
        try:
            with trio.fail_after(timeout):
                handshake = await self.open_stream(peer_id, BULK_PROTOCOL, timeout)
                try:
                    remote = handshake.raw.get_remote_address()
                    remote_ip = remote[0] if remote else None
                    return await self._bulk.open(handshake, protocol, remote_ip)
                finally:
                    # `_bulk.open` only half-closes the handshake stream; fully close
                    # it, or it stays in the connection's stream set and the link
                    # counts as in use forever (see `_open_streams`).
                    await _release_shielded(handshake)
        except trio.TooSlowError as exc:
            raise PeerUnreachable(f"opening a bulk stream to {peer_id} timed out") from exc

    async def _on_bulk_handshake(self, raw: INetStream) -> None:
        remote = str(raw.muxed_conn.peer_id)
        self._touch(remote)
        handshake = Libp2pStream(raw, remote)
        try:
            protocol, stream = await self._bulk.accept(
                handshake, lambda p: p in self._stream_handlers
            )
        except NetworkError as exc:  # BulkHandshakeError, or the handshake stream broke
            logger.info("refused a bulk stream from %s: %s", remote, exc)
            return
        finally:
            await _release_shielded(handshake)  # done with it before the transfer starts
        try:
            await self._stream_handlers[protocol](stream)
        except Exception as exc:
            logger.warning("bulk stream handler for %s raised %r", protocol, exc)
            await stream.reset()
        finally:
            await stream.aclose()

    # --- DHT --------------------------------------------------------------------
    def set_record_validator(self, namespace: str, validator: RecordValidator) -> None:
        """Accept DHT records under `/namespace/...` only when `validator` passes them."""
        namespace = namespace.strip("/")
        if not namespace or "/" in namespace:
            raise ValueError(f"a namespace is one path segment, got {namespace!r}")
        self._validators[namespace] = validator
        if self._dht is not None:
            self._dht.register_validator(namespace, _CallbackValidator(validator))

    def _check_key(self, key: str) -> None:
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != "" or not parts[1] or not parts[2]:
            raise ValueError(f"DHT keys look like /namespace/name, got {key!r}")
        if self.config.dht_strict_validation and parts[1] not in self._validators:
            raise ValueError(
                f"no record validator for namespace {parts[1]!r}: "
                "call set_record_validator first"
            )

    async def put_value(self, key: str, value: bytes, timeout: float = 10.0) -> None:
        """Store a record under `key` locally and on the closest peers."""
        self._require_running()
        self._check_key(key)
        validator = self._validators.get(key.split("/")[1])
        if validator is not None:
            validator(key, value)  # raises ValueError naming the problem
        try:
            with trio.fail_after(timeout):
                await self.dht.put_value(key, value)
        except trio.TooSlowError as exc:
            raise NetworkError(f"storing {key} timed out after {timeout} s") from exc
        except ValueError:
            raise
        except Exception as exc:
            raise NetworkError(f"storing {key} failed: {exc}") from exc

    async def get_value(self, key: str, timeout: float = 10.0) -> bytes | None:
        self._require_running()
        self._check_key(key)
        try:
            with trio.fail_after(timeout):
                return await self.dht.get_value(key)
        except trio.TooSlowError:
            return None
        except Exception as exc:
            raise NetworkError(f"looking up {key} failed: {exc}") from exc

    async def provide(self, key: str, timeout: float = 10.0) -> None:
        """Announce that this node can serve the content named `key`."""
        self._require_running()
        try:
            with trio.fail_after(timeout):
                await self.dht.provide(_provider_key(key))
        except trio.TooSlowError as exc:
            raise NetworkError(f"announcing {key} timed out after {timeout} s") from exc
        except Exception as exc:
            raise NetworkError(f"announcing {key} failed: {exc}") from exc

    async def find_providers(self, key: str, timeout: float = 10.0) -> list[PeerInfo]:
        """Providers of `key`, one entry per peer.

        py-libp2p returns duplicates, and stops at its local store when that
        knows any provider; we merge the local store with a network lookup.
        """
        self._require_running()
        dht = self.dht
        key_bytes = bytes.fromhex(_provider_key(key))
        found: list[Any] = list(dht.provider_store.get_providers(key_bytes))
        with trio.move_on_after(timeout):
            try:
                found.extend(await self._find_providers_network(key_bytes))
            except Exception as exc:
                raise NetworkError(f"finding providers of {key} failed: {exc}") from exc
        merged: dict[str, list[str]] = {}
        for info in found:
            addrs = merged.setdefault(str(info.peer_id), [])
            for a in info.addrs:
                if str(a) not in addrs:
                    addrs.append(str(a))
        if self._host is not None:
            peerstore = self._host.get_peerstore()
            for peer_s, addrs in merged.items():
                if not addrs:
                    with contextlib.suppress(Exception):
                        addrs.extend(str(a) for a in peerstore.addrs(ID.from_base58(peer_s)))
        return [PeerInfo(p, tuple(a)) for p, a in merged.items()]

    async def _find_providers_network(self, key: bytes, rounds: int = 4) -> list[Any]:
        store = self.dht.provider_store
        candidates = list(await self.dht.peer_routing.find_closest_peers_network(key))
        queried: set[ID] = set()
        providers: list[Any] = []
        local = self._require_host().get_id()
        for _ in range(rounds):
            batch = [p for p in candidates if p not in queried and p != local][:10]
            if not batch:
                break
            queried.update(batch)
            closer: list[ID] = []

            async def ask(peer: ID, closer: list[ID] = closer) -> None:
                with trio.move_on_after(5):
                    try:
                        got, nearer = await store._get_providers_from_peer_with_closers(
                            peer, key
                        )
                    except Exception:
                        return
                    providers.extend(got)
                    closer.extend(nearer)

            async with trio.open_nursery() as nursery:
                for peer in batch:
                    nursery.start_soon(ask, peer)
            candidates = [p for p in dict.fromkeys(closer) if p not in queried]
        return providers

    async def find_peer(self, peer_id: str, timeout: float = 10.0) -> PeerInfo | None:
        host = self._require_running()
        try:
            peer = ID.from_base58(peer_id)
        except Exception as exc:
            raise ValueError(f"malformed peer id {peer_id!r}") from exc
        if host.get_network().get_connections(peer):
            with contextlib.suppress(Exception):
                addrs = host.get_peerstore().addrs(peer)
                if addrs:
                    return PeerInfo(peer_id, tuple(str(a) for a in addrs))
        info = None
        with trio.move_on_after(timeout):
            try:
                info = await self.dht.find_peer(peer)
            except Exception as exc:
                logger.debug("find_peer(%s) failed: %s", peer_id, exc)
                info = None
        if info is None or not info.addrs:
            return None
        return PeerInfo(peer_id, tuple(dict.fromkeys(str(a) for a in info.addrs)))


# Long-lived streams that every connection carries; they do not mark a link as in use.
_BACKGROUND_PROTOCOLS = frozenset(
    {"/floodsub/1.0.0", "/meshsub/1.0.0", "/meshsub/1.1.0", "/meshsub/1.2.0", "/meshsub/1.3.0",
     "/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0", "/ipfs/kad/1.0.0"}
)


def _open_streams(conn: INetConn) -> int:
    """Streams on `conn` opened by the application (pubsub, identify, DHT excluded)."""
    try:
        streams = conn.get_streams()
    except Exception:
        return 0
    count = 0
    for stream in streams:
        try:
            protocol = str(stream.get_protocol())
        except Exception:
            protocol = ""
        if protocol not in _BACKGROUND_PROTOCOLS:
            count += 1
    return count


__all__ = [
    "Libp2pConfig",
    "Libp2pNetwork",
    "Libp2pStream",
    "Libp2pSubscription",
    "RequestTooLarge",
    "quiet_libp2p_loggers",
]

