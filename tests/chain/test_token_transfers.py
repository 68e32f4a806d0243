"""`Chain.token_transfers`: the RAVEN a mined transaction moved, which paid inference relies on.

Run on each backend (the embedded chain, and anvil when it is installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import ravenp2p.chain
from ravenp2p.chain.base import ChainError, TokenTransfer
from ravenp2p.chain.deploy import RAVEN
from ravenp2p.chain.sender import TransactionSender

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

FAKE_TOKEN = Path(ravenp2p.chain.__file__).parent / "artifacts" / "test" / "ReentrantToken.json"


async def test_a_transfer_reads_back_as_one_token_transfer(backend: ChainEnv) -> None:
    payer, payee = backend.nodes[0], backend.nodes[1]
    await backend.mint(payer.address, 5 * RAVEN)
    tx = await payer.transfer(payee.address, 3 * RAVEN)
    transfers = await payee.token_transfers(tx)
    assert transfers == [TokenTransfer(payer.address, payee.address, 3 * RAVEN)]
    # Anyone reads the same: it is the chain's record, not the account's.
    assert await backend.owner.token_transfers(tx) == transfers
    # A mint is a transfer from the zero address.
    mint_tx = await backend.owner.mint(payee.address, RAVEN)
    assert await payee.token_transfers(mint_tx) == [
        TokenTransfer("0x" + "00" * 20, payee.address, RAVEN)
    ]


async def test_unknown_and_malformed_hashes_are_refused(backend: ChainEnv) -> None:
    chain = backend.nodes[0]
    with pytest.raises(ChainError, match="is not mined"):
        await chain.token_transfers("0x" + "ab" * 32)
    for bad in ("0x1234", "ab" * 32, "0x" + "zz" * 32):
        with pytest.raises(ValueError, match="tx_hash must be 0x and 64 hex digits"):
            await chain.token_transfers(bad)


async def test_transfer_events_of_another_token_do_not_count(chain_env: ChainEnv) -> None:
    """A contract that emits `Transfer` events of its own pays nothing in RAVEN."""
    payer, payee = chain_env.nodes[2], chain_env.nodes[3]
    artifact = json.loads(FAKE_TOKEN.read_text())
    sender = TransactionSender(chain_env.dev.w3, chain_env.identities[2].private_key.secret)
    w3 = chain_env.dev.w3
    init = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"]).constructor()
    address = sender.deploy("ReentrantToken", init.data_in_transaction)["contractAddress"]
    fake = w3.eth.contract(address=address, abi=artifact["abi"])
    sender.transact("ReentrantToken", "mint", address,
                    fake.encode_abi("mint", args=[payer.address, 10 * RAVEN]))
    receipt = sender.transact("ReentrantToken", "transfer", address,
                              fake.encode_abi("transfer", args=[payee.address, 10 * RAVEN]))
    tx = receipt["transactionHash"].to_0x_hex()
    assert len(receipt["logs"]) == 1  # the fake token did emit a Transfer event...
    assert await payee.token_transfers(tx) == []  # ... which is not RAVEN
