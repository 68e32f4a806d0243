"""Paid inference: one on-chain RAVEN transfer pays for one call, once.

The caller transfers the model's price to the publisher's address and sends
the transaction hash with its request. The publisher reads the mined
receipt's `Transfer` events of the deployment's token: the transfers from
the caller's address (derived from its peer id, never taken from the
request) to its own address must add up to the price. A hash is accepted
for one call only: the ledger keeps every accepted hash on disk, written
before the reply leaves, and holds a hash while a call that uses it runs,
so two concurrent requests with one hash cannot both be served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ravenp2p.chain.base import Chain, ChainError
from ravenp2p.market.records import TX_HASH_PATTERN
from ravenp2p.training.spec import format_amount

log = logging.getLogger("ravenp2p.market")

_TX_HASH = re.compile(TX_HASH_PATTERN)


class PaymentRefused(Exception):
    """A call's payment is missing, short, not the caller's or already used (the message says)."""


class PaymentLedger:
    """Transaction hashes accepted as payment, kept in a file (one hash a line); None: memory."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._used: set[str] = self._load() if path is not None else set()
        self._holding: set[str] = set()

    def __len__(self) -> int:
        return len(self._used)

    def is_used(self, tx_hash: str) -> bool:
        return tx_hash.lower() in self._used

    @contextlib.contextmanager
    def holding(self, tx_hash: str) -> Iterator[None]:
        """Reserve `tx_hash` for one call while it runs; `PaymentRefused` if used or held.

        Inside, `commit` marks it used for good; leaving without a commit
        frees it again (the call failed: the caller may retry with it).
        """
        tx = tx_hash.lower()
        if tx in self._used:
            raise PaymentRefused(f"payment: transaction {tx} already paid for an earlier call")
        if tx in self._holding:
            raise PaymentRefused(f"payment: transaction {tx} is paying for a call in progress")
        self._holding.add(tx)
        try:
            yield
        finally:
            self._holding.discard(tx)

    def commit(self, tx_hash: str) -> None:
        """Mark `tx_hash` used, on disk (flushed and synced) before this returns.

        Raises OSError when it cannot be written: the call must then not be answered.
        """
        tx = tx_hash.lower()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{tx}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        self._used.add(tx)

    def _load(self) -> set[str]:
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return set()
        used = {line.strip() for line in text.splitlines() if _TX_HASH.fullmatch(line.strip())}
        damaged = sum(1 for line in text.splitlines() if line.strip()) - len(used)
        if damaged > 0:
            log.warning("Ignored %d damaged lines of the payment ledger %s", damaged, self.path)
        return used


async def check_payment(chain: Chain, tx_hash: str, payer: str, price: int) -> int:
    """How much `tx_hash` paid this chain account from `payer`; `PaymentRefused` below `price`.

    `payer` is the caller's address (derived from its peer id). Only the
    deployment's token counts (see `Chain.token_transfers`).
    """
    if not _TX_HASH.fullmatch(tx_hash):
        raise PaymentRefused(f"payment: {tx_hash!r} is not a transaction hash")
    try:
        transfers = await chain.token_transfers(tx_hash)
    except ChainError as exc:
        raise PaymentRefused(f"payment: {exc}") from None
    payee = chain.address.lower()
    paid = sum(t.amount for t in transfers
               if t.sender.lower() == payer.lower() and t.recipient.lower() == payee)
    if paid < price:
        raise PaymentRefused(
            f"payment: transaction {tx_hash} moved {format_amount(paid)} RAVEN from {payer} to "
            f"{chain.address}; a call costs {format_amount(price)} RAVEN"
        )
    return paid
