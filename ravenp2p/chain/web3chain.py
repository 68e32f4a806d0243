"""`Chain` over web3.py: the embedded eth-tester chain or any JSON-RPC node.

The methods are `async` to fit the roles. Each JSON-RPC request runs inline
(the embedded chain is in-process, and a node answers a request in
milliseconds), but waiting for a transaction to be mined sleeps between polls
of its receipt, so a chain with real block times never stalls the node's other
tasks for a block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import trio
from eth_typing import HexStr
from eth_utils import to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import TransactionNotFound
from web3.logs import DISCARD
from web3.types import BlockIdentifier, TxReceipt

from consensus.eip712 import Domain
from ravenp2p.chain.arguments import (
    UINT64_MAX,
    bytes32_arg,
    sign_result,
    sign_slash_order,
    signature_arg,
    uint_arg,
)
from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import (
    ChainError,
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
from ravenp2p.chain.errors import chain_errors, endpoint_of
from ravenp2p.chain.sender import TransactionSender
from ravenp2p.identity import NodeIdentity

PERMIT_VALIDITY = 3600  # seconds a permit signed for one transaction stays usable
RECEIPT_FIRST_POLL_S = 0.005  # automining chains answer at once; real ones take a block
RECEIPT_MAX_POLL_S = 1.0
UINT32_MAX = 2**32 - 1
TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
# The registry events that change the candidate list or an active stake.
TABLE_EVENTS = ("StakeChanged", "CandidateAdded", "CandidateRemoved")



def _address(name: str, value: str) -> str:
    try:
        return str(to_checksum_address(value))
    except (ValueError, TypeError):
        raise ValueError(f"{name} is not a 20-byte hex address: {value!r}") from None



class Web3Chain:
    """The `Chain` interface for one account (the node key) on a deployment of the contracts."""

    def __init__(
        self,
        w3: Web3,
        deployment: Deployment,
        secret: bytes,
        receipt_timeout: float = 120.0,
    ) -> None:
        self._w3 = w3
        self._deployment = deployment
        self._identity = NodeIdentity.from_secret(bytes(secret))
        self._sender = TransactionSender(w3, bytes(secret), receipt_timeout)
        if self._sender.chain_id != deployment.chain_id:
            raise ChainError(
                f"the deployment is for chain id {deployment.chain_id} but the node at "
                f"{endpoint_of(w3)} runs chain id {self._sender.chain_id}"
            )
        self._contracts: dict[str, Contract] = {}
        contracts = [
            ("RavenToken", deployment.token),
            ("StakeRegistry", deployment.registry),
            ("JobEscrow", deployment.escrow),
        ]
        if deployment.price_feed is not None:  # any AggregatorV3 feed: PriceFeed's ABI has it
            contracts.append(("PriceFeed", deployment.price_feed))
        for name, address in contracts:
            checksummed = _address(f"deployment {name} address", address)
            with chain_errors(w3, name, "eth_getCode"):
                code = w3.eth.get_code(checksummed)
            if not code:
                raise ChainError(
                    f"no contract at {checksummed} (the deployment's {name}) on "
                    f"{endpoint_of(w3)}: wrong chain or stale deployment file?"
                )
            self._contracts[name] = w3.eth.contract(
                address=checksummed, abi=load_artifact(name).abi
            )
        self._result_domain: Domain | None = None
        self._master_timeout: int | None = None

    # ------------------------------------------------------------ plumbing

    @property
    def address(self) -> str:
        """This account's address (the node's address)."""
        return self._sender.address

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    @property
    def w3(self) -> Web3:
        """The web3 connection this chain object uses."""
        return self._w3

    def resync_nonce(self) -> None:
        """Re-read this account's nonce from the chain (after a snapshot revert, say)."""
        self._sender.resync_nonce()

    def _view(
        self, contract: str, function: str, *args: Any, block: BlockIdentifier = "latest"
    ) -> Any:
        with chain_errors(self._w3, contract, function):
            call = getattr(self._contracts[contract].functions, function)(*args)
            return call.call(block_identifier=block)

    async def _transact(self, contract: str, function: str, *args: Any) -> TxReceipt:
        """Send a transaction and wait for it to be mined, sleeping (not blocking) in between."""
        target = self._contracts[contract]
        data = target.encode_abi(function, args=list(args))
        tx_hash = self._sender.submit(contract, function, target.address, data)
        poll = RECEIPT_FIRST_POLL_S
        try:
            with trio.fail_after(self._sender.receipt_timeout):
                while (receipt := self._sender.receipt_of(contract, function, tx_hash)) is None:
                    await trio.sleep(poll)
                    poll = min(poll * 2, RECEIPT_MAX_POLL_S)
        except trio.TooSlowError:
            raise ChainError(
                f"{contract}.{function}: transaction {tx_hash.to_0x_hex()} not mined within "
                f"{self._sender.receipt_timeout:.0f} s at {endpoint_of(self._w3)}"
            ) from None
        return receipt

    async def _tx(self, contract: str, function: str, *args: Any) -> str:
        receipt = await self._transact(contract, function, *args)
        return str(receipt["transactionHash"].to_0x_hex())

    def _latest_timestamp(self) -> int:
        with chain_errors(self._w3, "chain", "eth_getBlockByNumber"):
            return int(self._w3.eth.get_block("latest")["timestamp"])

    def _sign_permit(self, spender: str, amount: int) -> tuple[int, int, bytes, bytes]:
        """An EIP-2612 permit for `spender` to take `amount` of this account's tokens."""
        token = "RavenToken"
        _, name, version, chain_id, verifying, _, _ = self._view(token, "eip712Domain")
        nonce = self._view(token, "nonces", self.address)
        deadline = self._latest_timestamp() + PERMIT_VALIDITY
        signed = self._sender.account.sign_typed_data(
            domain_data={
                "name": name,
                "version": version,
                "chainId": chain_id,
                "verifyingContract": verifying,
            },
            message_types={
                "Permit": [
                    {"name": "owner", "type": "address"},
                    {"name": "spender", "type": "address"},
                    {"name": "value", "type": "uint256"},
                    {"name": "nonce", "type": "uint256"},
                    {"name": "deadline", "type": "uint256"},
                ]
            },
            message_data={
                "owner": self.address,
                "spender": spender,
                "value": amount,
                "nonce": nonce,
                "deadline": deadline,
            },
        )
        return deadline, signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")

    def _domain(self) -> Domain:
        if self._result_domain is None:
            _, name, version, chain_id, verifying, _, _ = self._view(
                "StakeRegistry", "eip712Domain"
            )
            self._result_domain = Domain(chain_id, verifying, name, version)
        return self._result_domain

    # ---------------------------------------------------------------- clock

    async def now(self) -> int:
        """The latest block's timestamp: the clock the contracts judge deadlines by."""
        return self._latest_timestamp()

    # ---------------------------------------------------------------- token

    async def balance_of(self, account: str) -> int:
        return int(self._view("RavenToken", "balanceOf", _address("account", account)))

    async def eth_balance(self, account: str) -> int:
        """The account's ether in wei: what it has to pay gas with."""
        checked = _address("account", account)
        with chain_errors(self._w3, "chain", "eth_getBalance"):
            return int(self._w3.eth.get_balance(checked))

    async def transfer(self, to: str, amount: int) -> str:
        return await self._tx("RavenToken", "transfer", _address("to", to),
                              uint_arg("amount", amount))

    async def token_transfers(self, tx_hash: str) -> list[TokenTransfer]:
        """The RAVEN transfers a mined, successful transaction made (its token `Transfer` events).

        Events of other contracts that merely share the `Transfer` signature
        are left out. ChainError when the transaction is unknown, not mined
        yet, or failed; ValueError for a malformed hash.
        """
        if not isinstance(tx_hash, str) or not TX_HASH.fullmatch(tx_hash):
            raise ValueError(f"tx_hash must be 0x and 64 hex digits, got {tx_hash!r}")
        token = self._contracts["RavenToken"]
        with chain_errors(self._w3, "RavenToken", "eth_getTransactionReceipt"):
            try:
                receipt = self._w3.eth.get_transaction_receipt(HexStr(tx_hash))
            except TransactionNotFound:
                raise ChainError(
                    f"transaction {tx_hash} is not mined on {endpoint_of(self._w3)} "
                    "(unknown, or still pending)"
                ) from None
        if int(receipt["status"]) != 1:
            raise ChainError(f"transaction {tx_hash} failed on-chain: it moved nothing")
        events = token.events.Transfer().process_receipt(receipt, errors=DISCARD)
        return [
            TokenTransfer(
                sender=str(to_checksum_address(event["args"]["from"])),
                recipient=str(to_checksum_address(event["args"]["to"])),
                amount=int(event["args"]["value"]),
            )
            for event in events
            if event["address"] == token.address
        ]

    async def mint(self, to: str, amount: int) -> str:
        """Create `amount` RAVEN for `to`; only the token's owner (the deployer) may."""
        return await self._tx("RavenToken", "mint", _address("to", to), uint_arg("amount", amount))

    # ------------------------------------------------------- stake registry

    async def registry_params(self) -> RegistryParams:
        return RegistryParams(*(int(v) for v in self._view("StakeRegistry", "params")))

    async def stake(self, amount: int) -> str:
        """Stake `amount` of this account's tokens in one transaction (EIP-2612 permit)."""
        uint_arg("amount", amount)
        deadline, v, r, s = self._sign_permit(self._deployment.registry, amount)
        return await self._tx("StakeRegistry", "stakeWithPermit", amount, deadline, v, r, s)

    async def request_unbond(self, amount: int) -> str:
        return await self._tx("StakeRegistry", "requestUnbond", uint_arg("amount", amount))

    async def withdraw(self) -> str:
        return await self._tx("StakeRegistry", "withdraw")

    async def become_candidate(self) -> str:
        return await self._tx("StakeRegistry", "becomeCandidate")

    async def leave_candidacy(self) -> str:
        """Leave the master candidate set."""
        return await self._tx("StakeRegistry", "leaveCandidacy")

    async def set_partner(self, partner: str) -> str:
        return await self._tx("StakeRegistry", "setPartner", _address("partner", partner))

    async def stake_of(self, node: str) -> StakeInfo:
        active, unbonding, release = self._view("StakeRegistry", "stakeOf", _address("node", node))
        return StakeInfo(int(active), int(unbonding), int(release))

    async def partner_of(self, node: str) -> str | None:
        """The node's website partner, or None when it has none."""
        partner = str(self._view("StakeRegistry", "partnerOf", _address("node", node)))
        return None if int(partner, 16) == 0 else str(to_checksum_address(partner))

    async def partnered_nodes(self, partner: str) -> list[str]:
        """The nodes that name `partner` as their website partner now, in order of first naming.

        Found through the registry's `PartnerSet` events since block 0, each
        checked against the node's current partner.
        """
        partner = _address("partner", partner)
        events = self._contracts["StakeRegistry"].events.PartnerSet
        with chain_errors(self._w3, "StakeRegistry", "PartnerSet logs"):
            logs = events.get_logs(argument_filters={"partner": partner}, from_block=0)
        named = dict.fromkeys(str(to_checksum_address(log["args"]["node"])) for log in logs)
        return [node for node in named if await self.partner_of(node) == partner]

    async def candidates(self) -> list[str]:
        return [str(to_checksum_address(a)) for a in self._view("StakeRegistry", "candidates")]

    async def current_epoch(self) -> int:
        return int(self._view("StakeRegistry", "currentEpoch"))

    async def elect(self) -> str:
        return await self._tx("StakeRegistry", "elect")

    async def is_elected(self, epoch: int) -> bool:
        return bool(self._view("StakeRegistry", "isElected", uint_arg("epoch", epoch)))

    async def election_table(self, epoch: int) -> ElectionTable:
        """The public data of `epoch`'s election, read back from the chain (see `ElectionTable`).

        The candidates and stakes are those of the block before the election,
        updated with the registry's own events mined earlier in the election's
        block: exactly the state the election transaction read.
        """
        uint_arg("epoch", epoch)
        elected = self._contracts["StakeRegistry"].events.CommitteeElected
        with chain_errors(self._w3, "StakeRegistry", "CommitteeElected logs"):
            events = elected.get_logs(argument_filters={"epoch": epoch}, from_block=0)
        if not events:
            if await self.is_elected(epoch):
                raise ChainError(
                    f"epoch {epoch} is elected but {endpoint_of(self._w3)} returns no "
                    "CommitteeElected event for it: does the node keep old logs?"
                )
            raise ChainError(f"epoch {epoch} is not elected: it has no committee")
        if len(events) > 1:
            raise ChainError(f"epoch {epoch} has {len(events)} CommitteeElected events, not one")
        event = events[0]
        block = int(event["blockNumber"])
        candidates, stake_changes = self._table_before(block, int(event["transactionIndex"]))
        stakes = []
        for candidate in candidates:
            stake = stake_changes.get(candidate)
            if stake is None:
                stake = int(self._view("StakeRegistry", "stakeOf", candidate, block=block - 1)[0])
            stakes.append(stake)
        params = await self.registry_params()
        with chain_errors(self._w3, "chain", "eth_getBlockByNumber"):
            parent_hash = bytes(self._w3.eth.get_block(block - 1)["hash"])
        return ElectionTable(
            epoch=epoch,
            block=block,
            parent_hash=parent_hash,
            seed=bytes(event["args"]["seed"]),
            candidates=tuple(candidates),
            stakes=tuple(stakes),
            minimum=params.min_master_stake,
            committee_size=params.committee_size,
            committee=tuple(event["args"]["committee"]),
        )

    def _table_before(self, block: int, tx_index: int) -> tuple[list[str], dict[str, int]]:
        """The candidate list the election in transaction `tx_index` of `block` walked.

        Starts from the state of `block - 1` and replays, in order, the
        registry's candidate and stake events of the earlier transactions of
        `block`; also returns the active stakes those events set.
        """
        raw = self._view("StakeRegistry", "candidates", block=block - 1)
        candidates = [str(to_checksum_address(a)) for a in raw]
        events = self._contracts["StakeRegistry"].events
        by_topic = {event.topic: event for event in (getattr(events, n) for n in TABLE_EVENTS)}
        with chain_errors(self._w3, "StakeRegistry", "eth_getLogs"):
            raw_logs = self._w3.eth.get_logs({
                "address": self._contracts["StakeRegistry"].address,
                "fromBlock": block,
                "toBlock": block,
                "topics": [list(by_topic)],
            })
        earlier = [
            by_topic[log["topics"][0].to_0x_hex()]().process_log(log)
            for log in raw_logs
            if int(log["transactionIndex"]) < tx_index
        ]
        earlier.sort(key=lambda log: (int(log["transactionIndex"]), int(log["logIndex"])))
        stakes: dict[str, int] = {}
        for log in earlier:
            node = str(to_checksum_address(log["args"]["node"]))
            if log["event"] == "StakeChanged":
                stakes[node] = int(log["args"]["active"])
            elif log["event"] == "CandidateAdded":
                candidates.append(node)
            elif node in candidates:  # CandidateRemoved: the last candidate takes the free slot
                candidates[candidates.index(node)] = candidates[-1]
                candidates.pop()
            else:
                raise ChainError(
                    f"block {block}: CandidateRemoved for {node}, which was not a candidate"
                )
        return candidates, stakes

    async def committee(self, epoch: int) -> list[str]:
        members = self._view("StakeRegistry", "committee", uint_arg("epoch", epoch))
        return [str(to_checksum_address(a)) for a in members]

    async def epoch_seed(self, epoch: int) -> bytes:
        return bytes(self._view("StakeRegistry", "epochSeed", uint_arg("epoch", epoch)))

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
        return await self._tx(
            "StakeRegistry",
            "slashEquivocation",
            _address("worker", worker),
            bytes32_arg("job_id", job_id),
            uint_arg("calculation", calculation, UINT64_MAX),
            bytes32_arg("digest_a", digest_a),
            signature_arg("signature_a", signature_a),
            bytes32_arg("digest_b", digest_b),
            signature_arg("signature_b", signature_b),
        )

    async def slash_by_committee(
        self, offender: str, amount: int, evidence: bytes, epoch: int, signatures: list[bytes]
    ) -> str:
        order = (
            _address("offender", offender),
            uint_arg("amount", amount),
            bytes32_arg("evidence", evidence),
            uint_arg("epoch", epoch),
        )
        sigs = [signature_arg(f"signatures[{i}]", s) for i, s in enumerate(signatures)]
        return await self._tx("StakeRegistry", "slashByCommittee", order, sigs)

    def sign_result(self, job_id: bytes, calculation: int, digest: bytes) -> bytes:
        """This account's EIP-712 `Result` signature (see `arguments.sign_result`)."""
        return sign_result(self._identity, self._domain(), job_id, calculation, digest)

    def sign_slash_order(self, offender: str, amount: int, evidence: bytes, epoch: int) -> bytes:
        """This account's EIP-712 `SlashOrder` signature as committee member."""
        return sign_slash_order(self._identity, self._domain(), _address("offender", offender),
                                amount, evidence, epoch)

    # ----------------------------------------------------------- job escrow

    async def create_job(
        self,
        job_id: bytes,
        price: int,
        redundancy: int,
        max_calculations: int,
        deadline: int,
        deposit: int,
    ) -> str:
        """Open the job with its deposit in one transaction (EIP-2612 permit)."""
        args = (
            bytes32_arg("job_id", job_id),
            uint_arg("price", price),
            uint_arg("redundancy", redundancy, UINT32_MAX),
            uint_arg("max_calculations", max_calculations, UINT64_MAX),
            uint_arg("deadline", deadline, UINT64_MAX),
            uint_arg("deposit", deposit),
        )
        permit_deadline, v, r, s = self._sign_permit(self._deployment.escrow, deposit)
        return await self._tx("JobEscrow", "createJobWithPermit", *args, permit_deadline, v, r, s)

    async def job(self, job_id: bytes) -> JobOnChain:
        raw = self._view("JobEscrow", "getJob", bytes32_arg("job_id", job_id))
        return _job_from_tuple(job_id, raw)

    async def master_timeout(self) -> int:
        """The escrow's master timeout in seconds (immutable, so read once)."""
        if self._master_timeout is None:
            self._master_timeout = int(self._view("JobEscrow", "masterTimeout"))
        return self._master_timeout

    async def master_of(self, job_id: bytes) -> str:
        master = self._view("JobEscrow", "masterOf", bytes32_arg("job_id", job_id))
        return str(to_checksum_address(master))

    async def ranked_masters(self, job_id: bytes) -> list[str]:
        masters = self._view("JobEscrow", "rankedMasters", bytes32_arg("job_id", job_id))
        return [str(to_checksum_address(a)) for a in masters]

    async def heartbeat(self, job_id: bytes) -> str:
        return await self._tx("JobEscrow", "heartbeat", bytes32_arg("job_id", job_id))

    async def take_over(self, job_id: bytes) -> str:
        return await self._tx("JobEscrow", "takeOver", bytes32_arg("job_id", job_id))

    async def settle(
        self, job_id: bytes, root: bytes, accepted_results: int, partner_total: int
    ) -> Settled:
        receipt = await self._transact(
            "JobEscrow",
            "settle",
            bytes32_arg("job_id", job_id),
            bytes32_arg("root", root),
            uint_arg("accepted_results", accepted_results),
            uint_arg("partner_total", partner_total),
        )
        events = self._contracts["JobEscrow"].events.JobSettled().process_receipt(
            receipt, errors=DISCARD
        )
        if len(events) != 1:
            raise ChainError(f"settle: expected one JobSettled event, found {len(events)}")
        return _settled(events[0])

    async def settlement(self, job_id: bytes) -> Settled | None:
        """What the job's settlement paid (its `JobSettled` event), or None while unsettled."""
        settled = self._contracts["JobEscrow"].events.JobSettled
        with chain_errors(self._w3, "JobEscrow", "JobSettled logs"):
            events = settled.get_logs(
                argument_filters={"jobId": bytes32_arg("job_id", job_id)}, from_block=0
            )
        if len(events) > 1:
            raise ChainError(f"job 0x{job_id.hex()} has {len(events)} JobSettled events")
        return _settled(events[0]) if events else None

    async def claim(self, job_id: bytes, account: str, amount: int, proof: list[bytes]) -> str:
        return await self._tx(
            "JobEscrow",
            "claim",
            bytes32_arg("job_id", job_id),
            _address("account", account),
            uint_arg("amount", amount),
            [bytes32_arg(f"proof[{i}]", p) for i, p in enumerate(proof)],
        )

    async def has_claimed(self, job_id: bytes, account: str) -> bool:
        return bool(
            self._view(
                "JobEscrow", "hasClaimed", bytes32_arg("job_id", job_id),
                _address("account", account),
            )
        )

    async def earnings(self, account: str) -> Earnings:
        """What the escrow has paid `account` (see `Earnings`), from its events since block 0.

        Claims are the escrow's `Claimed` events for the account. Master fees
        are found through the token's transfers from the escrow to the account:
        a transfer made by neither a claim nor a refund was made by a
        settlement, whose `JobSettled` event counts when the account is the
        job's master (a requester's refund and the treasury's protocol fee are
        paid by the same transaction).
        """
        account = _address("account", account)
        escrow = self._contracts["JobEscrow"]
        with chain_errors(self._w3, "JobEscrow", "Claimed logs"):
            claims = escrow.events.Claimed.get_logs(
                argument_filters={"account": account}, from_block=0
            )
        with chain_errors(self._w3, "JobEscrow", "Refunded logs"):
            refunds = escrow.events.Refunded.get_logs(
                argument_filters={"requester": account}, from_block=0
            )
        with chain_errors(self._w3, "RavenToken", "Transfer logs"):
            transfers = self._contracts["RavenToken"].events.Transfer.get_logs(
                argument_filters={"from": escrow.address, "to": account}, from_block=0
            )
        not_settlements = {log["transactionHash"] for log in (*claims, *refunds)}
        settlements = {log["transactionHash"] for log in transfers} - not_settlements
        master_fees = settled = 0
        for tx_hash in sorted(settlements):
            with chain_errors(self._w3, "JobEscrow", "eth_getTransactionReceipt"):
                receipt = self._w3.eth.get_transaction_receipt(tx_hash)
            for event in escrow.events.JobSettled().process_receipt(receipt, errors=DISCARD):
                if event["address"] != escrow.address:
                    continue
                if await self.master_of(bytes(event["args"]["jobId"])) == account:
                    master_fees += int(event["args"]["masterFee"])
                    settled += 1
        claimed = sum(int(log["args"]["amount"]) for log in claims)
        return Earnings(claimed, len(claims), master_fees, settled)

    async def refund(self, job_id: bytes) -> str:
        return await self._tx("JobEscrow", "refund", bytes32_arg("job_id", job_id))

    # ----------------------------------------------------------- price feed

    async def raven_usd_price(self) -> PriceQuote:
        """The RAVEN/USD feed's latest round, unchecked (see `ravenp2p.chain.pricing`)."""
        if "PriceFeed" not in self._contracts:
            raise ChainError(
                "the deployment names no price feed (deployment.price_feed): USD prices "
                "cannot be converted to RAVEN"
            )
        decimals = int(self._view("PriceFeed", "decimals"))
        round_id, answer, started_at, updated_at, answered_in = self._view(
            "PriceFeed", "latestRoundData"
        )
        return PriceQuote(
            feed=self._contracts["PriceFeed"].address,
            round_id=int(round_id),
            answer=int(answer),
            started_at=int(started_at),
            updated_at=int(updated_at),
            answered_in_round=int(answered_in),
            decimals=decimals,
        )

    async def set_usd_price(self, answer: int) -> str:
        """Publish a new RAVEN/USD round on the deployment's `PriceFeed`; only its owner may.

        `answer` is USD per RAVEN with the feed's decimals (8 for deployed feeds).
        """
        if "PriceFeed" not in self._contracts:
            raise ChainError("the deployment names no price feed (deployment.price_feed)")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise ValueError(f"answer must be an integer, got {type(answer).__name__}")
        if not -(2**255) <= answer < 2**255:
            raise ValueError(f"answer must fit an int256, got {answer}")
        return await self._tx("PriceFeed", "setPrice", answer)


def _job_from_tuple(job_id: bytes, raw: Sequence[Any]) -> JobOnChain:
    """A `getJob` result (the escrow's struct, in `JobOnChain`'s field order) as `JobOnChain`."""
    fields: list[Any] = list(raw)
    convert: list[Callable[[Any], Any]] = [
        lambda a: str(to_checksum_address(a)),
        int, int, int, int, int, int, int, int,
        lambda s: JobStatusOnChain(int(s)),
        bytes, int, int,
    ]
    if len(fields) != len(convert):
        raise ChainError(f"getJob returned {len(fields)} fields, expected {len(convert)}")
    values = [f(v) for f, v in zip(convert, fields, strict=True)]
    return JobOnChain(bytes(job_id), *values)


def _settled(event: Any) -> Settled:
    args = event["args"]
    return Settled(
        tx_hash=event["transactionHash"].to_0x_hex(),
        accepted_results=int(args["acceptedResults"]),
        cost=int(args["cost"]),
        master_fee=int(args["masterFee"]),
        partner_total=int(args["partnerTotal"]),
        protocol_fee=int(args["protocolFee"]),
        refund=int(args["refund"]),
    )
