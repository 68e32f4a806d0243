"""The `Chain` interface the roles are written against, the types it returns, its errors.

`Web3Chain` (web3.py: an embedded eth-tester chain or any JSON-RPC URL) is the
real implementation; the simulator supplies a model chain that applies the same
`consensus/` rules. Roles never import web3.

Every method acts as this chain object's own account (the node key: its
address is the node's address). Amounts are RAVEN base units, job ids 32
bytes, addresses EIP-55 checksummed strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from consensus.abi import checksum_address


class ChainError(Exception):
    """A chain operation failed: the node is unreachable, a transaction was not mined, ..."""


class ContractReverted(ChainError):
    """A contract refused a call; `reason` is the contract's own reason.

    `reason` is the custom error with its arguments (``NotJobMaster(job=0x…,
    caller=0x…)``) or the revert string, decoded the same way whichever
    backend (eth-tester or a JSON-RPC node) raised it.
    """

    def __init__(self, contract: str, function: str, reason: str) -> None:
        super().__init__(f"{contract}.{function} reverted: {reason}")
        self.contract = contract
        self.function = function
        self.reason = reason


class JobStatusOnChain(IntEnum):
    """A job's escrow state (the contract's enum, same numbering)."""

    NONE = 0
    OPEN = 1
    SETTLED = 2
    REFUNDED = 3


@dataclass(frozen=True)
class Deployment:
    """Where the contracts live: enough for any node to talk to them."""

    chain_id: int
    token: str
    registry: str
    escrow: str
    price_feed: str | None = field(default=None, compare=False)
    """The RAVEN/USD feed (any Chainlink `AggregatorV3Interface`) that prices USD jobs, or None.

    Not part of the deployment's identity (equality): only a requester reads it,
    and a job's manifest names the contracts that hold its money, not the feed.
    """

    def __post_init__(self) -> None:
        """Addresses in EIP-55 form, so two deployments compare equal however they were written."""
        chain_id = self.chain_id
        if isinstance(chain_id, bool) or not isinstance(chain_id, int) or chain_id <= 0:
            raise ValueError("deployment.chain_id: must be a positive integer")
        names = ("token", "registry", "escrow")
        for name in (*names, "price_feed") if self.price_feed is not None else names:
            try:
                object.__setattr__(self, name, checksum_address(getattr(self, name)))
            except ValueError as exc:
                raise ValueError(f"deployment.{name}: {exc}") from None

    def to_dict(self) -> dict[str, object]:
        """Plain data for a deployment file (`price_feed` only when there is one)."""
        data: dict[str, object] = {
            "chain_id": self.chain_id,
            "token": self.token,
            "registry": self.registry,
            "escrow": self.escrow,
        }
        if self.price_feed is not None:
            data["price_feed"] = self.price_feed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Deployment:
        """A deployment from `to_dict` data; files written before price feeds existed lack one."""
        try:
            chain_id, token, registry, escrow = (
                data[k] for k in ("chain_id", "token", "registry", "escrow")
            )
        except KeyError as exc:
            raise ValueError(f"deployment: missing {exc.args[0]!r}") from None
        return cls(chain_id, token, registry, escrow, data.get("price_feed"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class StakeInfo:
    """A node's stake: what counts for election and what is on its way out."""

    active: int
    unbonding: int
    release_time: int


@dataclass(frozen=True)
class Earnings:
    """What the job escrow has paid one account, read back from the chain's event logs.

    `claimed` sums the payout leaves the account has claimed (`claims` of them,
    at most one per job). A leaf pays an address its work as a worker and its
    fees as a website partner together, so the chain cannot tell the two
    apart. `master_fees` sums the fees paid to the account, at settlement,
    for the `settled` jobs it settled as their master (a job settled with no
    accepted results pays no fee and is not counted).
    """

    claimed: int
    claims: int
    master_fees: int
    settled: int

    @property
    def total(self) -> int:
        """Everything the escrow paid the account for work: claims and master fees."""
        return self.claimed + self.master_fees


@dataclass(frozen=True)
class RegistryParams:
    """The stake registry's constructor parameters (see docs/economics.md)."""

    min_master_stake: int
    unbonding_delay: int
    epoch_length: int
    committee_size: int
    max_candidates: int
    equivocation_slash_bps: int
    reporter_share_bps: int


