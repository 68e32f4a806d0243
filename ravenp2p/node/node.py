"""A ravenp2p node: joins the network, announces what it offers, keeps a directory of peers.

The node is written against the `Network` and `Clock` interfaces, so the same
code runs as the `ravenp2p node` daemon (on `Libp2pNetwork`) and inside the
simulator (on `MemoryNetwork` and a virtual clock).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ravenp2p import __version__
from ravenp2p.chain.base import Chain
from ravenp2p.clock import Clock, SystemClock
from ravenp2p.data.blobs import BlobService
from ravenp2p.data.store import BlobStore
from ravenp2p.identity import NodeIdentity, address_of, public_key_of_peer
from ravenp2p.network.base import Network, NetworkError, PeerInfo, PeerUnreachable
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.control import HANDLER_TIMEOUT_S, ControlHandler, ControlOp, serve_control
from ravenp2p.topics import ReliableTopics
from ravenp2p.wire import CapabilityRecord, EnvelopeCodec, WireError

CAPABILITY_NAMESPACE = "ravenp2p-cap"
PEERS_TOPIC = "/ravenp2p/peers/1"
PEER_CACHE_FILE = "peers.json"
BLOB_FOLDER = "blobs"
MAX_CACHED_PEERS = 64

log = logging.getLogger("ravenp2p.node")

Role = Callable[..., Awaitable[Any]]
"""A role's `run(*, task_status)`: started in the node's nursery with `nursery.start`."""


def capability_key(peer_id: str) -> str:
    """DHT key under which a node's signed capability record is stored."""
    return f"/{CAPABILITY_NAMESPACE}/{peer_id}"


def short(peer_id: str) -> str:
    """A peer id shortened for log lines (`16Uiu2H…k3Xq`)."""
    return f"{peer_id[:7]}…{peer_id[-4:]}" if len(peer_id) > 14 else peer_id


@dataclass
class KnownPeer:
    """What this node knows about another peer."""

    peer_id: str
    capability: CapabilityRecord | None
    last_seen: float

    def describe(self) -> str:
        cap = self.capability
        if cap is None:
            return "no capability record yet"
        lending = f"lends {cap.share}% of its {cap.device}" if cap.share else "computes nothing"
        return f"{cap.address}, {lending}"


