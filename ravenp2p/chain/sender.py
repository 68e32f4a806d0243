"""Signing and sending transactions for one account, with the revert reason on every backend.

Every transaction is first simulated with `eth_call` (a JSON-RPC node reports a
mined transaction's failure only as `status = 0`, without the reason), then
built with an explicit nonce, signed locally with the account's key and sent
raw, so the same code works against the embedded chain and any node, which
never needs to hold a key.
"""

from __future__ import annotations

import logging
from typing import Any

from eth_account import Account
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound
from web3.types import TxParams, TxReceipt

from ravenp2p.chain.base import ContractReverted
from ravenp2p.chain.errors import chain_errors, endpoint_of

logger = logging.getLogger("ravenp2p.chain")

GAS_MARGIN_PERCENT = 20  # estimates can fall short when state shifts between estimate and mining
DEFAULT_RECEIPT_TIMEOUT = 120.0
_NONCE_ERROR_HINTS = ("nonce", "replacement transaction underpriced")


class TransactionSender:
    """Builds, signs and sends the transactions of one account, tracking its nonce."""

    def __init__(
        self, w3: Web3, secret: bytes, receipt_timeout: float = DEFAULT_RECEIPT_TIMEOUT
    ) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) != 32:
            got = len(secret) if isinstance(secret, bytes | bytearray) else type(secret).__name__
            raise ValueError(f"an account secret must be 32 bytes, got {got}")
        self.w3 = w3
        self.account = Account.from_key(bytes(secret))
        self.address: str = self.account.address
        self.receipt_timeout = receipt_timeout
        with chain_errors(w3, "chain", "eth_chainId"):
            self.chain_id: int = w3.eth.chain_id
        self._nonce = 0
        self.resync_nonce()

    def resync_nonce(self) -> None:
        """Re-read the account's next nonce from the chain (pending transactions included).

        Needed after anything that rewinds the chain under this object (a
        snapshot revert) or another process sending with the same key.
        """
        with chain_errors(self.w3, "chain", "eth_getTransactionCount"):
            self._nonce = self.w3.eth.get_transaction_count(self.address, "pending")

    def transact(
        self, contract: str, function: str, to: str, data: str, value: int = 0
    ) -> TxReceipt:
        """Simulate, send and mine a call of `contract.function`; raise if it reverts.

        Blocks until the transaction is mined: for scripts and deployments.
        Async code uses `submit` and polls `receipt_of` between sleeps.
        """
        tx_hash = self.submit(contract, function, to, data, value)
        return self._wait(contract, function, tx_hash)

    def deploy(self, contract: str, init_code: str) -> TxReceipt:
        """Deploy `init_code` (bytecode plus encoded constructor arguments)."""
        call: TxParams = {"from": self.address, "data": init_code}
        return self._wait(contract, "constructor", self._submit(contract, "constructor", call))

    def submit(
        self, contract: str, function: str, to: str, data: str, value: int = 0
    ) -> HexBytes:
        """Simulate and send a call of `contract.function`; the hash of the sent transaction."""
        call: TxParams = {"from": self.address, "to": to, "data": data, "value": value}
        return self._submit(contract, function, call)

    def receipt_of(self, contract: str, function: str, tx_hash: HexBytes) -> TxReceipt | None:
        """The transaction's receipt once it is mined (checked: raises if it failed), else None."""
        with chain_errors(self.w3, contract, function):
            try:
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                return None
        return self._checked(contract, function, tx_hash, receipt)

    def _wait(self, contract: str, function: str, tx_hash: HexBytes) -> TxReceipt:
        with chain_errors(self.w3, contract, function):
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.receipt_timeout, poll_latency=0.05
            )
        return self._checked(contract, function, tx_hash, receipt)

    def _submit(self, contract: str, function: str, call: TxParams) -> HexBytes:
        w3 = self.w3
        with chain_errors(w3, contract, function):
            # eth_call first: its failure carries the exact revert data on every backend
            # (eth-tester's gas estimate mangles custom errors whose first argument is a string).
            # Against the pending block, whose timestamp is the one the transaction will be
            # mined with: "latest" would judge deadlines one block early.
            w3.eth.call(call, "pending")
            gas = w3.eth.estimate_gas(call)
            tx: dict[str, Any] = dict(call)
            tx["gas"] = gas + gas * GAS_MARGIN_PERCENT // 100
            tx["chainId"] = self.chain_id
            tip = w3.eth.max_priority_fee
            base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas", 0))
            tx["maxPriorityFeePerGas"] = tip
            tx["maxFeePerGas"] = 2 * base_fee + tip
            return self._sign_and_send(tx)

    def _checked(
        self, contract: str, function: str, tx_hash: HexBytes, receipt: TxReceipt
    ) -> TxReceipt:
        label = f"{contract}.{function}"
        if receipt["status"] != 1:
            raise ContractReverted(
                contract,
                function,
                f"transaction {tx_hash.to_0x_hex()} failed in block {receipt['blockNumber']} "
                "although its simulation succeeded (the chain state changed in between)",
            )
        logger.info(
            "%s mined: tx %s, gas used %d, block %d",
            label,
            tx_hash.to_0x_hex(),
            receipt["gasUsed"],
            receipt["blockNumber"],
        )
        return receipt

    def _sign_and_send(self, tx: dict[str, Any]) -> HexBytes:
        for attempt in (1, 2):
            tx["nonce"] = self._nonce
            signed = self.account.sign_transaction(tx)
            try:
                tx_hash = HexBytes(self.w3.eth.send_raw_transaction(signed.raw_transaction))
            except Exception as exc:
                text = str(exc).lower()
                if "already known" in text:  # the node holds this very transaction: it is sent
                    tx_hash = HexBytes(signed.hash)
                elif attempt == 1 and any(hint in text for hint in _NONCE_ERROR_HINTS):
                    logger.warning(
                        "nonce %d of %s refused by %s (%s); resyncing",
                        self._nonce, self.address, endpoint_of(self.w3), exc,
                    )
                    self.resync_nonce()
                    continue
                else:
                    raise
            self._nonce += 1
            return tx_hash
        raise AssertionError("unreachable: the second attempt returns or raises")
