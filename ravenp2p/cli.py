"""The `ravenp2p` command line.

Exit codes: 0 success; 1 the operation failed; 2 bad usage or invalid
configuration; 3 no running node could be reached.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import trio

from ravenp2p import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def default_data_dir() -> Path:
    env = os.environ.get("RAVENP2P_DATA_DIR")
    return Path(env) if env else Path.home() / ".ravenp2p"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(),
        help="node directory with its key and state "
        "(default: $RAVENP2P_DATA_DIR or ~/.ravenp2p)",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_chain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chain", metavar="URL",
                        help="JSON-RPC URL of the Ethereum node holding stakes and job escrows")
    parser.add_argument("--contracts", type=Path, metavar="FILE",
                        help="deployment file (chain id and contract addresses) for --chain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ravenp2p",
        description="Decentralized deep-learning training on contributors' spare compute.",
    )
    parser.add_argument("--version", action="version", version=f"ravenp2p {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    node = commands.add_parser("node", help="run a node: join the network and lend compute")
    _add_data_dir(node)
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
    node.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    node.add_argument("--log-json", action="store_true", help="write logs as JSON lines")

    keys = commands.add_parser("keys", help="create or show the node key (peer id and address)")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    for name, text in (("new", "create a new node key"), ("show", "print the peer id and address")):
        sub = key_commands.add_parser(name, help=text)
        _add_data_dir(sub)
        _add_json(sub)

    peers = commands.add_parser("peers", help="list the peers a running node knows")
    _add_data_dir(peers)
    _add_json(peers)
    peers.add_argument("--find", metavar="PEER_ID", help="look one peer up through the DHT instead")

    wallet = commands.add_parser(
        "wallet", help="show the node's gas, RAVEN, stake, candidacy, partner and earnings"
    )
    _add_data_dir(wallet)
    _add_chain(wallet)
    wallet.add_argument("--address", metavar="0x...",
                        help="show this address instead of the node's (reads only: no key needed)")
    _add_json(wallet)
    for name, text in (
        ("stake", "stake RAVEN from the node's wallet"),
        ("unstake", "start unbonding staked RAVEN (withdraw it once the delay has passed)"),
        ("withdraw", "move RAVEN whose unbonding delay has passed back into the wallet"),
    ):
        sub = commands.add_parser(name, help=text)
        if name != "withdraw":
            sub.add_argument("amount", metavar="AMOUNT", help="RAVEN, as a decimal such as 12.5")
        _add_data_dir(sub)
        _add_chain(sub)
        _add_json(sub)

    devnet = commands.add_parser(
        "devnet", help="train a model on a local network of real nodes on this machine"
    )
    devnet.add_argument("--nodes", type=int, default=4, help="number of workers (default 4)")
    devnet.add_argument("--byzantine", type=int, default=0, metavar="K",
                        help="how many of the workers return wrong results (default 0)")
    devnet.add_argument("--dataset", default="digits", metavar="NAME|PATH",
                        help="'digits' (bundled with scikit-learn), an MNIST folder, or a "
                        ".npz, .csv or text file (default digits)")
    devnet.add_argument("--redundancy", type=int, default=3, metavar="R",
                        help="workers per calculation (default 3)")
    devnet.add_argument("--calculation", choices=("local_steps", "gradient"),
                        default="local_steps",
                        help="what a calculation computes: 16 local optimizer steps on a "
                        "shard (default) or one gradient")
    devnet.add_argument("--processes", type=int, default=0, metavar="M",
                        help="run M of the honest workers as separate processes, so that "
                        "they compute in parallel on several cores (default 0)")
    devnet.add_argument("--spec", type=Path, metavar="JOB.toml",
                        help="run this job spec instead of the default for --dataset")
    devnet.add_argument("--masters", type=int, default=2, metavar="M",
                        help="master candidates that stake and stand for the committee "
                        "(default 2)")
    devnet.add_argument("--kill-master-at", type=int, metavar="ROUND",
                        help="kill the job's master once it has recorded this round, to see "
                        "the next committee member take over")
    devnet.add_argument("--timeout", type=float, default=600.0,
                        help="seconds the job may take (default 600)")
    _add_json(devnet)
    return parser


def _keys(args: argparse.Namespace) -> int:
    from ravenp2p.identity import create_identity, key_path, load_identity

    if args.keys_command == "new":
        identity = create_identity(args.data_dir)
    else:
        identity = load_identity(args.data_dir)
    info = {"peer_id": identity.peer_id, "address": identity.address,
            "key_file": str(key_path(args.data_dir))}
    if args.json:
        _print_json(info)
    else:
        for label, key in (("peer id ", "peer_id"), ("address ", "address"),
                           ("key file", "key_file")):
            print(f"{label} {info[key]}")
    return EXIT_OK


def _node(args: argparse.Namespace) -> int:
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


def _peers(args: argparse.Namespace) -> int:
    from ravenp2p.node.control import control_request

    if args.find:
        result = trio.run(control_request, args.data_dir, {"op": "find_peer", "peer_id": args.find},
                          15.0)
        if args.json:
            _print_json(result)
        elif result is None:
            print(f"{args.find} was not found in the DHT")
        else:
            print(f"{result['peer_id']}\n  " + "\n  ".join(result["addrs"]))
        return EXIT_OK if result is not None else EXIT_FAILED
    rows = trio.run(control_request, args.data_dir, {"op": "peers"})
    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print("This node knows no peers yet.")
        return EXIT_OK
    print(f"{'peer id':<54} {'address':<43} {'device':<6} {'share':>5}  connected")
    for row in rows:
        share = "-" if row["share"] is None else f"{row['share']}%"
        print(f"{row['peer_id']:<54} {row['address'] or '-':<43} {row['device'] or '-':<6} "
              f"{share:>5}  {'yes' if row['connected'] else 'no'}")
    return EXIT_OK


def _wallet(args: argparse.Namespace) -> int:
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
        _print_json(view.to_json())
    else:
        print("\n".join(view.lines()))
    return EXIT_OK


def _stake(args: argparse.Namespace) -> int:
    from ravenp2p import wallet

    amount = None if args.command == "withdraw" else wallet.parse_positive_amount(args.amount)
    chain = wallet.open_wallet(args.chain, args.contracts, args.data_dir)
    if amount is None:
        outcome = trio.run(wallet.withdraw, chain)
    else:
        action = wallet.stake if args.command == "stake" else wallet.unstake
        outcome = trio.run(action, chain, amount)
    if args.json:
        _print_json(outcome.to_json())
    else:
        print("\n".join(outcome.lines()))
    return EXIT_OK


def _devnet(args: argparse.Namespace) -> int:
    import dataclasses

    from ravenp2p.devnet import devnet_spec, run_devnet
    from ravenp2p.log import configure_logging
    from ravenp2p.training.spec import format_amount, load_job_spec

    if args.spec is not None:
        spec = load_job_spec(args.spec)
        spec = dataclasses.replace(spec, redundancy=args.redundancy)
    else:
        spec = devnet_spec(args.dataset, args.redundancy, args.calculation)
    if args.redundancy > args.nodes - args.byzantine and args.byzantine:
        raise ValueError(
            f"--redundancy {args.redundancy} needs more honest workers than "
            f"{args.nodes - args.byzantine}"
        )
    configure_logging("warning" if args.json else "info")
    report = trio.run(
        functools.partial(
            run_devnet, args.nodes, args.byzantine, spec, timeout=args.timeout,
            worker_processes=args.processes, masters=args.masters,
            kill_master_at=args.kill_master_at,
        )
    )
    if args.json:
        _print_json(report)
        return EXIT_OK
    accuracy = report["test_accuracy"]
    print(f"\nJob {report['job_id'][:16]} ({report['model']}) finished: {report['reason']}")
    print(f"  holdout accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'}, "
          f"loss {report['test_loss']:.4f}, {report['rounds']} rounds in "
          f"{report['seconds']:.1f} s")
    print(f"  {report['calculations_accepted']} calculations accepted, "
          f"{report['results_rejected']} results rejected")
    print(f"  {'worker address':<42} {'accepted':>8} {'rejected':>8} {'paid RAVEN':>12}  "
          "byzantine")
    payouts = report.get("payouts", {})
    for row in report["workers"]:
        paid = format_amount(payouts.get(row["address"], 0))
        print(f"  {row['address']:<42} {row['accepted']:>8} {row['rejected']:>8} {paid:>12}  "
              f"{'yes' if row['byzantine'] else 'no'}")
    if "deposit" in report:
        fees = report["fees"]
        print(f"  deposit {format_amount(report['deposit'])} RAVEN = workers "
              f"{format_amount(sum(payouts.values()))} + master fee "
              f"{format_amount(fees['master'])} + partner fees {format_amount(fees['partner'])}"
              f" + protocol fee {format_amount(fees['protocol'])} + refund "
              f"{format_amount(report['refund'])}")
        print(f"  settled in transaction {report['settle_tx']}")
    for failover in report.get("failovers", []):
        print(f"  round {failover['round']}: {failover['new_master']} took over from "
              f"{failover['old_master']} in {failover['seconds_to_resume']:.1f} s")
    return EXIT_OK


_COMMANDS = {
    "keys": _keys, "node": _node, "peers": _peers, "devnet": _devnet, "wallet": _wallet,
    "stake": _stake, "unstake": _stake, "withdraw": _stake,
}


def _single_cause(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ravenp2p` console script."""
    from ravenp2p.chain.base import ChainError
    from ravenp2p.identity import IdentityError
    from ravenp2p.node.config import ConfigError
    from ravenp2p.node.control import ControlError
    from ravenp2p.node.daemon import DataDirBusy

    # Idle OpenMP threads spin by default, stealing cores from the calculations of
    # other processes; must be set before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    failures: tuple[type[BaseException], ...] = (IdentityError, DataDirBusy, OSError, ChainError)
    if args.command == "devnet":  # imports torch: only where it is needed
        from ravenp2p.devnet import DevnetError

        failures += (DevnetError,)
    try:
        try:
            return _COMMANDS[args.command](args)
        except BaseExceptionGroup as group:
            # A failure inside a trio nursery arrives wrapped; report the one cause.
            cause = _single_cause(group)
            if cause is group:
                raise
            raise cause from group
    except KeyboardInterrupt:
        return EXIT_FAILED
    except (ConfigError, ValueError) as exc:
        if args.debug:
            raise
        print(f"ravenp2p: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        if args.debug:
            raise
        print(f"ravenp2p: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except failures as exc:
        if args.debug:
            raise
        print(f"ravenp2p: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if args.debug:
            raise
        logging.getLogger("ravenp2p").debug("unexpected error", exc_info=True)
        print(f"ravenp2p: error: {type(exc).__name__}: {exc} (use --debug for details)",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
