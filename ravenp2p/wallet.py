"""A contributor's money on the chain: what `ravenp2p wallet`, `stake`, `unstake` and `withdraw` do.

Everything goes through `Web3Chain` as the node's own key, or, to look at any
address, reads only. Amounts are RAVEN base units here; `lines()` formats
them for people and `to_json()` writes them as decimal strings, so that no
JSON reader rounds a uint256. A contract's refusal becomes a `WalletError`:
one line that names the command, says what was wrong in the wallet's terms
and ends with the contract's own reason.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consensus.abi import checksum_address
from ravenp2p.chain.base import ChainError, ContractReverted, Earnings, StakeInfo
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.training.spec import format_amount, parse_amount


class WalletError(ChainError):
    """The chain refused a wallet operation, or the node cannot pay for it; the message says why."""


def parse_positive_amount(text: str) -> int:
    """RAVEN written as a decimal ("12.5") in base units; zero, negatives and junk are refused."""
    amount = parse_amount("amount", text)
    if amount == 0:
        raise ValueError(f"amount: must be more than 0 RAVEN, got {text!r}")
    return amount


def open_wallet(chain_url: str | None, contracts: Path | None, data_dir: Path | None) -> Web3Chain:
    """Connect to the deployment in `contracts` on `chain_url`, as the key in `data_dir`.

    With `data_dir` None the connection only reads: a throwaway key stands in
    for the account a `Web3Chain` needs, and nothing is ever sent with it.
    Raises `ConfigError` for a missing or malformed setting (before anything
    is read), `IdentityError` when the data dir holds no usable key and
    `ChainError` naming the URL or the file when the chain cannot be used.
    """
    from ravenp2p.chain.deploy import load_deployment
    from ravenp2p.chain.devchain import connect
    from ravenp2p.identity import NodeIdentity, load_identity
    from ravenp2p.node.config import ConfigError

    if chain_url is None:
        raise ConfigError("chain: --chain URL is needed (the JSON-RPC URL of an Ethereum node)")
    if not chain_url.startswith(("http://", "https://")):
        raise ConfigError(f"chain: {chain_url!r} must be an http(s):// JSON-RPC URL")
    if contracts is None:
        raise ConfigError("contracts: a deployment file is needed with --chain")
    identity = NodeIdentity.generate() if data_dir is None else load_identity(data_dir)
    deployment = load_deployment(contracts)
    return Web3Chain(connect(chain_url), deployment, identity.private_key.secret)


def utc(timestamp: int) -> str:
    """A chain timestamp as a UTC time people read: ``2025-01-31 12:00:00 UTC``."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _raven(units: int) -> str:
    return f"{format_amount(units)} RAVEN"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def stake_json(stake: StakeInfo, now: int) -> dict[str, Any]:
    """A stake as JSON: amounts as base-unit strings, the release as a time and from `now`.

    `release_time` (unix seconds), `release_at` and `release_in_s` are null
    while nothing is unbonding; `release_in_s` is 0 once the stake can be
    withdrawn.
    """
    unbonding = stake.unbonding > 0
    return {
        "active": str(stake.active),
        "unbonding": str(stake.unbonding),
        "release_time": stake.release_time if unbonding else None,
        "release_at": utc(stake.release_time) if unbonding else None,
        "release_in_s": max(0, stake.release_time - now) if unbonding else None,
        "withdrawable": unbonding and now >= stake.release_time,
    }


def _unbonding_text(stake: StakeInfo, now: int) -> str:
    if not stake.unbonding:
        return "none"
    if now >= stake.release_time:
        return f"{_raven(stake.unbonding)}, withdrawable now"
    return (f"{_raven(stake.unbonding)}, withdrawable at {utc(stake.release_time)} "
            f"(in {stake.release_time - now} s)")