class Node:
    """One peer of the ravenp2p network.

    `await nursery.start(node.run)` starts the network, joins through the
    bootstrap peers, announces the node's capability record (DHT and the peers
    topic) and serves the control endpoint; `node.stop()` shuts it down cleanly
    (peers disconnected, peer cache written) within the configured timeout.
    """

    def __init__(
        self,
        network: Network,
        identity: NodeIdentity,
        config: NodeConfig,
        clock: Clock | None = None,
        chain: Chain | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if network.peer_id != identity.peer_id:
            raise ValueError("the network and the identity belong to different peers")
        self.network = network
        self.identity = identity
        self.config = config
        self.chain = chain
        """The node's account on the chain that holds stakes and escrows; None: unpaid jobs only."""
        self.clock = clock or SystemClock()
        self.codec = EnvelopeCodec(identity, config.limits, now=self.clock.now)
        # DHT records are re-read many times; their validator checks signatures and
        # freshness but keeps no replay state.
        self._record_codec = EnvelopeCodec(identity, config.limits, now=self.clock.now)
        self.rng = rng or random.Random()
        """Jitter and sampling; the simulator seeds it so that a run can be repeated exactly."""
        self.topics = ReliableTopics(
            network, self.codec, self.clock, config.topics,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        self.directory: dict[str, KnownPeer] = {}
        self.directory_version = 0
        """Bumped whenever a peer enters or leaves the directory or changes its record."""
        self.joined = trio.Event()
        self._directory_changed = trio.Event()
        self._reachable: dict[str, str] = {}
        self._stop = trio.Event()
        self._started_at = 0.0
        self._roles: list[Role] = []
        self._control_ops: dict[str, ControlOp] = {
            "peers": ControlOp(self._control_peers),
            "status": ControlOp(self._control_status),
            "find_peer": ControlOp(self._control_find_peer),
        }
        self.store = BlobStore(Path(config.data_dir) / BLOB_FOLDER, max_bytes=config.max_blob_bytes)
        self.blobs = BlobService(network, self.store)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def peer_with_address(self, address: str) -> str | None:
        """The known peer whose key has this Ethereum address (derived, never taken on trust)."""
        wanted = address.lower()
        for peer_id in self.directory:
            try:
                if address_of(public_key_of_peer(peer_id)).lower() == wanted:
                    return peer_id
            except ValueError:
                continue
        return None

    def capability(self) -> CapabilityRecord:
        """This node's own capability record, as announced."""
        return CapabilityRecord(
            address=self.identity.address,
            device=self.config.device,
            share=self.config.share,
            version=__version__,
            addrs=tuple(self.network.listen_addrs[:16]),
            consent=self.config.consent,
        )

    def add_role(self, role: Role) -> None:
        """Run `role` (a `run(task_status=...)` function) while the node is up.

        Roles start after the network, the topics layer and the blob service,
        in the order added, and are cancelled before the network stops.
        """
        self._roles.append(role)

    def add_control_op(
        self, name: str, handler: ControlHandler, timeout_s: float = HANDLER_TIMEOUT_S
    ) -> None:
        """Answer the control request `{"op": name, ...}` with `handler` (a role's, say)."""
        if name in self._control_ops:
            raise ValueError(f"control operation {name!r} is already registered")
        self._control_ops[name] = ControlOp(handler, timeout_s)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the node to shut down; `run` returns once peers are disconnected."""
        self._stop.set()

    # --- lifecycle -----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `stop()` is called or the surrounding scope is cancelled."""
        self.network.set_record_validator(CAPABILITY_NAMESPACE, self._validate_capability)
        async with self.network:
            self._started_at = self.clock.now()
            addrs = ", ".join(self.network.listen_addrs)
            log.info("Node %s is up, listening on %s", self.peer_id, addrs)
            log.info("Its payout address is %s", self.identity.address)
            if self.config.share and not self.config.consent:
                log.info(
                    "Share is %d%% but consent was not given: this node will not compute",
                    self.config.share,
                )
            async with self.blobs.running(), trio.open_nursery() as nursery:
                await nursery.start(self.topics.run)
                if self.config.follow_peers:
                    peers = await self.topics.subscribe(PEERS_TOPIC)
                    nursery.start_soon(self._read_peer_announcements, peers)
                nursery.start_soon(self._join)
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._expire_loop)
                for role in self._roles:
                    await nursery.start(role)
                if self.config.control:  # last: every operation a role added can be served
                    await nursery.start(serve_control, self.config.data_dir, self._control_ops)
                task_status.started(self)
                await self._stop.wait()
                connected = len(self.network.connected_peers())
                log.info(
                    "Shutting down: disconnecting from %d peer%s",
                    connected, "" if connected == 1 else "s",
                )
                self._save_peer_cache()
                nursery.cancel_scope.cancel()
        log.info("Node %s stopped", short(self.peer_id))

    # --- joining ----------------------------------------------------------------------
    async def _join(self) -> None:
        candidates = list(self.config.bootstrap) + self._load_peer_cache()
        if not candidates:
            log.info("No bootstrap peers given: waiting for others to connect to this node")
            self.joined.set()
            await self._announce()
            return
        delay = 0.5
        deadline = self.clock.now() + self.config.join_timeout_s
        while True:
            for addr in candidates:
                try:
                    peer = await self.network.connect(addr, timeout=5.0)
                except NetworkError as exc:
                    log.debug("Could not reach %s: %s", addr, exc)
                    continue
                log.info("Joined the network through %s", short(peer))
                self.joined.set()
                self.topics.sync_soon()
                # Gossip reaches a neighbour only once it has seen our subscription.
                for _ in range(40):
                    if self.network.topic_peers(PEERS_TOPIC):
                        break
                    await self.clock.sleep(0.05)
                await self._announce()
                return
            if self.clock.now() > deadline:
                log.warning(
                    "Could not reach any of %d bootstrap peers for %.0f s; still trying",
                    len(candidates), self.config.join_timeout_s,
                )
                deadline = self.clock.now() + self.config.join_timeout_s
            await self.clock.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _announce(self) -> None:
        record = self.capability()
        await self.topics.publish(PEERS_TOPIC, record)
        key = capability_key(self.peer_id)
        raw = self.codec.seal(record, context=key)
        try:
            await self.network.put_value(key, raw, timeout=10.0)
        except NetworkError as exc:
            log.debug("Could not store the capability record in the DHT yet: %s", exc)

    async def _announce_loop(self) -> None:
        await self.joined.wait()
        while True:
            jitter = 0.8 + 0.4 * self.rng.random()
            await self.clock.sleep(self.config.announce_interval_s * jitter)
            await self._announce()

    # --- the peer directory -----------------------------------------------------------
    async def _read_peer_announcements(self, channel: trio.MemoryReceiveChannel[Any]) -> None:
        async for envelope in channel:
            record = envelope.message
            if not isinstance(record, CapabilityRecord) or envelope.sender == self.peer_id:
                continue
            self._note_peer(envelope.sender, record)

    def _note_peer(self, peer_id: str, record: CapabilityRecord | None) -> None:
        now = self.clock.now()
        if record is not None:
            # A record may only advertise addresses of its own signer.
            own = tuple(a for a in record.addrs if a.endswith(f"/p2p/{peer_id}"))
            if own != record.addrs:
                record = dataclasses.replace(record, addrs=own)
        known = self.directory.get(peer_id)
        if known is None:
            if len(self.directory) >= self.config.max_known_peers:
                log.debug("Peer directory full; not recording %s", short(peer_id))
                return
            known = self.directory[peer_id] = KnownPeer(peer_id, record, now)
            self.directory_version += 1
            log.info("Discovered peer %s (%s)", short(peer_id), known.describe())
            self._directory_changed.set()
            self._directory_changed = trio.Event()
            return
        known.last_seen = max(known.last_seen, now)
        if record is not None and record != known.capability:
            known.capability = record
            self.directory_version += 1

    async def _expire_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.announce_interval_s)
            now = self.clock.now()
            connected = set(self.network.connected_peers())
            self._remember_reachable()
            for peer_id, known in list(self.directory.items()):
                if peer_id in connected:
                    known.last_seen = now
                elif now - known.last_seen > self.config.peer_expiry_s:
                    del self.directory[peer_id]
                    self.directory_version += 1
                    log.info("Peer %s left (not heard from for %.0f s)", short(peer_id),
                             now - known.last_seen)

    def peers(self) -> list[dict[str, Any]]:
        """The peers this node knows, as JSON-ready objects (one per peer id)."""
        now = self.clock.now()
        connected = set(self.network.connected_peers())
        addrs = {info.peer_id: info.addrs for info in self.network.known_peers()}
        ids = (set(self.directory) | connected) - {self.peer_id}
        rows = []
        for peer_id in sorted(ids):
            known = self.directory.get(peer_id)
            cap = known.capability if known else None
            rows.append(
                {
                    "peer_id": peer_id,
                    "address": cap.address if cap else None,
                    "device": cap.device if cap else None,
                    "share": cap.share if cap else None,
                    "version": cap.version if cap else None,
                    "addrs": list(cap.addrs) if cap else list(addrs.get(peer_id, ())),
                    "connected": peer_id in connected,
                    "last_seen_s_ago": round(now - known.last_seen, 1) if known else 0.0,
                }
            )
        return rows

    async def wait_for_peers(self, count: int) -> None:
        """Return once the directory holds `count` other peers; bound it with a timeout."""
        while len(self.directory) < count:
            await self._directory_changed.wait()

    async def find_peer(self, peer_id: str, timeout: float = 10.0) -> PeerInfo | None:
        """Look a peer up by id through the DHT."""
        return await self.network.find_peer(peer_id, timeout=timeout)

    async def reach(self, peer_id: str, timeout: float = 10.0) -> None:
        """Make sure a connection to `peer_id` is open before a request that must get through.

        Links come and go (a peer restarts, an idle link is closed); a peer
        this node knows is dialled again at the addresses its capability
        record advertises, else wherever the DHT says it is. Raises
        `NetworkError` when none of them answers.
        """
        if peer_id in self.network.connected_peers():
            return
        known = self.directory.get(peer_id)
        addrs = list(known.capability.addrs) if known and known.capability else []
        if not addrs:
            info = await self.find_peer(peer_id, timeout=timeout)
            addrs = [f"{addr}/p2p/{peer_id}" if "/p2p/" not in addr else addr
                     for addr in (info.addrs if info else ())]
        failures = []
        for addr in addrs:
            try:
                await self.network.connect(addr, timeout=timeout)
                return
            except NetworkError as exc:
                failures.append(f"{addr}: {exc}")
        raise PeerUnreachable(
            f"cannot reach {peer_id}: " + ("; ".join(failures) or "no known address")
        )

    async def fetch_capability(
        self, peer_id: str, timeout: float = 10.0
    ) -> CapabilityRecord | None:
        """Read a peer's capability record from the DHT; `WireError` if it does not verify."""
        key = capability_key(peer_id)
        raw = await self.network.get_value(key, timeout=timeout)
        return None if raw is None else self._open_capability(key, raw)

    def _open_capability(self, key: str, value: bytes) -> CapabilityRecord:
        envelope = self._record_codec.open(value, context=key, check_replay=False)
        if not isinstance(envelope.message, CapabilityRecord):
            raise WireError("type", f"a capability record was expected, not {envelope.type}")
        if key != capability_key(envelope.sender):
            raise WireError("sender", f"record for {key} signed by {envelope.sender}")
        return envelope.message

    def _validate_capability(self, key: str, value: bytes) -> None:
        """DHT record validator for the capability namespace."""
        self._open_capability(key, value)

    # --- control endpoint -------------------------------------------------------------
    async def _control_peers(self, request: dict[str, Any]) -> Any:
        return self.peers()

    async def _control_status(self, request: dict[str, Any]) -> Any:
        return {
            "peer_id": self.peer_id,
            "address": self.identity.address,
            "listen_addrs": self.network.listen_addrs,
            "connected_peers": len(self.network.connected_peers()),
            "known_peers": len(self.directory),
            "uptime_s": round(self.clock.now() - self._started_at, 1),
            "version": __version__,
            "chain_id": None if self.chain is None else self.chain.deployment.chain_id,
        }

    async def _control_find_peer(self, request: dict[str, Any]) -> Any:
        peer_id = request.get("peer_id")
        if not isinstance(peer_id, str):
            raise ValueError('find_peer needs a "peer_id" string')
        info = await self.find_peer(peer_id)
        return None if info is None else {"peer_id": info.peer_id, "addrs": list(info.addrs)}

    # --- state kept across restarts -------------------------------------------------
    def _peer_cache_path(self) -> Path:
        return Path(self.config.data_dir) / PEER_CACHE_FILE

    def _remember_reachable(self) -> None:
        """Note an address of each peer we are connected to: they are known to work."""
        connected = set(self.network.connected_peers())
        for info in self.network.known_peers():
            if info.peer_id in connected and info.addrs:
                addr = info.addrs[0]
                self._reachable.pop(info.peer_id, None)
                self._reachable[info.peer_id] = (
                    addr if "/p2p/" in addr else f"{addr}/p2p/{info.peer_id}"
                )
        while len(self._reachable) > MAX_CACHED_PEERS:
            del self._reachable[next(iter(self._reachable))]

    def _save_peer_cache(self) -> None:
        """Write the addresses that worked most recently, for the next start."""
        self._remember_reachable()
        addrs = list(reversed(self._reachable.values()))
        path = self._peer_cache_path()
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"addrs": addrs}))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("Could not save the peer cache to %s: %s", path, exc)

    def _load_peer_cache(self) -> list[str]:
        path = self._peer_cache_path()
        try:
            data = json.loads(path.read_text())
            addrs = data.get("addrs", []) if isinstance(data, dict) else []
            return [a for a in addrs if isinstance(a, str)][:MAX_CACHED_PEERS]
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("Ignoring an unreadable peer cache %s: %s", path, exc)
            return []
