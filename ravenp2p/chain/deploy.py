"""Deploying the contracts, and the deployment file nodes read to find them.

The defaults are devnet figures (short master timeout, one-hour epochs, an
owner-set RAVEN/USD price); a public deployment passes its own `DeployParams`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_utils import to_checksum_address
from web3 import Web3

from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import ChainError, Deployment
from ravenp2p.chain.errors import chain_errors
from ravenp2p.chain.sender import TransactionSender

logger = logging.getLogger("ravenp2p.chain")

RAVEN = 10**18
PRICE_FEED_DECIMALS = 8
"""Decimals of the deployed RAVEN/USD feed's answers, as Chainlink's USD feeds use."""
PRICE_FEED_DESCRIPTION = "RAVEN / USD"


@dataclass(frozen=True)
class DeployParams:
    """Constructor parameters of the registry and the escrow (docs/economics.md).

    The defaults suit a devnet: 100 RAVEN to stand as master, a day of
    unbonding, one-hour epochs, a committee of 3 out of at most 64 candidates,
    equivocation costs the whole stake (10% of it to the reporter), a
    silent master is replaced after 10 s (the failover timeout nodes use), and
    the deployer's price feed starts at 1 RAVEN = 0.50 USD (`usd_per_raven`,
    with `PRICE_FEED_DECIMALS` decimals; the deployer updates it with `setPrice`).
    """

    min_master_stake: int = 100 * RAVEN
    unbonding_delay: int = 24 * 3600
    epoch_length: int = 3600
    committee_size: int = 3
    max_candidates: int = 64
    equivocation_slash_bps: int = 10_000
    reporter_share_bps: int = 1_000
    master_timeout: int = 10
    usd_per_raven: int = 50_000_000

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"deploy parameter {name} must be a non-negative integer")


def _deploy(sender: TransactionSender, name: str, *args: object) -> str:
    artifact = load_artifact(name)
    factory = sender.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    init_code = factory.constructor(*args).data_in_transaction
    receipt = sender.deploy(name, init_code)
    address = receipt["contractAddress"]
    if address is None:
        raise ChainError(f"{name}: the deployment receipt names no contract address")
    logger.info("deployed %s at %s (gas %d)", name, address, receipt["gasUsed"])
    return str(address)


def deploy_contracts(
    w3: Web3,
    deployer_secret: bytes,
    params: DeployParams | None = None,
    treasury: str | None = None,
) -> Deployment:
    """Deploy token, registry, escrow and price feed; the deployer owns the token and the feed.

    `treasury` receives protocol fees and slashed stake; it defaults to the
    deployer's address.
    """
    params = params or DeployParams()
    sender = TransactionSender(w3, deployer_secret)
    treasury = str(to_checksum_address(treasury)) if treasury else sender.address
    token = _deploy(sender, "RavenToken")
    registry = _deploy(
        sender,
        "StakeRegistry",
        token,
        treasury,
        params.min_master_stake,
        params.unbonding_delay,
        params.epoch_length,
        params.committee_size,
        params.max_candidates,
        params.equivocation_slash_bps,
        params.reporter_share_bps,
    )
    escrow = _deploy(sender, "JobEscrow", token, registry, treasury, params.master_timeout)
    feed = _deploy(
        sender, "PriceFeed", PRICE_FEED_DESCRIPTION, PRICE_FEED_DECIMALS, params.usd_per_raven
    )
    with chain_errors(w3, "chain", "eth_chainId"):
        chain_id = w3.eth.chain_id
    return Deployment(
        chain_id=chain_id, token=token, registry=registry, escrow=escrow, price_feed=feed
    )


def save_deployment(deployment: Deployment, path: Path) -> None:
    """Write the deployment as JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(deployment.to_dict(), handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_deployment(path: Path) -> Deployment:
    """Read a deployment file written by `save_deployment`, naming the file in any error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChainError(f"no deployment file at {path}") from None
    except (OSError, ValueError) as exc:
        raise ChainError(f"deployment file {path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ChainError(f"deployment file {path} does not hold a JSON object")
    try:
        return Deployment.from_dict(data)
    except ValueError as exc:
        raise ChainError(f"deployment file {path}: {exc}") from exc