@dataclass(frozen=True)
class ElectionTable:
    """An epoch's election as public data: what the draw started from and what it stored.

    `candidates` (the registry's storage order) and `stakes` (their active
    stakes, same order) are the state the election transaction ran against,
    `block` the block of its `CommitteeElected` event and `parent_hash` the
    hash of the block before it, which the `seed` commits to. `committee` is
    what the registry stored, in draw order. With `consensus.election`
    (`eligible`, then `draw_committee`) anyone redoes the draw and compares.
    """

    epoch: int
    block: int
    parent_hash: bytes
    seed: bytes
    candidates: tuple[str, ...]
    stakes: tuple[int, ...]
    minimum: int
    committee_size: int
    committee: tuple[str, ...]

    def __post_init__(self) -> None:
        """Addresses in EIP-55 form and one stake per candidate, so tables compare and redraw."""
        for name in ("parent_hash", "seed"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise ValueError(f"election table {name}: must be 32 bytes, got {value!r}")
        if len(self.candidates) != len(self.stakes):
            raise ValueError(
                f"election table: {len(self.candidates)} candidates but {len(self.stakes)} "
                "stakes: lengths must match"
            )
        for name in ("candidates", "committee"):
            try:
                addresses = tuple(checksum_address(a) for a in getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"election table {name}: {exc}") from None
            object.__setattr__(self, name, addresses)
        object.__setattr__(self, "stakes", tuple(self.stakes))


@dataclass(frozen=True)
class JobOnChain:
    """A job as the escrow holds it."""

    job_id: bytes
    requester: str
    price: int
    redundancy: int
    max_calculations: int
    deadline: int
    deposit: int
    epoch: int
    master_rank: int
    last_heartbeat: int
    status: JobStatusOnChain
    root: bytes
    payout_total: int
    claimed_total: int


@dataclass(frozen=True)
class PriceQuote:
    """A price feed's latest round, as `AggregatorV3Interface.latestRoundData` reports it.

    `answer` is the price (for the RAVEN/USD feed: USD per RAVEN) times
    ``10**decimals``. Nothing is checked here: `ravenp2p.chain.pricing.check_quote`
    decides whether the answer is usable.
    """

    feed: str
    round_id: int
    answer: int
    started_at: int
    updated_at: int
    answered_in_round: int
    decimals: int


@dataclass(frozen=True)
class TokenTransfer:
    """One RAVEN transfer a mined transaction made: the token's `Transfer` event."""

    sender: str
    recipient: str
    amount: int


@dataclass(frozen=True)
class Settled:
    """What a `settle` transaction paid at once (from its `JobSettled` event)."""

    tx_hash: str
    accepted_results: int
    cost: int
    master_fee: int
    partner_total: int
    protocol_fee: int
    refund: int


class Chain(Protocol):
    """Stakes and epochs, job escrow, settlement, claims and slashing, as one account."""

    @property
    def address(self) -> str:
        """This account's address (the node's address)."""
        ...

    @property
    def deployment(self) -> Deployment: ...

    async def now(self) -> int:
        """The latest block's timestamp: the clock the contracts judge deadlines by."""
        ...

    # token
    async def balance_of(self, account: str) -> int: ...

    async def transfer(self, to: str, amount: int) -> str:
        """Send `amount` of this account's RAVEN to `to`. Returns the tx hash (mined)."""
        ...

    async def token_transfers(self, tx_hash: str) -> list[TokenTransfer]:
        """The RAVEN transfers a mined, successful transaction made, in log order.

        Only the deployment's token counts: a `Transfer` event of any other
        contract is left out. ChainError when the transaction is unknown,
        not mined yet, or failed.
        """
        ...

    # stake registry
    async def registry_params(self) -> RegistryParams: ...

    async def stake(self, amount: int) -> str:
        """Stake `amount` of this account's tokens (approves by permit). Returns the tx hash."""
        ...

    async def request_unbond(self, amount: int) -> str: ...

    async def withdraw(self) -> str: ...

    async def become_candidate(self) -> str: ...

    async def set_partner(self, partner: str) -> str: ...

    async def stake_of(self, node: str) -> StakeInfo: ...

    async def partner_of(self, node: str) -> str | None:
        """The node's website partner, or None when it has none."""
        ...

    async def candidates(self) -> list[str]: ...

    async def current_epoch(self) -> int: ...

    async def elect(self) -> str: ...

    async def is_elected(self, epoch: int) -> bool: ...

    async def election_table(self, epoch: int) -> ElectionTable:
        """The public data of `epoch`'s election; ChainError when the epoch is not elected."""
        ...

    async def committee(self, epoch: int) -> list[str]: ...

    async def epoch_seed(self, epoch: int) -> bytes: ...

    async def slash_equivocation(
        self,
        worker: str,
        job_id: bytes,
        calculation: int,
        digest_a: bytes,
        signature_a: bytes,
        digest_b: bytes,
        signature_b: bytes,
    ) -> str: ...

    async def slash_by_committee(
        self, offender: str, amount: int, evidence: bytes, epoch: int, signatures: list[bytes]
    ) -> str: ...

    # job escrow
    async def create_job(
        self,
        job_id: bytes,
        price: int,
        redundancy: int,
        max_calculations: int,
        deadline: int,
        deposit: int,
    ) -> str:
        """Open the job with a deposit (approved by permit). Returns the tx hash."""
        ...

    async def job(self, job_id: bytes) -> JobOnChain: ...

    async def master_timeout(self) -> int:
        """The escrow's master timeout in seconds: each rank's wait before taking over a job."""
        ...

    async def master_of(self, job_id: bytes) -> str: ...

    async def ranked_masters(self, job_id: bytes) -> list[str]: ...

    async def heartbeat(self, job_id: bytes) -> str: ...

    async def take_over(self, job_id: bytes) -> str: ...

    async def settle(
        self, job_id: bytes, root: bytes, accepted_results: int, partner_total: int
    ) -> Settled: ...

    async def settlement(self, job_id: bytes) -> Settled | None:
        """What the job's settlement paid, or None while it is not settled."""

    async def claim(self, job_id: bytes, account: str, amount: int, proof: list[bytes]) -> str: ...

    async def has_claimed(self, job_id: bytes, account: str) -> bool: ...

    async def earnings(self, account: str) -> Earnings:
        """What the escrow has paid `account`: claimed leaves and master fees (see `Earnings`)."""
        ...

    async def refund(self, job_id: bytes) -> str: ...

    # price feed
    async def raven_usd_price(self) -> PriceQuote:
        """The deployment's RAVEN/USD feed, latest round; ChainError when it names no feed."""
        ...
