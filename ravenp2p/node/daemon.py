"""`ravenp2p node`: run one node on real py-libp2p until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import signal

import trio

from consensus.abi import checksum_address
from ravenp2p.chain.base import Chain
from ravenp2p.identity import NodeIdentity, load_or_create_identity
from ravenp2p.market.role import ModelCatalog
from ravenp2p.network.libp2p import Libp2pConfig, Libp2pNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.datadir import RESULTS_FOLDER, data_dir_lock
from ravenp2p.node.metrics import NodeMetrics, is_loopback, metrics_url, serve_metrics
from ravenp2p.node.node import Node
from ravenp2p.roles.committee import CommitteeView
from ravenp2p.roles.master import Master
from ravenp2p.roles.requester import Requester
from ravenp2p.roles.worker import Worker, WorkerConfig

log = logging.getLogger("ravenp2p.node")

# The daemon promises to stop within 5 s of a signal: disconnecting peers and
# stopping libp2p's services are bounded so that, with the rest of shutdown,
# they fit inside `NodeConfig.shutdown_timeout_s`.
DAEMON_NETWORK_CONFIG = Libp2pConfig(disconnect_timeout_s=1.5, stop_timeout_s=2.5)


# A signal sent to a whole process group (a shell's `timeout`, some supervisors)
# can arrive twice at once; only a later one means "stop now".
REPEAT_SIGNAL_GRACE_S = 1.0


async def _stop_on_signal(node: Node, scope: trio.CancelScope, timeout: float) -> None:
    first_at: float | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            now = trio.current_time()
            if first_at is None:
                first_at = now
                log.info("Received %s: stopping (at most %.1f s)", signal.Signals(signum).name,
                         timeout)
                node.stop()
                scope.deadline = min(scope.deadline, now + timeout)
            elif now - first_at > REPEAT_SIGNAL_GRACE_S:
                log.warning("Second signal: stopping now")
                scope.cancel()


async def _start_metrics(nursery: trio.Nursery, config: NodeConfig, metrics: NodeMetrics) -> None:
    """Listen for scrapes before the node joins, so a port already taken fails the start."""
    assert config.metrics_port is not None
    host = config.metrics_host
    port = await nursery.start(serve_metrics, host, config.metrics_port, metrics.collect)
    scope = "" if is_loopback(host) else " (reachable from other machines)"
    log.info("Serving Prometheus metrics at %s%s", metrics_url(host, port), scope)


async def open_chain(config: NodeConfig, identity: NodeIdentity) -> Chain:
    """Connect the node's key to the chain, top its stake up, stand as candidate if asked.

    Raises `ChainError` naming the URL or the contract's reason, `ValueError`
    for a deployment file that is unreadable or belongs to another chain.
    """
    from ravenp2p.chain.deploy import load_deployment
    from ravenp2p.chain.devchain import connect
    from ravenp2p.chain.web3chain import Web3Chain

    assert config.chain_url is not None and config.contracts is not None
    w3 = connect(config.chain_url)
    deployment = load_deployment(config.contracts)
    if w3.eth.chain_id != deployment.chain_id:
        raise ValueError(
            f"contracts: {config.contracts} is a deployment on chain {deployment.chain_id}, "
            f"but {config.chain_url} is chain {w3.eth.chain_id}"
        )
    chain = Web3Chain(w3, deployment, identity.private_key.secret)
    staked = (await chain.stake_of(chain.address)).active
    if config.stake > staked:
        await chain.stake(config.stake - staked)
        staked = config.stake
    if config.candidate and chain.address not in await chain.candidates():
        await chain.become_candidate()
    if config.partner is not None:
        partner = checksum_address(config.partner)
        if await chain.partner_of(chain.address) != partner:
            await chain.set_partner(partner)
        log.info("Website partner %s earns 3%% on top of this node's accepted work", partner)
    log.info("On chain %d as %s: %d base units staked, %d in the wallet%s",
             deployment.chain_id, chain.address, staked, await chain.balance_of(chain.address),
             ", master candidate" if config.candidate else "")
    return chain


async def run_daemon(config: NodeConfig) -> None:
    """Load or create the node key, start the node, and stop it cleanly on a signal."""
    with data_dir_lock(config.data_dir):
        await _run_locked(config)


async def _run_locked(config: NodeConfig) -> None:
    identity, created = load_or_create_identity(config.data_dir)
    if created:
        log.info("Created a new node key in %s", config.data_dir)
    chain = await open_chain(config, identity) if config.chain_url else None
    network = Libp2pNetwork(identity, config.listen, DAEMON_NETWORK_CONFIG)
    node = Node(network, identity, config, chain=chain)
    worker = Worker(node, WorkerConfig(max_threads=config.max_threads))
    node.add_role(worker.run)
    committee = CommitteeView(chain) if chain is not None else None
    if committee is not None:
        node.add_role(committee.run)
    master = Master(node, committee=committee) if config.master or config.candidate else None
    if master is not None:
        node.add_role(master.run)
    requester = Requester(node, results_dir=config.data_dir / RESULTS_FOLDER)
    node.add_role(requester.run)
    node.add_role(ModelCatalog(node, results_dir=requester.results_dir).run)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, node, nursery.cancel_scope, config.shutdown_timeout_s)
        if config.metrics_port is not None:
            await _start_metrics(nursery, config, NodeMetrics(node, worker=worker, master=master))
        await node.run()
        nursery.cancel_scope.cancel()