@dataclass(frozen=True)
class WalletView:
    """One address's money as the chain holds it at `now` (the latest block's timestamp)."""

    address: str
    chain_id: int
    now: int
    eth_wei: int
    raven: int
    stake: StakeInfo
    candidate: bool
    min_master_stake: int
    partner: str | None
    partner_of: tuple[str, ...]
    """The nodes that name this address as their website partner."""
    earnings: Earnings

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json`: amounts as base-unit strings, counts and times as numbers."""
        return {
            "address": self.address,
            "chain_id": self.chain_id,
            "chain_time": self.now,
            "eth_wei": str(self.eth_wei),
            "raven": str(self.raven),
            "stake": stake_json(self.stake, self.now),
            "candidate": self.candidate,
            "min_master_stake": str(self.min_master_stake),
            "partner": self.partner,
            "partner_of": list(self.partner_of),
            "earnings": {
                "claimed": str(self.earnings.claimed),
                "claims": self.earnings.claims,
                "master_fees": str(self.earnings.master_fees),
                "settled_jobs": self.earnings.settled,
                "total": str(self.earnings.total),
            },
        }

    def lines(self) -> list[str]:
        """The view as a small table, one `label  value` row per line."""
        if self.candidate:
            candidate = "yes"
        elif self.stake.active < self.min_master_stake:
            candidate = f"no (a candidate needs {_raven(self.min_master_stake)} active stake)"
        else:
            candidate = "no"
        partner_of = ", ".join(self.partner_of) if self.partner_of else "no node"
        earnings = self.earnings
        rows = [
            ("address", self.address),
            ("chain", f"{self.chain_id}, clock at {utc(self.now)}"),
            ("gas", f"{format_amount(self.eth_wei)} ETH"),
            ("wallet", _raven(self.raven)),
            ("staked", f"{_raven(self.stake.active)} active"),
            ("unbonding", _unbonding_text(self.stake, self.now)),
            ("candidate", candidate),
            ("partner", self.partner or "none"),
            ("partner of", partner_of),
            ("claimed", f"{_raven(earnings.claimed)} from {_plural(earnings.claims, 'job')} "
                        "(worker pay and partner fees)"),
            ("master fees", f"{_raven(earnings.master_fees)} from "
                            f"{_plural(earnings.settled, 'settled job')}"),
        ]
        width = max(len(label) for label, _ in rows)
        return [f"{label:<{width}}  {value}" for label, value in rows]


async def read_wallet(chain: Web3Chain, address: str) -> WalletView:
    """Everything `ravenp2p wallet` shows about `address`, read from `chain`."""
    address = checksum_address(address)
    return WalletView(
        address=address,
        chain_id=chain.deployment.chain_id,
        now=await chain.now(),
        eth_wei=await chain.eth_balance(address),
        raven=await chain.balance_of(address),
        stake=await chain.stake_of(address),
        candidate=address in await chain.candidates(),
        min_master_stake=(await chain.registry_params()).min_master_stake,
        partner=await chain.partner_of(address),
        partner_of=tuple(await chain.partnered_nodes(address)),
        earnings=await chain.earnings(address),
    )


@dataclass(frozen=True)
class StakeOutcome:
    """What a `stake`, `unstake` or `withdraw` transaction did, and the node's money after it."""

    action: str
    tx: str
    address: str
    amount: int
    now: int
    stake: StakeInfo
    raven: int
    candidate: bool
    was_candidate: bool
    min_master_stake: int

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json`: amounts as base-unit strings (see `stake_json`)."""
        return {
            "action": self.action,
            "tx": self.tx,
            "address": self.address,
            "amount": str(self.amount),
            "stake": stake_json(self.stake, self.now),
            "raven": str(self.raven),
            "candidate": self.candidate,
        }

    def lines(self) -> list[str]:
        """A sentence or two for people."""
        stake = self.stake
        if self.action == "stake":
            text = (f"Staked {_raven(self.amount)} in transaction {self.tx}: "
                    f"{_raven(stake.active)} active, {_raven(self.raven)} left in the wallet.")
        elif self.action == "unstake":
            text = (f"Unbonding {_raven(self.amount)} in transaction {self.tx}: "
                    f"{_unbonding_text(stake, self.now)}; {_raven(stake.active)} stays active.")
        else:
            text = (f"Withdrew {_raven(self.amount)} in transaction {self.tx}: "
                    f"{_raven(self.raven)} in the wallet, {_raven(stake.active)} stays staked.")
        lines = [text]
        if self.was_candidate and not self.candidate:
            lines.append(f"This node is no longer a master candidate: its active stake is below "
                         f"the {_raven(self.min_master_stake)} minimum.")
        return lines


async def stake(chain: Web3Chain, amount: int) -> StakeOutcome:
    """Stake `amount` of the node's RAVEN (active at once)."""
    _check_amount(amount)
    return await _act(chain, "stake", amount, lambda: chain.stake(amount))


async def unstake(chain: Web3Chain, amount: int) -> StakeOutcome:
    """Move `amount` of active stake to unbonding; the registry's delay starts again."""
    _check_amount(amount)
    return await _act(chain, "unstake", amount, lambda: chain.request_unbond(amount))


async def withdraw(chain: Web3Chain) -> StakeOutcome:
    """Pay the node's unbonding stake back into its wallet once the delay has passed."""
    unbonding = (await chain.stake_of(chain.address)).unbonding
    return await _act(chain, "withdraw", unbonding, chain.withdraw)


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"amount: must be a positive number of base units, got {amount!r}")


async def _act(
    chain: Web3Chain, action: str, amount: int, send: Callable[[], Awaitable[str]]
) -> StakeOutcome:
    """Send one stake transaction after checking for gas; report the money after it."""
    address = chain.address
    was_candidate = address in await chain.candidates()
    if not await chain.eth_balance(address):
        raise WalletError(f"{action}: {address} holds no ETH to pay for gas; send it some first")
    try:
        tx = await send()
    except ContractReverted as exc:
        raise await _refusal(chain, action, amount, exc) from exc
    return StakeOutcome(
        action=action,
        tx=tx,
        address=address,
        amount=amount,
        now=await chain.now(),
        stake=await chain.stake_of(address),
        raven=await chain.balance_of(address),
        candidate=address in await chain.candidates(),
        was_candidate=was_candidate,
        min_master_stake=(await chain.registry_params()).min_master_stake,
    )


async def _refusal(
    chain: Web3Chain, action: str, amount: int, exc: ContractReverted
) -> WalletError:
    """The one-line error for a refused transaction, explained with the state that refused it."""
    name = exc.reason.partition("(")[0]
    stake_now = await chain.stake_of(chain.address)
    if name == "InsufficientStake":
        why = f"{_raven(amount)} is more than the active stake of {_raven(stake_now.active)}"
    elif name == "NothingToWithdraw":
        why = "nothing is unbonding"
    elif name == "StillUnbonding":
        wait = stake_now.release_time - await chain.now()
        why = (f"{_raven(stake_now.unbonding)} is unbonding until "
               f"{utc(stake_now.release_time)}, {wait} s from now")
    elif name == "ERC20InsufficientBalance":
        balance = await chain.balance_of(chain.address)
        why = f"the wallet holds {_raven(balance)}, less than {_raven(amount)}"
    else:
        return WalletError(f"{action}: refused: {exc}")
    return WalletError(f"{action}: refused: {why} ({exc})")
