"""`ravenp2p devnet`: a whole network of real libp2p nodes on loopback, in one process.

Today it shows the node layer working end to end: N nodes join through the
first one, discover each other (peers topic and DHT), verify each other's
signed capability records, and shut down cleanly.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ravenp2p.identity import create_identity
from ravenp2p.network.libp2p import Libp2pNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.node import Node

log = logging.getLogger("ravenp2p.devnet")


class DevnetError(RuntimeError):
    """The devnet did not reach the expected state in time."""


@dataclass(frozen=True)
class DevnetReport:
    """What a devnet run observed."""

    nodes: list[dict[str, Any]]
    seconds_to_discover: float
    dht_lookups: int
    dht_lookups_found: int

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "seconds_to_discover": self.seconds_to_discover,
            "dht_lookups": self.dht_lookups,
            "dht_lookups_found": self.dht_lookups_found,
        }


async def run_devnet(nodes: int = 5, timeout: float = 60.0, share: int = 10) -> DevnetReport:
    """Start `nodes` nodes, wait until every node knows every other, then stop them all."""
    if nodes < 2:
        raise ValueError("a devnet needs at least 2 nodes")
    with tempfile.TemporaryDirectory(prefix="ravenp2p-devnet-") as tmp:
        started: list[Node] = []
        async with trio.open_nursery() as nursery:
            begin = time.monotonic()
            for i in range(nodes):
                data_dir = Path(tmp) / f"node{i}"
                identity = create_identity(data_dir)
                bootstrap = tuple(started[0].network.listen_addrs[:1]) if started else ()
                config = NodeConfig(
                    data_dir=data_dir, bootstrap=bootstrap, share=share, consent=True,
                    control=False, announce_interval_s=5.0, peer_expiry_s=30.0,
                )
                node = Node(Libp2pNetwork(identity), identity, config)
                await nursery.start(node.run)
                started.append(node)
            log.info("Started %d nodes; waiting until each has discovered the others", nodes)
            try:
                with trio.fail_after(timeout):
                    for node in started:
                        await node.wait_for_peers(nodes - 1)
                    discovered_after = time.monotonic() - begin
                    lookups = found = 0
                    for i, node in enumerate(started):
                        target = started[(i + 1) % nodes]
                        lookups += 1
                        record = await node.fetch_capability(target.peer_id)
                        info = await node.find_peer(target.peer_id)
                        verified = record is not None and record.address == target.identity.address
                        if verified and info is not None:
                            found += 1
            except trio.TooSlowError:
                counts = [len(n.directory) for n in started]
                raise DevnetError(
                    f"nodes did not discover each other within {timeout:.0f} s "
                    f"(peers known per node: {counts})"
                ) from None
            finally:
                rows = [
                    {
                        "peer_id": n.peer_id,
                        "address": n.identity.address,
                        "listen_addrs": n.network.listen_addrs,
                        "peers_known": len(n.directory),
                        "peers_connected": len(n.network.connected_peers()),
                    }
                    for n in started
                ]
                for node in started:
                    node.stop()
        return DevnetReport(rows, round(discovered_after, 3), lookups, found)
