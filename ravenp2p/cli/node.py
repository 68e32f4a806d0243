"""`ravenp2p node`, `keys` and `peers`: run a node, show its key, list what it knows."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from ravenp2p.cli.options import add_data_dir, add_json, common_options
from ravenp2p.cli.output import print_json, print_table
from ravenp2p.cli.status import EXIT_FAILED, EXIT_OK


def register(commands: Any) -> None:
    """Add the node, keys and peers commands."""
    node = commands.add_parser("node", help="run a node: join the network and lend compute",
                               description="Run a node until SIGINT or SIGTERM.")
    add_data_dir(node)
    node.add_argument(
        "--listen", action="append", metavar="MULTIADDR",
        help="address to listen on, e.g. /ip4/0.0.0.0/tcp/47001 (repeatable; "
        "default /ip4/127.0.0.1/tcp/0)",
    )
    node.add_argument(
        "--bootstrap", action="append", default=[], metavar="MULTIADDR",
        help="a peer to join through, ending in /p2p/<peer id> (repeatable)",
    )
    node.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="device to lend (default cpu)")
    node.add_argument("--share", type=int, default=0, metavar="PERCENT",
                      help="percent of the device to lend, 0-100 (default 0: compute nothing)")
    node.add_argument("--i-consent", dest="consent", action="store_true",
                      help="allow this node to run calculations for others")
    node.add_argument("--threads", type=int, default=1, metavar="N",
                      help="most torch threads one calculation may use (default 1)")
    node.add_argument("--master", action="store_true",
                      help="also accept jobs from requesters and run them as their master")
    node.add_argument("--chain", metavar="URL",
                      help="JSON-RPC URL of the Ethereum node holding stakes and job escrows "
                      "(without it the node takes part in unpaid jobs only)")
    node.add_argument("--contracts", type=Path, metavar="FILE",
                      help="deployment file (chain id and contract addresses) for --chain")
    node.add_argument("--stake", metavar="RAVEN", default="0",
                      help="keep this much RAVEN staked, topped up from the wallet at start")
    node.add_argument("--candidate", action="store_true",
                      help="stand as a master candidate (needs the registry's minimum stake; "
                      "implies --master: an elected member must run, watch and take over jobs)")
    node.add_argument("--metrics-port", type=int, metavar="PORT",
                      help="serve Prometheus metrics at http://HOST:PORT/metrics "
                      "(default: no metrics endpoint)")
    node.add_argument("--metrics-host", metavar="HOST",
                      help="address the metrics endpoint listens on (default 127.0.0.1: this "
                      "machine only; 0.0.0.0 lets any machine that reaches this one read them)")
    node.add_argument("--partner", metavar="ADDRESS",
                      help="website partner that earns 3%% on top of this node's accepted work "
                      "(set in the stake registry; needs --chain)")
    node.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                      help="least important log lines shown (default info)")
    node.add_argument("--log-json", action="store_true", help="write logs as JSON lines")
    node.set_defaults(run=run_node)

    keys = commands.add_parser(
        "keys", help="create or show the node key (peer id and address)",
        description="Create or show the node's secp256k1 key: its libp2p peer id and its "
        "Ethereum address come from it.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    for name, text in (("new", "create a new node key"), ("show", "print the peer id and address")):
        sub = key_commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                                      parents=[common_options()])
        add_data_dir(sub)
        add_json(sub)
        sub.set_defaults(run=run_keys)

    peers = commands.add_parser("peers", help="list the peers a running node knows",
                                description="List the peers the node on --data-dir knows.")
    add_data_dir(peers)
    add_json(peers)
    peers.add_argument("--find", metavar="PEER_ID", help="look one peer up through the DHT instead")
    peers.set_defaults(run=run_peers)


def run_keys(args: argparse.Namespace) -> int:
    from ravenp2p.identity import create_identity, key_path, load_identity

    if args.keys_command == "new":
        identity = create_identity(args.data_dir)
    else:
        identity = load_identity(args.data_dir)
    info = {"peer_id": identity.peer_id, "address": identity.address,
            "key_file": str(key_path(args.data_dir))}
    if args.json:
        print_json(info)
    else:
        for label, key in (("peer id ", "peer_id"), ("address ", "address"),
                           ("key file", "key_file")):
            print(f"{label} {info[key]}")
    return EXIT_OK


def run_node(args: argparse.Namespace) -> int:
    from ravenp2p.log import configure_logging
    from ravenp2p.node.config import ConfigError, NodeConfig
    from ravenp2p.node.daemon import run_daemon
    from ravenp2p.node.metrics import DEFAULT_HOST
    from ravenp2p.training.spec import parse_amount

    if args.metrics_host is not None and args.metrics_port is None:
        raise ConfigError("metrics_host: --metrics-host needs --metrics-port")
    config = NodeConfig(
        data_dir=args.data_dir,
        listen=tuple(args.listen or ("/ip4/127.0.0.1/tcp/0",)),
        bootstrap=tuple(args.bootstrap),
        device=args.device,
        share=args.share,
        consent=args.consent,
        master=args.master,
        max_threads=args.threads,
        chain_url=args.chain,
        contracts=args.contracts,
        stake=parse_amount("stake", args.stake),
        candidate=args.candidate,
        partner=args.partner,
        metrics_port=args.metrics_port,
        metrics_host=DEFAULT_HOST if args.metrics_host is None else args.metrics_host,
    )
    configure_logging(args.log_level, json_format=args.log_json)
    trio.run(run_daemon, config)
    return EXIT_OK


def run_peers(args: argparse.Namespace) -> int:
    from ravenp2p.node.control import control_request

    if args.find:
        result = trio.run(control_request, args.data_dir, {"op": "find_peer", "peer_id": args.find},
                          15.0)
        if args.json:
            print_json(result)
        elif result is None:
            print(f"{args.find} was not found in the DHT")
        else:
            print(f"{result['peer_id']}\n  " + "\n  ".join(result["addrs"]))
        return EXIT_OK if result is not None else EXIT_FAILED
    rows = trio.run(control_request, args.data_dir, {"op": "peers"})
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("This node knows no peers yet.")
        return EXIT_OK
    print_table(
        ("peer id", "address", "device", "share", "connected"),
        ((row["peer_id"], row["address"], row["device"],
          None if row["share"] is None else f"{row['share']}%",
          "yes" if row["connected"] else "no") for row in rows),
        right=("share",),
    )
    return EXIT_OK
