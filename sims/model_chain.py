"""An in-memory model of the contracts (token, stake registry, job escrow) for the simulator.

`ChainState` holds one deployment's whole state; `ChainState.account` gives a
`ModelChain`, the `Chain` interface (ravenp2p/chain/base.py) as one account,
with the contracts' semantics: the same checks in the same order, the same
revert reasons (`ContractReverted` with the reason `Web3Chain` decodes, e.g.
``NotJobMaster(job=0x…, caller=0x…)``), the same token movements, and the
pure rules of `consensus/` (election, ranking, takeover timing, merkle proofs,
EIP-712 digests) called rather than rewritten.

Time comes from a callable (the simulator's virtual clock): every transaction
mines one block stamped `int(now())`, and views judge by the same clock, as
on a chain that mines a block every second. Block hashes, transaction hashes
and so election seeds are derived from the sequence of calls only, so a
simulation replays byte for byte. Every call is O(1) or O(log n) in the
number of accounts, except those that are O(candidates) on-chain too
(`elect`, `candidates`, `election_table`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import coincurve

from consensus.abi import UINT256_MAX, ZERO_ADDRESS, checksum_address, keccak256
from consensus.eip712 import (
    Domain,
    from_eth_signature,
    result_digest,
    slash_order_digest,
)
from consensus.election import (
    draw_committee,
    election_seed,
    eligible,
    epoch_of,
    rank_masters,
    takeover_time,
)
from consensus.settlement import (
    MARGIN_PERCENT,
    MASTER_FEE_PERCENT,
    PARTNER_FEE_PERCENT,
    leaf_hash,
    verify,
)
from ravenp2p.chain.arguments import (
    UINT64_MAX,
    bytes32_arg,
    sign_result,
    sign_slash_order,
    signature_arg,
    uint_arg,
)
from ravenp2p.chain.base import (
    ChainError,
    ContractReverted,
    Deployment,
    Earnings,
    ElectionTable,
    JobOnChain,
    JobStatusOnChain,
    PriceQuote,
    RegistryParams,
    Settled,
    StakeInfo,
    TokenTransfer,
)
from ravenp2p.chain.deploy import PRICE_FEED_DECIMALS, DeployParams
from ravenp2p.identity import NodeIdentity, address_of, recover_signer

TOKEN = "RavenToken"
REGISTRY = "StakeRegistry"
ESCROW = "JobEscrow"
FEED = "PriceFeed"
BPS = 10_000
MAX_CANDIDATES_LIMIT = 256
UINT32_MAX = 2**32 - 1
DEFAULT_CHAIN_ID = 424_242
ZERO32 = bytes(32)
_HEX = frozenset("0123456789abcdefABCDEF")
_NO_TRANSFERS: tuple[TokenTransfer, ...] = ()
OVERFLOW = "Panic(0x11: arithmetic overflow)"


# ------------------------------------------------------------------ arguments





def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _contract_address(label: str, chain_id: int) -> str:
    """A deterministic stand-in address for one of the model's contracts."""
    digest = keccak256(f"ravenp2p model chain {chain_id}: {label}".encode())
    return checksum_address("0x" + digest[12:].hex())


# ------------------------------------------------------------------ reverts


class _Text(str):
    """A `string` argument of a custom error: formatted quoted, as the decoder does."""


def _format(value: object) -> str:
    if isinstance(value, _Text):
        return json.dumps(str(value))
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)  # integers, enums (uint8) and addresses (already EIP-55)


def reason(error: str, **args: object) -> str:
    """A custom error as `ravenp2p.chain.errors` decodes it: ``Name(arg=value, ...)``."""
    return f"{error}(" + ", ".join(f"{k}={_format(v)}" for k, v in args.items()) + ")"


def _recover(digest: bytes, signature: bytes) -> str | None:
    """`ECDSA.tryRecover`: the signer's address, or None where OpenZeppelin reports an error.

    v must be 27 or 28, s in the lower half of the order, and the point must
    exist; everything else is an error, as for the precompile behind it.
    """
    try:
        return address_of(recover_signer(digest, from_eth_signature(signature)))
    except ValueError:
        return None


# ------------------------------------------------------------------ state records


@dataclass
class _Stake:
    active: int = 0
    unbonding: int = 0
    release_time: int = 0


@dataclass
class _Job:
    requester: str
    price: int
    redundancy: int
    max_calculations: int
    deadline: int
    deposit: int
    epoch: int
    last_heartbeat: int
    ranked: tuple[str, ...]
    """The epoch's committee in master order: fixed once the epoch is elected."""
    master_rank: int = 0
    status: JobStatusOnChain = JobStatusOnChain.OPEN
    root: bytes = ZERO32
    payout_total: int = 0
    claimed_total: int = 0
    claimed: set[str] = field(default_factory=set)
    settled: Settled | None = None


@dataclass(frozen=True)
class _Election:
    epoch: int
    block: int
    parent_hash: bytes
    seed: bytes
    candidates: tuple[str, ...]
    stakes: tuple[int, ...]
    committee: tuple[str, ...]


@dataclass
class _Earned:
    claimed: int = 0
    claims: int = 0
    master_fees: int = 0
    settled: int = 0


@dataclass(frozen=True)
class _Round:
    answer: int
    updated_at: int


class _Call:
    """One transaction being executed: who sends it, when, and the tokens it moves."""

    def __init__(self, contract: str, function: str, sender: str, timestamp: int) -> None:
        self.contract = contract
        self.function = function
        self.sender = sender
        self.timestamp = timestamp
        self.transfers: list[TokenTransfer] = []
        self.data: tuple[object, ...] = ()

    def revert(self, error: str, **args: object) -> ContractReverted:
        """The `ContractReverted` this call raises for a custom error of the contract."""
        return ContractReverted(self.contract, self.function, reason(error, **args))

    def overflow(self) -> ContractReverted:
        """Checked arithmetic's panic, as the decoder words it."""
        return ContractReverted(self.contract, self.function, OVERFLOW)


