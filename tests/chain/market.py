"""A small market on a deployment, shared by the contract tests: staked masters, workers, a job.

`build_market` stakes three master candidates with different stakes, two
staked workers and an unstaked outsider, and opens one job from a fresh
requester, so a test starts where the interesting part begins (settling,
claiming, taking over, slashing). Everything goes through the `Chain` API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import coincurve
import trio

from consensus.abi import checksum_address, keccak256
from consensus.eip712 import Domain, from_eth_signature, result_digest, to_eth_signature
from consensus.settlement import Settlement
from consensus.settlement import settle as settle_offchain
from ravenp2p.chain.deploy import RAVEN
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.identity import NodeIdentity, address_of

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

T = TypeVar("T")

MASTER_STAKES = (150 * RAVEN, 190 * RAVEN, 230 * RAVEN)
WORKER_STAKE = 120 * RAVEN
PRICE = 2 * RAVEN
REDUNDANCY = 2
MAX_CALCULATIONS = 5
LIFETIME = 3600  # seconds from creation to a job's deadline
CALCULATION = 7
DIGEST_A, DIGEST_B = keccak256(b"weights a"), keccak256(b"weights b")


def max_cost(price: int, redundancy: int, max_calculations: int) -> int:
    """The least deposit a job needs (docs/economics.md): full cost plus the 10% margin."""
    c = max_calculations * redundancy * price
    return c + c * 10 // 100


DEPOSIT = max_cost(PRICE, REDUNDANCY, MAX_CALCULATIONS)


def sync(function: Callable[..., Awaitable[T]], *args: object) -> T:
    """Run one async `Chain` call from synchronous code (fixtures, hypothesis state machines)."""
    return trio.run(function, *args)


def sign_result_in(
    identity: NodeIdentity, domain: Domain, job: bytes, calculation: int, digest: bytes
) -> bytes:
    """`identity`'s 65-byte `Result` signature in an arbitrary EIP-712 domain."""
    return to_eth_signature(identity.sign_digest(result_digest(domain, job, calculation, digest)))


def recover_signer(digest: bytes, signature: bytes) -> str:
    """The address `ecrecover` finds for a 65-byte (v 27/28) signature over `digest`."""
    raw = from_eth_signature(signature)
    return address_of(coincurve.PublicKey.from_signature_and_message(raw, digest, hasher=None))


@dataclass
class Market:
    """Staked masters (candidates), staked workers, an outsider and one open job.

    `ranked` holds the job's masters in rank order (index 0 is its first
    master); `identities` maps every node address to its key.
    """

    env: ChainEnv
    masters: list[Web3Chain]
    workers: list[Web3Chain]
    outsider: Web3Chain
    requester: Web3Chain
    job_id: bytes
    epoch: int
    ranked: list[Web3Chain]
    identities: dict[str, NodeIdentity]
    accounts: list[Web3Chain] = field(default_factory=list)

    def chain_of(self, address: str) -> Web3Chain:
        """The chain object of a node account."""
        return next(c for c in self.env.nodes if c.address == address)

    def identity_of(self, chain: Web3Chain) -> NodeIdentity:
        return self.identities[chain.address]

    def snapshot(self) -> int:
        return self.env.snapshot()

    def revert(self, snapshot_id: int) -> None:
        """Return to a snapshot and re-read the nonce of every account the market uses."""
        self.env.revert(snapshot_id)
        for chain in (self.requester, *self.accounts):
            chain.resync_nonce()

    async def plan(self, credits: Mapping[str, int], job_id: bytes | None = None) -> Settlement:
        """The settlement of `credits` on the market's job, with partners read from the registry."""
        job = await self.requester.job(job_id or self.job_id)
        partners = {w: await self.requester.partner_of(w) for w in credits}
        return settle_offchain(
            credits, job.price, partners, job.deposit, job.redundancy * job.max_calculations
        )

    async def settle(
        self, credits: Mapping[str, int], master: Web3Chain | None = None
    ) -> Settlement:
        """Settle the market's job for `credits` by `master` (default: its first master)."""
        plan = await self.plan(credits)
        await (master or self.ranked[0]).settle(
            self.job_id, plan.root, plan.accepted_results, plan.partner_total
        )
        return plan


async def open_job(env: ChainEnv, requester: Web3Chain, label: str) -> bytes:
    """Mint a deposit for `requester` and open job `keccak256(label)` with it."""
    job_id = keccak256(label.encode())
    await env.mint(requester.address, DEPOSIT)
    deadline = await requester.now() + LIFETIME
    await requester.create_job(job_id, PRICE, REDUNDANCY, MAX_CALCULATIONS, deadline, DEPOSIT)
    return job_id


async def build_market(env: ChainEnv) -> Market:
    """Stake the candidates and workers and open the market's job on `env` (see module doc)."""
    masters, workers, outsider = env.nodes[:3], env.nodes[3:5], env.nodes[5]
    for chain, amount in zip(masters, MASTER_STAKES, strict=True):
        await env.mint(chain.address, amount)
        await chain.stake(amount)
        await chain.become_candidate()
    for chain in workers:
        await env.mint(chain.address, WORKER_STAKE)
        await chain.stake(WORKER_STAKE)
    await workers[0].set_partner(outsider.address)
    requester = env.account("market requester")
    job_id = await open_job(env, requester, "market job")
    epoch = (await requester.job(job_id)).epoch
    by_address = {c.address: c for c in env.nodes}
    ranked = [by_address[a] for a in await requester.ranked_masters(job_id)]
    identities = {checksum_address(i.address): i for i in env.identities}
    return Market(
        env, masters, workers, outsider, requester, job_id, epoch, ranked, identities
    )


@contextmanager
def market_on(env: ChainEnv) -> Iterator[Market]:
    """Build the market on `env` for a group of tests, and undo it all afterwards."""
    snapshot = env.snapshot()
    try:
        yield sync(build_market, env)
    finally:
        env.revert(snapshot)


@contextmanager
def isolated_market(market: Market) -> Iterator[Market]:
    """Run one test on `market` and return the chain to the market's state afterwards."""
    snapshot = market.snapshot()
    try:
        yield market
    finally:
        market.revert(snapshot)


async def equivocate(
    market: Market, worker: Web3Chain, reporter: Web3Chain, calculation: int = CALCULATION
) -> None:
    """`reporter` submits `worker`'s two signed results for one calculation of the market job."""
    await reporter.slash_equivocation(
        worker.address,
        market.job_id,
        calculation,
        DIGEST_A,
        worker.sign_result(market.job_id, calculation, DIGEST_A),
        DIGEST_B,
        worker.sign_result(market.job_id, calculation, DIGEST_B),
    )
