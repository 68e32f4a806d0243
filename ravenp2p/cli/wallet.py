"""`ravenp2p wallet`, `stake`, `unstake` and `withdraw`: a contributor's money on the chain."""

from __future__ import annotations

import argparse
from typing import Any

import trio

from ravenp2p.cli.options import add_chain, add_data_dir, add_json
from ravenp2p.cli.output import print_json
from ravenp2p.cli.status import EXIT_OK


def register(commands: Any) -> None:
    """Add the wallet, stake, unstake and withdraw commands."""
    wallet = commands.add_parser(
        "wallet", help="show the node's gas, RAVEN, stake, candidacy, partner and earnings",
        description="Show the node's gas, RAVEN, stake, candidacy, website partner and earnings.",
    )
    add_data_dir(wallet)
    add_chain(wallet)
    wallet.add_argument("--address", metavar="0x...",
                        help="show this address instead of the node's (reads only: no key needed)")
    add_json(wallet)
    wallet.set_defaults(run=run_wallet)
    for name, text in (
        ("stake", "stake RAVEN from the node's wallet"),
        ("unstake", "start unbonding staked RAVEN (withdraw it once the delay has passed)"),
        ("withdraw", "move RAVEN whose unbonding delay has passed back into the wallet"),
    ):
        sub = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name != "withdraw":
            sub.add_argument("amount", metavar="AMOUNT", help="RAVEN, as a decimal such as 12.5")
        add_data_dir(sub)
        add_chain(sub)
        add_json(sub)
        sub.set_defaults(run=run_stake)


def run_wallet(args: argparse.Namespace) -> int:
    from consensus.abi import checksum_address
    from ravenp2p.wallet import open_wallet, read_wallet

    address = None
    if args.address is not None:
        try:
            address = checksum_address(args.address)
        except ValueError as exc:
            raise ValueError(f"address: {exc}") from None
    chain = open_wallet(args.chain, args.contracts, None if address else args.data_dir)
    view = trio.run(read_wallet, chain, address or chain.address)
    if args.json:
        print_json(view.to_json())
    else:
        print("\n".join(view.lines()))
    return EXIT_OK


def run_stake(args: argparse.Namespace) -> int:
    from ravenp2p import wallet

    amount = None if args.command == "withdraw" else wallet.parse_positive_amount(args.amount)
    chain = wallet.open_wallet(args.chain, args.contracts, args.data_dir)
    if amount is None:
        outcome = trio.run(wallet.withdraw, chain)
    else:
        action = wallet.stake if args.command == "stake" else wallet.unstake
        outcome = trio.run(action, chain, amount)
    if args.json:
        print_json(outcome.to_json())
    else:
        print("\n".join(outcome.lines()))
    return EXIT_OK