# ------------------------------------------------------------------ the chain


class ChainState:
    """One deployment of the contracts, in memory: balances, stakes, epochs, jobs, claims.

    `now` is the clock blocks are stamped with (`int(now())`, never earlier
    than the previous block). The registry's genesis, which epochs count
    from, is the clock when the state is created. Fees are the escrow's
    constants (`consensus.settlement`); `usd_per_raven` deploys a RAVEN/USD
    feed with that first answer (`PRICE_FEED_DECIMALS` decimals); None: no feed.
    Helpers outside the `Chain` interface: `mint`, `set_usd_price`, `balance`,
    `balances`, `total_supply`, `timestamp`, `block_number`, `block_hash`.
    """

    def __init__(
        self,
        now: Callable[[], float],
        registry: RegistryParams,
        master_timeout: int,
        treasury: str,
        chain_id: int = DEFAULT_CHAIN_ID,
        usd_per_raven: int | None = None,
    ) -> None:
        self._now = now
        self._canonical: dict[str, str] = {}
        self._check_params(registry, master_timeout, treasury)
        self.params = registry
        self.master_timeout = master_timeout
        self.treasury = self.canonical(treasury)
        feed = _contract_address(FEED, chain_id) if usd_per_raven is not None else None
        self.deployment = Deployment(
            chain_id=chain_id,
            token=_contract_address(TOKEN, chain_id),
            registry=_contract_address(REGISTRY, chain_id),
            escrow=_contract_address(ESCROW, chain_id),
            price_feed=feed,
        )
        self.domain = Domain(chain_id, self.deployment.registry)
        self._registry = self.deployment.registry
        self._escrow = self.deployment.escrow
        # blocks
        self._timestamp = int(now())
        self.genesis = self._timestamp
        self.block_number = 0
        self.block_hash = keccak256(b"ravenp2p model chain genesis" + _word(chain_id))
        self._transactions: dict[str, tuple[TokenTransfer, ...]] = {}
        # token
        self._balances: dict[str, int] = {}
        self.total_supply = 0
        # registry
        self._stakes: dict[str, _Stake] = {}
        self._partners: dict[str, str] = {}
        self._partnered: dict[str, dict[str, None]] = {}
        self._candidates: list[str] = []
        self._slots: dict[str, int] = {}
        self._elections: dict[int, _Election] = {}
        self._equivocations: set[tuple[str, bytes, int]] = set()
        self._orders: set[bytes] = set()
        # escrow
        self._jobs: dict[bytes, _Job] = {}
        self._earned: dict[str, _Earned] = {}
        # price feed
        self._rounds: list[_Round] = []
        if usd_per_raven is not None:
            if usd_per_raven <= 0:
                raise ContractReverted(
                    FEED, "constructor", reason("NonPositiveAnswer", answer=usd_per_raven)
                )
            self._rounds.append(_Round(usd_per_raven, self._timestamp))
        self._accounts: dict[str, ModelChain] = {}

    @classmethod
    def from_deploy_params(
        cls,
        now: Callable[[], float],
        treasury: str,
        params: DeployParams | None = None,
        chain_id: int = DEFAULT_CHAIN_ID,
        with_price_feed: bool = True,
    ) -> ChainState:
        """A state deployed with `DeployParams` (the figures `deploy_contracts` uses)."""
        params = params or DeployParams()
        registry = RegistryParams(
            min_master_stake=params.min_master_stake,
            unbonding_delay=params.unbonding_delay,
            epoch_length=params.epoch_length,
            committee_size=params.committee_size,
            max_candidates=params.max_candidates,
            equivocation_slash_bps=params.equivocation_slash_bps,
            reporter_share_bps=params.reporter_share_bps,
        )
        feed = params.usd_per_raven if with_price_feed else None
        return cls(now, registry, params.master_timeout, treasury, chain_id, feed)

    @staticmethod
    def _check_params(params: RegistryParams, master_timeout: int, treasury: str) -> None:
        """The constructors' refusals, with their reasons."""

        def invalid(contract: str, name: str, value: int) -> ContractReverted:
            return ContractReverted(
                contract, "constructor", reason("InvalidParameter", parameter=_Text(name),
                                                value=value)
            )

        if int(checksum_address(treasury), 16) == 0:
            raise ContractReverted(
                REGISTRY, "constructor", reason("ZeroAddress", parameter=_Text("treasury"))
            )
        p = params
        if p.min_master_stake == 0:
            raise invalid(REGISTRY, "minMasterStake", p.min_master_stake)
        if p.epoch_length == 0:
            raise invalid(REGISTRY, "epochLength", p.epoch_length)
        if not 1 <= p.max_candidates <= MAX_CANDIDATES_LIMIT:
            raise invalid(REGISTRY, "maxCandidates", p.max_candidates)
        if not 1 <= p.committee_size <= p.max_candidates:
            raise invalid(REGISTRY, "committeeSize", p.committee_size)
        if p.equivocation_slash_bps > BPS:
            raise invalid(REGISTRY, "equivocationSlashBps", p.equivocation_slash_bps)
        if p.reporter_share_bps > BPS:
            raise invalid(REGISTRY, "reporterShareBps", p.reporter_share_bps)
        if master_timeout == 0:
            raise invalid(ESCROW, "masterTimeout", master_timeout)

    # ------------------------------------------------------------ accounts

    def canonical(self, address: str, name: str = "address") -> str:
        """The EIP-55 form of `address` (any case accepted, as web3 does); ValueError if not one."""
        known = self._canonical.get(address)
        if known is not None:
            return known
        if (
            not isinstance(address, str)
            or len(address) != 42
            or address[:2] not in ("0x", "0X")
            or not set(address[2:]) <= _HEX
        ):
            raise ValueError(f"{name} is not a 20-byte hex address: {address!r}")
        result = checksum_address("0x" + address[2:].lower())
        self._canonical[address] = result
        return result

    def account(self, key: NodeIdentity | coincurve.PrivateKey | bytes) -> ModelChain:
        """The `Chain` view of the account of a node identity, private key or 32-byte secret."""
        if isinstance(key, NodeIdentity):
            identity = key
        elif isinstance(key, coincurve.PrivateKey):
            identity = NodeIdentity(key)
        else:
            identity = NodeIdentity.from_secret(bytes(key))
        address = identity.address
        chain = self._accounts.get(address)
        if chain is None:
            chain = ModelChain(self, identity, address)
            self._accounts[address] = chain
        return chain

    # ------------------------------------------------------------ clock and blocks

    def timestamp(self) -> int:
        """The chain's clock: `int(now())`, never before the latest block's timestamp."""
        now = int(self._now())
        return now if now > self._timestamp else self._timestamp

    def _begin(self, contract: str, function: str, sender: str) -> _Call:
        return _Call(contract, function, sender, self.timestamp())

    def _mine(self, call: _Call) -> str:
        """Mine `call` in a block of its own; its pseudo transaction hash (0x and 64 hex digits)."""
        self.block_number += 1
        payload = repr((call.contract, call.function, call.sender, call.data)).encode()
        tx_hash = keccak256(b"ravenp2p model tx" + _word(self.block_number) + payload)
        self.block_hash = keccak256(
            self.block_hash + _word(self.block_number) + _word(call.timestamp) + tx_hash
        )
        self._timestamp = call.timestamp
        name = "0x" + tx_hash.hex()
        self._transactions[name] = tuple(call.transfers) if call.transfers else _NO_TRANSFERS
        return name

    # ------------------------------------------------------------ token

    def balance(self, account: str) -> int:
        """`account`'s RAVEN balance."""
        return self._balances.get(self.canonical(account, "account"), 0)

    def balances(self) -> Mapping[str, int]:
        """Every non-zero balance (a live read-only view): for checks of conservation."""
        return MappingProxyType(self._balances)

    def mint(self, to: str, amount: int) -> str:
        """Create `amount` RAVEN for `to` (the token owner's `mint`); the tx hash."""
        to = self.canonical(to, "to")
        uint_arg("amount", amount)
        call = self._begin(TOKEN, "mint", ZERO_ADDRESS)
        if to == ZERO_ADDRESS:
            raise call.revert("ERC20InvalidReceiver", receiver=to)
        if self.total_supply + amount > UINT256_MAX:
            raise call.overflow()
        call.data = (to, amount)
        self.total_supply += amount
        self._credit(to, amount)
        call.transfers.append(TokenTransfer(ZERO_ADDRESS, to, amount))
        return self._mine(call)

    def _credit(self, account: str, amount: int) -> None:
        if amount:
            self._balances[account] = self._balances.get(account, 0) + amount

    def _require_funds(self, call: _Call, owner: str, amount: int) -> None:
        """OpenZeppelin ERC-20's refusal of a transfer `owner` cannot cover."""
        balance = self._balances.get(owner, 0)
        if balance < amount:
            raise call.revert("ERC20InsufficientBalance", sender=owner, balance=balance,
                              needed=amount)

    def _move(self, call: _Call, sender: str, recipient: str, amount: int) -> None:
        """Move tokens already checked to be there, and log the `Transfer`."""
        left = self._balances[sender] - amount if amount else self._balances.get(sender, 0)
        if left:
            self._balances[sender] = left
        else:
            self._balances.pop(sender, None)
        self._credit(recipient, amount)
        call.transfers.append(TokenTransfer(sender, recipient, amount))

    def token_transfers(self, tx_hash: str) -> list[TokenTransfer]:
        """The RAVEN transfers of a mined transaction (`Chain.token_transfers`)."""
        if (
            not isinstance(tx_hash, str)
            or len(tx_hash) != 66
            or not tx_hash.startswith("0x")
            or not set(tx_hash[2:]) <= _HEX
        ):
            raise ValueError(f"tx_hash must be 0x and 64 hex digits, got {tx_hash!r}")
        transfers = self._transactions.get(tx_hash.lower())
        if transfers is None:
            raise ChainError(
                f"transaction {tx_hash} is not mined on the model chain (unknown, or still pending)"
            )
        return list(transfers)

    # ------------------------------------------------------------ price feed

    def set_usd_price(self, answer: int) -> str:
        """Publish a new RAVEN/USD round (the feed owner's `setPrice`); the tx hash."""
        if not self._rounds:
            raise ChainError("the deployment names no price feed (deployment.price_feed)")
        call = self._begin(FEED, "setPrice", ZERO_ADDRESS)
        if answer <= 0:
            raise call.revert("NonPositiveAnswer", answer=answer)
        call.data = (answer,)
        self._rounds.append(_Round(answer, call.timestamp))
        return self._mine(call)

    def usd_price(self) -> PriceQuote:
        """The feed's latest round (`Chain.raven_usd_price`)."""
        if not self._rounds or self.deployment.price_feed is None:
            raise ChainError(
                "the deployment names no price feed (deployment.price_feed): USD prices "
                "cannot be converted to RAVEN"
            )
        round_id = len(self._rounds)
        latest = self._rounds[-1]
        return PriceQuote(
            feed=self.deployment.price_feed,
            round_id=round_id,
            answer=latest.answer,
            started_at=latest.updated_at,
            updated_at=latest.updated_at,
            answered_in_round=round_id,
            decimals=PRICE_FEED_DECIMALS,
        )

    # ------------------------------------------------------------ registry: stake

    def stake_info(self, node: str) -> StakeInfo:
        """`stakeOf(node)`."""
        s = self._stakes.get(self.canonical(node, "node"))
        return StakeInfo(0, 0, 0) if s is None else StakeInfo(s.active, s.unbonding, s.release_time)

    def current_epoch(self) -> int:
        """`currentEpoch()`: whole epochs since genesis by the chain's clock."""
        return epoch_of(self.timestamp(), self.genesis, self.params.epoch_length)

    def _stake(self, sender: str, amount: int) -> str:
        call = self._begin(REGISTRY, "stakeWithPermit", sender)
        if amount == 0:
            raise call.revert("ZeroAmount")
        self._require_funds(call, sender, amount)
        call.data = (amount,)
        self._stakes.setdefault(sender, _Stake()).active += amount
        self._move(call, sender, self._registry, amount)
        return self._mine(call)

    def _request_unbond(self, sender: str, amount: int) -> str:
        call = self._begin(REGISTRY, "requestUnbond", sender)
        if amount == 0:
            raise call.revert("ZeroAmount")
        s = self._stakes.get(sender) or _Stake()
        if amount > s.active:
            raise call.revert("InsufficientStake", node=sender, requested=amount, active=s.active)
        call.data = (amount,)
        s.active -= amount
        s.unbonding += amount
        s.release_time = call.timestamp + self.params.unbonding_delay
        if sender in self._slots and s.active < self.params.min_master_stake:
            self._remove_candidate(sender)
        return self._mine(call)

    def _withdraw(self, sender: str) -> str:
        call = self._begin(REGISTRY, "withdraw", sender)
        s = self._stakes.get(sender) or _Stake()
        amount = s.unbonding
        if amount == 0:
            raise call.revert("NothingToWithdraw", node=sender)
        if call.timestamp < s.release_time:
            raise call.revert("StillUnbonding", node=sender, releaseTime=s.release_time)
        s.unbonding = 0
        s.release_time = 0
        self._move(call, self._registry, sender, amount)
        return self._mine(call)

    def _set_partner(self, sender: str, partner: str) -> str:
        call = self._begin(REGISTRY, "setPartner", sender)
        call.data = (partner,)
        if partner == ZERO_ADDRESS:
            self._partners.pop(sender, None)
        else:
            self._partners[sender] = partner
        self._partnered.setdefault(partner, {}).setdefault(sender, None)
        return self._mine(call)

    def partner(self, node: str) -> str | None:
        """`partnerOf(node)`, None for the zero address."""
        return self._partners.get(self.canonical(node, "node"))

    def partnered(self, partner: str) -> list[str]:
        """The nodes naming `partner` now, in order of first naming (as `partnered_nodes`)."""
        partner = self.canonical(partner, "partner")
        named = self._partnered.get(partner, {})
        return [node for node in named if self._partners.get(node) == partner]

    # ------------------------------------------------------------ registry: candidates

    def _become_candidate(self, sender: str) -> str:
        call = self._begin(REGISTRY, "becomeCandidate", sender)
        if sender in self._slots:
            raise call.revert("AlreadyCandidate", node=sender)
        s = self._stakes.get(sender)
        active = 0 if s is None else s.active
        minimum = self.params.min_master_stake
        if active < minimum:
            raise call.revert("StakeBelowMinimum", node=sender, active=active, minimum=minimum)
        if len(self._candidates) >= self.params.max_candidates:
            raise call.revert("CandidateSetFull", maxCandidates=self.params.max_candidates)
        self._candidates.append(sender)
        self._slots[sender] = len(self._candidates) - 1
        return self._mine(call)

    def _leave_candidacy(self, sender: str) -> str:
        call = self._begin(REGISTRY, "leaveCandidacy", sender)
        if sender not in self._slots:
            raise call.revert("NotCandidate", node=sender)
        self._remove_candidate(sender)
        return self._mine(call)

    def _remove_candidate(self, node: str) -> None:
        """Swap-and-pop: the last candidate moves into the freed slot."""
        index = self._slots.pop(node)
        last = self._candidates.pop()
        if last != node:
            self._candidates[index] = last
            self._slots[last] = index

    def candidate_list(self) -> list[str]:
        """`candidates()` in storage order."""
        return list(self._candidates)

    # ------------------------------------------------------------ registry: election

    def _draw(self, call: _Call, epoch: int) -> _Election:
        """The election `elect()` would store for `epoch` in `call` (nothing stored yet)."""
        if epoch in self._elections:
            raise call.revert("EpochAlreadyElected", epoch=epoch)
        candidates = tuple(self._candidates)
        stakes = tuple(self._stakes[c].active for c in candidates)
        table, weights = eligible(
            candidates, dict(zip(candidates, stakes, strict=True)), self.params.min_master_stake
        )
        if not table:
            raise call.revert("NoEligibleCandidates", epoch=epoch)
        seed = election_seed(self.block_hash, epoch, self._registry)
        committee = draw_committee(table, weights, seed, self.params.committee_size)
        return _Election(
            epoch=epoch,
            block=self.block_number + 1,
            parent_hash=self.block_hash,
            seed=seed,
            candidates=candidates,
            stakes=stakes,
            committee=tuple(committee),
        )

    def _elect(self, sender: str) -> str:
        call = self._begin(REGISTRY, "elect", sender)
        epoch = epoch_of(call.timestamp, self.genesis, self.params.epoch_length)
        election = self._draw(call, epoch)
        self._elections[epoch] = election
        return self._mine(call)

    def election(self, epoch: int) -> ElectionTable:
        """`Chain.election_table(epoch)`; ChainError while the epoch is not elected."""
        found = self._elections.get(uint_arg("epoch", epoch))
        if found is None:
            raise ChainError(f"epoch {epoch} is not elected: it has no committee")
        return ElectionTable(
            epoch=epoch,
            block=found.block,
            parent_hash=found.parent_hash,
            seed=found.seed,
            candidates=found.candidates,
            stakes=found.stakes,
            minimum=self.params.min_master_stake,
            committee_size=self.params.committee_size,
            committee=found.committee,
        )

    def committee_of(self, epoch: int) -> list[str]:
        """`committee(epoch)`: empty while not elected."""
        found = self._elections.get(uint_arg("epoch", epoch))
        return [] if found is None else list(found.committee)

    def seed_of(self, epoch: int) -> bytes:
        """`epochSeed(epoch)`: zero while not elected."""
        found = self._elections.get(uint_arg("epoch", epoch))
        return ZERO32 if found is None else found.seed

    def is_elected(self, epoch: int) -> bool:
        """`isElected(epoch)`."""
        return uint_arg("epoch", epoch) in self._elections

    # ------------------------------------------------------------ registry: slashing

    def _take(self, node: str, amount: int) -> None:
        """Take `amount` (at most the stake) from active stake first, then from unbonding."""
        s = self._stakes[node]
        from_active = min(amount, s.active)
        s.active -= from_active
        s.unbonding -= amount - from_active
        if s.unbonding == 0:
            s.release_time = 0
        if node in self._slots and s.active < self.params.min_master_stake:
            self._remove_candidate(node)

    def _slash_equivocation(
        self,
        sender: str,
        worker: str,
        job: bytes,
        calculation: int,
        digests: tuple[bytes, bytes],
        signatures: tuple[bytes, bytes],
    ) -> str:
        call = self._begin(REGISTRY, "slashEquivocation", sender)
        if digests[0] == digests[1]:
            raise call.revert("IdenticalDigests", digest=digests[0])
        for digest, signature in zip(digests, signatures, strict=True):
            signer = _recover(result_digest(self.domain, job, calculation, digest), signature)
            if signer != worker:
                raise call.revert("SignatureNotByWorker", worker=worker,
                                  signer=signer or ZERO_ADDRESS)
        key = (worker, job, calculation)
        if key in self._equivocations:
            raise call.revert("EquivocationAlreadySlashed", worker=worker, job=job,
                              calculation=calculation)
        s = self._stakes.get(worker) or _Stake()
        bps = self.params.equivocation_slash_bps
        if (s.active + s.unbonding) * bps > UINT256_MAX:
            raise call.overflow()
        amount = (s.active + s.unbonding) * bps // BPS
        if amount == 0:
            raise call.revert("NothingToSlash", offender=worker)
        if amount * self.params.reporter_share_bps > UINT256_MAX:
            raise call.overflow()
        call.data = (worker, job, calculation, digests, signatures)
        self._equivocations.add(key)
        self._take(worker, amount)
        reward = amount * self.params.reporter_share_bps // BPS
        if reward > 0:
            self._move(call, self._registry, sender, reward)
        if amount > reward:
            self._move(call, self._registry, self.treasury, amount - reward)
        return self._mine(call)

    def _slash_by_committee(
        self,
        sender: str,
        order: tuple[str, int, bytes, int],
        signatures: Sequence[bytes],
    ) -> str:
        call = self._begin(REGISTRY, "slashByCommittee", sender)
        offender, amount, evidence, epoch = order
        if amount == 0:
            raise call.revert("ZeroAmount")
        election = self._elections.get(epoch)
        if election is None:
            raise call.revert("EpochNotElected", epoch=epoch)
        current = epoch_of(call.timestamp, self.genesis, self.params.epoch_length)
        if epoch + 1 < current:
            raise call.revert("SlashOrderExpired", epoch=epoch, currentEpoch=current)
        digest = slash_order_digest(self.domain, offender, amount, evidence, epoch)
        if digest in self._orders:
            raise call.revert("SlashOrderAlreadyExecuted", orderDigest=digest)
        members = election.committee
        required = len(members) // 2 + 1
        if len(signatures) < required:
            raise call.revert("NotEnoughSignatures", signers=len(signatures), required=required)
        signed: set[int] = set()
        for i, signature in enumerate(signatures):
            signer = _recover(digest, signature)
            if signer is None:
                raise call.revert("InvalidSignature", index=i)
            if signer not in members:
                raise call.revert("SignerNotInCommittee", signer=signer, epoch=epoch)
            index = members.index(signer)
            if index in signed:
                raise call.revert("DuplicateSigner", signer=signer)
            signed.add(index)
        s = self._stakes.get(offender) or _Stake()
        available = s.active + s.unbonding
        if available == 0:
            raise call.revert("NothingToSlash", offender=offender)
        taken = min(amount, available)
        call.data = (order, tuple(signatures))
        self._orders.add(digest)
        self._take(offender, taken)
        self._move(call, self._registry, self.treasury, taken)
        return self._mine(call)

    # ------------------------------------------------------------ escrow

    def _existing(self, call: _Call | tuple[str, str], job_id: bytes) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            if isinstance(call, _Call):
                raise call.revert("UnknownJob", job=job_id)
            raise ContractReverted(*call, reason("UnknownJob", job=job_id))
        return job

    def _open(self, call: _Call, job_id: bytes) -> _Job:
        """An open job whose deadline has not passed: the only state masters act in."""
        job = self._existing(call, job_id)
        if job.status != JobStatusOnChain.OPEN:
            raise call.revert("JobNotOpen", job=job_id, status=int(job.status))
        if call.timestamp > job.deadline:
            raise call.revert("JobDeadlinePassed", job=job_id, deadline=job.deadline)
        return job

    def _require_master_stake(self, call: _Call, master: str) -> None:
        s = self._stakes.get(master)
        active = 0 if s is None else s.active
        minimum = self.params.min_master_stake
        if active < minimum:
            raise call.revert("MasterStakeTooLow", master=master, active=active, minimum=minimum)

    def _require_master(self, call: _Call, job_id: bytes, job: _Job) -> None:
        ranked = job.ranked
        if job.master_rank >= len(ranked) or ranked[job.master_rank] != call.sender:
            raise call.revert("NotJobMaster", job=job_id, caller=call.sender)
        self._require_master_stake(call, call.sender)

    def _create_job(
        self,
        sender: str,
        job_id: bytes,
        terms: tuple[int, int, int, int, int],
    ) -> str:
        price, redundancy, max_calculations, deadline, deposit = terms
        call = self._begin(ESCROW, "createJobWithPermit", sender)
        if job_id == ZERO32:
            raise call.revert("ZeroJobId")
        if job_id in self._jobs:
            raise call.revert("JobAlreadyExists", job=job_id)
        if deadline <= call.timestamp:
            raise call.revert("DeadlineNotInFuture", deadline=deadline, timestamp=call.timestamp)
        if price == 0:
            raise call.revert("ZeroPrice")
        if redundancy == 0:
            raise call.revert("ZeroRedundancy")
        if max_calculations == 0:
            raise call.revert("ZeroMaxCalculations")
        cost = max_calculations * redundancy * price
        needed = cost + cost * MARGIN_PERCENT // 100
        if cost * MARGIN_PERCENT > UINT256_MAX or needed > UINT256_MAX:
            raise call.overflow()
        if deposit < needed:
            raise call.revert("DepositBelowMaxCost", deposit=deposit, maxCost=needed)
        epoch = epoch_of(call.timestamp, self.genesis, self.params.epoch_length)
        election = self._elections.get(epoch)
        new_election = None
        if election is None:
            new_election = election = self._draw(call, epoch)
        self._require_funds(call, sender, deposit)
        call.data = (job_id, terms)
        if new_election is not None:
            self._elections[epoch] = new_election
        self._jobs[job_id] = _Job(
            requester=sender,
            price=price,
            redundancy=redundancy,
            max_calculations=max_calculations,
            deadline=deadline,
            deposit=deposit,
            epoch=epoch,
            last_heartbeat=call.timestamp,
            ranked=tuple(rank_masters(job_id, election.committee)),
        )
        self._move(call, sender, self._escrow, deposit)
        return self._mine(call)

    def job_on_chain(self, job_id: bytes) -> JobOnChain:
        """`getJob(jobId)`: all zero for an unknown id."""
        job_id = bytes32_arg("job_id", job_id)
        job = self._jobs.get(job_id)
        if job is None:
            return JobOnChain(job_id, ZERO_ADDRESS, 0, 0, 0, 0, 0, 0, 0, 0,
                              JobStatusOnChain.NONE, ZERO32, 0, 0)
        return JobOnChain(
            job_id=job_id,
            requester=job.requester,
            price=job.price,
            redundancy=job.redundancy,
            max_calculations=job.max_calculations,
            deadline=job.deadline,
            deposit=job.deposit,
            epoch=job.epoch,
            master_rank=job.master_rank,
            last_heartbeat=job.last_heartbeat,
            status=job.status,
            root=job.root,
            payout_total=job.payout_total,
            claimed_total=job.claimed_total,
        )

    def ranked(self, job_id: bytes, function: str = "rankedMasters") -> list[str]:
        """`rankedMasters(jobId)`: the job's masters in rank order."""
        return list(self._existing((ESCROW, function), bytes32_arg("job_id", job_id)).ranked)

    def master(self, job_id: bytes) -> str:
        """`masterOf(jobId)`: the committee member at the job's master rank."""
        job = self._existing((ESCROW, "masterOf"), bytes32_arg("job_id", job_id))
        return job.ranked[job.master_rank]

    def _heartbeat(self, sender: str, job_id: bytes) -> str:
        call = self._begin(ESCROW, "heartbeat", sender)
        job = self._open(call, job_id)
        self._require_master(call, job_id, job)
        call.data = (job_id,)
        job.last_heartbeat = call.timestamp
        return self._mine(call)

    def _take_over(self, sender: str, job_id: bytes) -> str:
        call = self._begin(ESCROW, "takeOver", sender)
        job = self._open(call, job_id)
        if sender not in job.ranked:
            raise call.revert("NotJobCommitteeMember", job=job_id, caller=sender)
        rank = job.ranked.index(sender)
        self._require_master_stake(call, sender)
        current = job.master_rank
        if rank <= current:
            raise call.revert("RankNotAfterMaster", job=job_id, rank=rank, masterRank=current)
        allowed_at = takeover_time(current, rank, job.last_heartbeat, self.master_timeout)
        if call.timestamp < allowed_at:
            raise call.revert("TakeOverTooEarly", job=job_id, allowedAt=allowed_at)
        call.data = (job_id,)
        job.master_rank = rank
        job.last_heartbeat = call.timestamp
        return self._mine(call)

    def _settle(
        self, sender: str, job_id: bytes, root: bytes, accepted: int, partner_total: int
    ) -> Settled:
        call = self._begin(ESCROW, "settle", sender)
        job = self._open(call, job_id)
        self._require_master(call, job_id, job)
        max_results = job.max_calculations * job.redundancy
        if accepted > max_results:
            raise call.revert("TooManyResults", job=job_id, acceptedResults=accepted,
                              maxResults=max_results)
        cost = accepted * job.price
        max_partner_total = cost * PARTNER_FEE_PERCENT // 100
        if partner_total > max_partner_total:
            raise call.revert("PartnerTotalTooHigh", job=job_id, partnerTotal=partner_total,
                              maxPartnerTotal=max_partner_total)
        payout_total = cost + partner_total
        if payout_total > 0 and root == ZERO32:
            raise call.revert("EmptyRoot", job=job_id)
        margin = cost * MARGIN_PERCENT // 100
        master_fee = cost * MASTER_FEE_PERCENT // 100
        protocol_fee = margin - master_fee - partner_total
        refund = job.deposit - cost - margin
        call.data = (job_id, root, accepted, partner_total)
        job.status = JobStatusOnChain.SETTLED
        job.root = root
        job.payout_total = payout_total
        if master_fee > 0:
            self._move(call, self._escrow, sender, master_fee)
        if protocol_fee > 0:
            self._move(call, self._escrow, self.treasury, protocol_fee)
        if refund > 0:
            self._move(call, self._escrow, job.requester, refund)
        tx_hash = self._mine(call)
        settled = Settled(tx_hash, accepted, cost, master_fee, partner_total, protocol_fee, refund)
        job.settled = settled
        # `Web3Chain.earnings` counts a settlement for its master when the settling
        # transaction paid the master anything (its fee, or as treasury or requester).
        if any(t.recipient == sender for t in call.transfers):
            earned = self._earned.setdefault(sender, _Earned())
            earned.master_fees += master_fee
            earned.settled += 1
        return settled

    def settlement_of(self, job_id: bytes) -> Settled | None:
        """What the job's settlement paid, or None while it is not settled."""
        job = self._jobs.get(bytes32_arg("job_id", job_id))
        return None if job is None else job.settled

    def _claim(
        self, sender: str, job_id: bytes, account: str, amount: int, proof: Sequence[bytes]
    ) -> str:
        call = self._begin(ESCROW, "claim", sender)
        job = self._existing(call, job_id)
        if job.status != JobStatusOnChain.SETTLED:
            raise call.revert("JobNotSettled", job=job_id, status=int(job.status))
        if account in job.claimed:
            raise call.revert("AlreadyClaimed", job=job_id, account=account)
        if not verify(proof, job.root, leaf_hash(account, amount)):
            raise call.revert("InvalidProof", job=job_id, account=account, amount=amount)
        remaining = job.payout_total - job.claimed_total
        if amount > remaining:
            raise call.revert("ClaimExceedsPayout", job=job_id, amount=amount,
                              remaining=remaining)
        if amount > 0 and account == ZERO_ADDRESS:
            raise call.revert("ERC20InvalidReceiver", receiver=account)
        call.data = (job_id, account, amount, tuple(proof))
        job.claimed.add(account)
        job.claimed_total += amount
        if amount > 0:
            self._move(call, self._escrow, account, amount)
        earned = self._earned.setdefault(account, _Earned())
        earned.claimed += amount
        earned.claims += 1
        return self._mine(call)

    def claimed(self, job_id: bytes, account: str) -> bool:
        """`hasClaimed(jobId, account)`."""
        job = self._jobs.get(bytes32_arg("job_id", job_id))
        return job is not None and self.canonical(account, "account") in job.claimed

    def earned(self, account: str) -> Earnings:
        """What the escrow has paid `account` (`Chain.earnings`)."""
        e = self._earned.get(self.canonical(account, "account"))
        return Earnings(0, 0, 0, 0) if e is None else Earnings(
            e.claimed, e.claims, e.master_fees, e.settled
        )

    def _refund(self, sender: str, job_id: bytes) -> str:
        call = self._begin(ESCROW, "refund", sender)
        job = self._existing(call, job_id)
        if job.status != JobStatusOnChain.OPEN:
            raise call.revert("JobNotOpen", job=job_id, status=int(job.status))
        if call.timestamp <= job.deadline:
            raise call.revert("DeadlineNotPassed", job=job_id, deadline=job.deadline)
        call.data = (job_id,)
        job.status = JobStatusOnChain.REFUNDED
        self._move(call, self._escrow, job.requester, job.deposit)
        return self._mine(call)

    # ------------------------------------------------------------ token: transfer

    def _transfer(self, sender: str, to: str, amount: int) -> str:
        call = self._begin(TOKEN, "transfer", sender)
        if to == ZERO_ADDRESS:
            raise call.revert("ERC20InvalidReceiver", receiver=to)
        self._require_funds(call, sender, amount)
        call.data = (to, amount)
        self._move(call, sender, to, amount)
        return self._mine(call)


