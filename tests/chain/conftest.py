"""Shared chain fixtures: deployed contracts on an embedded chain and on anvil, funded nodes.

Deploying happens once per test run and backend; every test runs inside a
snapshot that is reverted afterwards, so tests see the same fresh deployment
and cannot leak state into each other.

- `chain_env`: the embedded (eth-tester) deployment, isolated per test.
- `backend`: the same, parametrized over the embedded chain and anvil (skipped
  with its reason when the anvil binary is missing).
- `both_backends`: both deployments at once, each isolated, to compare them.
- `embedded_env`, `anvil_env`: the deployments shared by the whole test run themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from consensus.abi import keccak256
from ravenp2p.chain.base import Deployment
from ravenp2p.chain.deploy import DeployParams, deploy_contracts
from ravenp2p.chain.devchain import Anvil, DevChain, EmbeddedChain, anvil_path
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.identity import NodeIdentity

NODE_COUNT = 6
ETH_PER_ACCOUNT = 10**20  # 100 ETH: gas for far more transactions than any test sends
BACKENDS = ("embedded", "anvil")


def labelled_identity(label: str) -> NodeIdentity:
    """A deterministic identity, the same on every run and backend (reproducible failures)."""
    return NodeIdentity.from_secret(keccak256(f"ravenp2p chain tests: {label}".encode()))


@dataclass
class ChainEnv:
    """A deployment of the three contracts on one development chain, with funded accounts.

    `owner` deployed the contracts and owns the token (it mints); `treasury`
    receives protocol fees and slashed stake; `nodes` are funded node accounts
    with no tokens yet, `identities` their keys in the same order.
    """

    name: str
    dev: DevChain
    params: DeployParams
    deployment: Deployment
    owner: Web3Chain
    treasury: NodeIdentity
    nodes: list[Web3Chain]
    identities: list[NodeIdentity]
    _extra: list[Web3Chain] = field(default_factory=list)

    def account(self, label: str) -> Web3Chain:
        """A chain object for a further account with ETH for gas (gone at the snapshot revert)."""
        identity = labelled_identity(label)
        self.dev.fund(identity.address, ETH_PER_ACCOUNT)
        chain = Web3Chain(self.dev.w3, self.deployment, identity.private_key.secret)
        self._extra.append(chain)
        return chain

    async def mint(self, to: str, amount: int) -> None:
        """Give `to` freshly minted RAVEN."""
        await self.owner.mint(to, amount)

    def advance_time(self, seconds: int) -> None:
        self.dev.advance_time(seconds)

    def snapshot(self) -> int:
        return self.dev.snapshot()

    def revert(self, snapshot_id: int) -> None:
        """Return to a snapshot and re-read every account's nonce, which the revert rewound."""
        self.dev.revert(snapshot_id)
        self._extra.clear()
        for chain in [self.owner, *self.nodes]:
            chain.resync_nonce()


def deploy_env(name: str, dev: DevChain, params: DeployParams | None = None) -> ChainEnv:
    """Deploy the contracts on `dev` and fund the owner and `NODE_COUNT` node accounts."""
    params = params or DeployParams()
    owner_identity = labelled_identity("owner")
    treasury = labelled_identity("treasury")
    node_identities = [labelled_identity(f"node {i}") for i in range(NODE_COUNT)]
    for identity in (owner_identity, *node_identities):
        dev.fund(identity.address, ETH_PER_ACCOUNT)
    deployment = deploy_contracts(
        dev.w3, owner_identity.private_key.secret, params, treasury=treasury.address
    )
    owner = Web3Chain(dev.w3, deployment, owner_identity.private_key.secret)
    nodes = [Web3Chain(dev.w3, deployment, i.private_key.secret) for i in node_identities]
    return ChainEnv(name, dev, params, deployment, owner, treasury, nodes, node_identities)


@contextmanager
def isolated(env: ChainEnv) -> Iterator[ChainEnv]:
    """Run a block against `env` and undo everything it did on the chain afterwards."""
    snapshot = env.snapshot()
    try:
        yield env
    finally:
        env.revert(snapshot)


@pytest.fixture(scope="session")
def embedded_env() -> ChainEnv:
    return deploy_env("embedded", EmbeddedChain())


@pytest.fixture(scope="session")
def anvil() -> Iterator[Anvil]:
    """A running anvil node for the whole test run; skipped when the binary is not installed."""
    binary = anvil_path()
    if binary is None or not binary.is_file():
        where = f" at {binary}" if binary else ""
        pytest.skip(f"anvil binary not found{where} (run 'npm ci' or set RAVENP2P_ANVIL)")
    with Anvil(binary) as node:
        yield node


@pytest.fixture(scope="session")
def anvil_env(anvil: Anvil) -> ChainEnv:
    return deploy_env("anvil", anvil)


@pytest.fixture
def chain_env(embedded_env: ChainEnv) -> Iterator[ChainEnv]:
    with isolated(embedded_env) as env:
        yield env


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[ChainEnv]:
    """The deployment on each backend in turn, isolated per test."""
    env: ChainEnv = request.getfixturevalue(f"{request.param}_env")
    with isolated(env):
        yield env



@pytest.fixture
def both_backends(
    embedded_env: ChainEnv, anvil_env: ChainEnv
) -> Iterator[tuple[ChainEnv, ChainEnv]]:
    """Both deployments at once (embedded, anvil), each isolated, for comparing backends."""
    with isolated(embedded_env), isolated(anvil_env):
        yield embedded_env, anvil_env
