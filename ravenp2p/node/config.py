"""Settings of a `ravenp2p node`, validated with errors that name the setting."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import multiaddr

from consensus.abi import checksum_address
from ravenp2p.network.memory import MEMORY_SCHEME, parse_memory_addr
from ravenp2p.node.control import check_socket_path
from ravenp2p.node.metrics import DEFAULT_HOST as DEFAULT_METRICS_HOST
from ravenp2p.node.metrics import check_host, check_port
from ravenp2p.topics import TopicConfig
from ravenp2p.wire import WireLimits


class ConfigError(ValueError):
    """A node setting is invalid; the message names the setting and the reason."""


def check_multiaddr(setting: str, value: str, *, need_peer_id: bool = False) -> str:
    """Parse a multiaddr, raising `ConfigError` naming `setting` when it is malformed.

    Besides IP/TCP addresses, the in-process network's `/memory/<n>/p2p/<peer id>`
    is accepted: the simulator's nodes bootstrap through each other with it.
    """
    if value.startswith(f"/{MEMORY_SCHEME}/"):
        try:
            parse_memory_addr(value)
        except ValueError as exc:
            raise ConfigError(f"{setting}: {exc}") from None
        return value
    try:
        parsed = multiaddr.Multiaddr(value)
    except Exception as exc:  # the multiaddr package raises several error types
        raise ConfigError(f"{setting}: {value!r} is not a valid multiaddr ({exc})") from None
    protocols = [p.name for p in parsed.protocols()]
    if not {"ip4", "ip6", "dns", "dns4", "dns6"} & set(protocols) or "tcp" not in protocols:
        raise ConfigError(f"{setting}: {value!r} must name an IP address and a TCP port")
    if need_peer_id and "p2p" not in protocols:
        raise ConfigError(f"{setting}: {value!r} must end with /p2p/<peer id>")
    return value


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start; built from CLI flags or a config file."""

    data_dir: Path
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    device: str = "cpu"
    share: int = 0
    """Percent of the device lent to the network (0: join, but compute nothing)."""
    consent: bool = False
    announce_interval_s: float = 20.0
    follow_peers: bool = True
    """Keep a directory of every peer's capability (read the peers topic). Masters and
    requesters need it; in a big network a node that only computes may skip it and
    still announce itself (to the peers that follow)."""
    peer_expiry_s: float = 90.0
    join_timeout_s: float = 60.0
    max_known_peers: int = 10_000
    shutdown_timeout_s: float = 4.5
    control: bool = True
    master: bool = False
    """Also act as a master: accept jobs from requesters and run them."""
    max_threads: int = 1
    """Upper bound on torch threads per calculation."""
    max_blob_bytes: int | None = 8 * 1024**3
    """Disk the blob store (shards, weights, results) may use; unpinned blobs are evicted."""
    chain_url: str | None = None
    """JSON-RPC URL of the Ethereum node that holds stakes and escrows (None: unpaid jobs only)."""
    contracts: Path | None = None
    """The deployment file (chain id and contract addresses) that goes with `chain_url`."""
    stake: int = 0
    """Base units of RAVEN the node keeps staked: topped up from its balance at start."""
    candidate: bool = False
    """Stand as a master candidate for the committee (needs the registry's minimum stake)."""
    partner: str | None = None
    """The website partner (an address) that earns 3% on top of this node's accepted work."""
    metrics_port: int | None = None
    """TCP port of the Prometheus metrics endpoint (None: no endpoint; 0: any free port)."""
    metrics_host: str = DEFAULT_METRICS_HOST
    """Address the metrics endpoint listens on: this machine only unless opened up."""
    limits: WireLimits = field(default_factory=WireLimits)
    topics: TopicConfig = field(default_factory=TopicConfig)
    """Resync tuning of the reliable topics (simulations of big networks slow it down)."""

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("listen: at least one address is needed")
        for addr in self.listen:
            check_multiaddr("listen", addr)
        for addr in self.bootstrap:
            check_multiaddr("bootstrap", addr, need_peer_id=True)
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: must be 'cpu' or 'cuda', not {self.device!r}")
        if not 0 <= self.share <= 100:
            raise ConfigError(f"share: must be a percentage between 0 and 100, not {self.share}")
        if self.announce_interval_s <= 0 or self.peer_expiry_s <= self.announce_interval_s:
            raise ConfigError("peer_expiry_s: must be longer than announce_interval_s")
        if not 1 <= self.max_threads <= 256:
            raise ConfigError(f"max_threads: must be between 1 and 256, not {self.max_threads}")
        if self.max_blob_bytes is not None and self.max_blob_bytes < 1024**2:
            raise ConfigError("max_blob_bytes: must be at least 1 MiB")
        if self.chain_url is not None:
            if not self.chain_url.startswith(("http://", "https://")):
                raise ConfigError(f"chain: {self.chain_url!r} must be an http(s):// JSON-RPC URL")
            if self.contracts is None:
                raise ConfigError("contracts: a deployment file is needed with --chain")
        elif self.contracts is not None or self.stake or self.candidate or self.partner:
            raise ConfigError(
                "chain: --contracts, --stake, --candidate and --partner need --chain URL"
            )
        if self.partner is not None:
            try:
                checksum_address(self.partner)
            except ValueError as exc:
                raise ConfigError(f"partner: {exc}") from None
        if self.stake < 0:
            raise ConfigError(f"stake: must not be negative, not {self.stake}")
        try:
            if self.metrics_port is not None:
                check_port(self.metrics_port)
        except ValueError as exc:
            raise ConfigError(f"metrics_port: {exc}") from None
        try:
            check_host(self.metrics_host)
        except ValueError as exc:
            raise ConfigError(f"metrics_host: {exc}") from None
        if self.control:
            try:
                check_socket_path(self.data_dir)
            except ValueError as exc:
                raise ConfigError(f"data_dir: {exc}") from None