class ModelChain:
    """The `Chain` interface as one account of a `ChainState` (see `ChainState.account`).

    Methods are `async` to fit the roles but never wait: each computes at once,
    so a task switch can never fall inside a transaction.
    """

    def __init__(self, state: ChainState, identity: NodeIdentity, address: str) -> None:
        self._state = state
        self._identity = identity
        self._address = address

    @property
    def address(self) -> str:
        """This account's address (the node's address)."""
        return self._address

    @property
    def deployment(self) -> Deployment:
        return self._state.deployment

    @property
    def state(self) -> ChainState:
        """The chain this account lives on."""
        return self._state

    async def now(self) -> int:
        """The chain's clock (`ChainState.timestamp`)."""
        return self._state.timestamp()

    # ------------------------------------------------------------ token

    async def balance_of(self, account: str) -> int:
        return self._state.balance(account)

    async def transfer(self, to: str, amount: int) -> str:
        to = self._state.canonical(to, "to")
        return self._state._transfer(self._address, to, uint_arg("amount", amount))

    async def token_transfers(self, tx_hash: str) -> list[TokenTransfer]:
        return self._state.token_transfers(tx_hash)

    # ------------------------------------------------------------ registry

    async def registry_params(self) -> RegistryParams:
        return self._state.params

    async def stake(self, amount: int) -> str:
        """Stake `amount` of this account's tokens (the permit is implied)."""
        return self._state._stake(self._address, uint_arg("amount", amount))

    async def request_unbond(self, amount: int) -> str:
        return self._state._request_unbond(self._address, uint_arg("amount", amount))

    async def withdraw(self) -> str:
        return self._state._withdraw(self._address)

    async def become_candidate(self) -> str:
        return self._state._become_candidate(self._address)

    async def leave_candidacy(self) -> str:
        """Leave the master candidate set."""
        return self._state._leave_candidacy(self._address)

    async def set_partner(self, partner: str) -> str:
        partner = self._state.canonical(partner, "partner")
        return self._state._set_partner(self._address, partner)

    async def stake_of(self, node: str) -> StakeInfo:
        return self._state.stake_info(node)

    async def partner_of(self, node: str) -> str | None:
        """The node's website partner, or None when it has none."""
        return self._state.partner(node)

    async def partnered_nodes(self, partner: str) -> list[str]:
        """The nodes that name `partner` as their website partner now, in order of first naming."""
        return self._state.partnered(partner)

    async def candidates(self) -> list[str]:
        return self._state.candidate_list()

    async def current_epoch(self) -> int:
        return self._state.current_epoch()

    async def elect(self) -> str:
        return self._state._elect(self._address)

    async def is_elected(self, epoch: int) -> bool:
        return self._state.is_elected(epoch)

    async def election_table(self, epoch: int) -> ElectionTable:
        """The public data of `epoch`'s election; ChainError when the epoch is not elected."""
        return self._state.election(epoch)

    async def committee(self, epoch: int) -> list[str]:
        return self._state.committee_of(epoch)

    async def epoch_seed(self, epoch: int) -> bytes:
        return self._state.seed_of(epoch)

    async def slash_equivocation(
        self,
        worker: str,
        job_id: bytes,
        calculation: int,
        digest_a: bytes,
        signature_a: bytes,
        digest_b: bytes,
        signature_b: bytes,
    ) -> str:
        return self._state._slash_equivocation(
            self._address,
            self._state.canonical(worker, "worker"),
            bytes32_arg("job_id", job_id),
            uint_arg("calculation", calculation, UINT64_MAX),
            (bytes32_arg("digest_a", digest_a), bytes32_arg("digest_b", digest_b)),
            (signature_arg("signature_a", signature_a), signature_arg("signature_b", signature_b)),
        )

    async def slash_by_committee(
        self, offender: str, amount: int, evidence: bytes, epoch: int, signatures: list[bytes]
    ) -> str:
        order = (
            self._state.canonical(offender, "offender"),
            uint_arg("amount", amount),
            bytes32_arg("evidence", evidence),
            uint_arg("epoch", epoch),
        )
        sigs = [signature_arg(f"signatures[{i}]", s) for i, s in enumerate(signatures)]
        return self._state._slash_by_committee(self._address, order, sigs)

    def sign_result(self, job_id: bytes, calculation: int, digest: bytes) -> bytes:
        """This account's EIP-712 `Result` signature (see `arguments.sign_result`)."""
        return sign_result(self._identity, self._state.domain, job_id, calculation, digest)

    def sign_slash_order(self, offender: str, amount: int, evidence: bytes, epoch: int) -> bytes:
        """This account's EIP-712 `SlashOrder` signature as committee member."""
        return sign_slash_order(self._identity, self._state.domain,
                                self._state.canonical(offender, "offender"), amount, evidence,
                                epoch)

    # ------------------------------------------------------------ escrow

    async def create_job(
        self,
        job_id: bytes,
        price: int,
        redundancy: int,
        max_calculations: int,
        deadline: int,
        deposit: int,
    ) -> str:
        """Open the job with its deposit (the permit is implied). Returns the tx hash."""
        terms = (
            uint_arg("price", price),
            uint_arg("redundancy", redundancy, UINT32_MAX),
            uint_arg("max_calculations", max_calculations, UINT64_MAX),
            uint_arg("deadline", deadline, UINT64_MAX),
            uint_arg("deposit", deposit),
        )
        return self._state._create_job(self._address, bytes32_arg("job_id", job_id), terms)

    async def job(self, job_id: bytes) -> JobOnChain:
        return self._state.job_on_chain(job_id)

    async def master_timeout(self) -> int:
        """The escrow's master timeout in seconds."""
        return self._state.master_timeout

    async def master_of(self, job_id: bytes) -> str:
        return self._state.master(job_id)

    async def ranked_masters(self, job_id: bytes) -> list[str]:
        return self._state.ranked(job_id)

    async def heartbeat(self, job_id: bytes) -> str:
        return self._state._heartbeat(self._address, bytes32_arg("job_id", job_id))

    async def take_over(self, job_id: bytes) -> str:
        return self._state._take_over(self._address, bytes32_arg("job_id", job_id))

    async def settle(
        self, job_id: bytes, root: bytes, accepted_results: int, partner_total: int
    ) -> Settled:
        return self._state._settle(
            self._address,
            bytes32_arg("job_id", job_id),
            bytes32_arg("root", root),
            uint_arg("accepted_results", accepted_results),
            uint_arg("partner_total", partner_total),
        )

    async def settlement(self, job_id: bytes) -> Settled | None:
        """What the job's settlement paid, or None while it is not settled."""
        return self._state.settlement_of(job_id)

    async def claim(self, job_id: bytes, account: str, amount: int, proof: list[bytes]) -> str:
        return self._state._claim(
            self._address,
            bytes32_arg("job_id", job_id),
            self._state.canonical(account, "account"),
            uint_arg("amount", amount),
            [bytes32_arg(f"proof[{i}]", p) for i, p in enumerate(proof)],
        )

    async def has_claimed(self, job_id: bytes, account: str) -> bool:
        return self._state.claimed(job_id, account)

    async def earnings(self, account: str) -> Earnings:
        """What the escrow has paid `account` (see `Earnings`)."""
        return self._state.earned(account)

    async def refund(self, job_id: bytes) -> str:
        return self._state._refund(self._address, bytes32_arg("job_id", job_id))

    # ------------------------------------------------------------ price feed

    async def raven_usd_price(self) -> PriceQuote:
        """The RAVEN/USD feed's latest round; ChainError when the deployment has no feed."""
        return self._state.usd_price()

