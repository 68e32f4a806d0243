"""`ravenp2p devnet`: a whole paid training network of real nodes on this machine."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from ravenp2p.cli.options import add_json
from ravenp2p.cli.output import console, print_json, print_table
from ravenp2p.cli.status import EXIT_OK


def register(commands: Any) -> None:
    """Add the devnet command."""
    devnet = commands.add_parser(
        "devnet", help="train a model on a local network of real nodes on this machine",
        description="Start masters, a requester and workers on loopback with the contracts on "
        "an embedded chain, train a job to its end, settle it and show who earned what. With "
        "--serve, keep the network up for `ravenp2p submit` and the Python client instead.",
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
    devnet.add_argument("--serve", action="store_true",
                        help="run no job: keep the network up until Ctrl-C, its requester "
                        "answering `ravenp2p submit --data-dir DIR` and Client(DIR)")
    devnet.add_argument("--data-dir", type=Path, default=Path(".ravenp2p-devnet"),
                        help="with --serve: the requester's data dir (default "
                        "./.ravenp2p-devnet)")
    devnet.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"),
                        help="least important log lines shown (default warning)")
    add_json(devnet)
    devnet.set_defaults(run=run_devnet_command)


def run_devnet_command(args: argparse.Namespace) -> int:
    import dataclasses

    from ravenp2p.devnet import devnet_spec, run_devnet
    from ravenp2p.log import configure_logging
    from ravenp2p.training.spec import load_job_spec

    if args.redundancy > args.nodes - args.byzantine and args.byzantine:
        raise ValueError(
            f"--redundancy {args.redundancy} needs more honest workers than "
            f"{args.nodes - args.byzantine}"
        )
    configure_logging("warning" if args.json else args.log_level)
    if args.serve:
        return _serve(args)
    if args.spec is not None:
        spec = load_job_spec(args.spec)
        spec = dataclasses.replace(spec, redundancy=args.redundancy)
    else:
        spec = devnet_spec(args.dataset, args.redundancy, args.calculation)
    run = functools.partial(
        run_devnet, args.nodes, args.byzantine, spec, timeout=args.timeout,
        worker_processes=args.processes, masters=args.masters,
        kill_master_at=args.kill_master_at,
    )
    if args.json:
        print_json(trio.run(run))
        return EXIT_OK
    out = console()
    out.print(f"Starting {args.masters} masters, a requester and {args.nodes} workers "
              f"({args.byzantine} byzantine) on loopback, with the contracts on an embedded "
              "chain...")
    report = trio.run(functools.partial(run, watch=_watch))
    print_report(report)
    return EXIT_OK


async def _watch(handle: Any) -> None:
    """A progress bar of the devnet's job, redrawn twice a second until cancelled."""
    from ravenp2p.progress import JobProgress

    spec = handle.manifest.spec
    try:
        with JobProgress(f"{spec.name} ({spec.model.chosen or 'custom'})", console()) as bar:
            try:
                while True:
                    bar.update(handle.status())
                    await trio.sleep(0.5)
            finally:  # cancelled at the end of the job: draw its final state
                bar.update(handle.status())
    finally:
        if handle.manifest.chain is not None and handle.result is not None:
            console().print("Settled on-chain; waiting for every worker to claim its payout...")


def print_report(report: dict[str, Any]) -> None:
    """The devnet's outcome: accuracy, work, and the money to the wei."""
    from ravenp2p.training.spec import format_amount

    out = console()
    accuracy = report["test_accuracy"]
    out.print(f"\nJob {report['job_id'][:16]} ({report['model']}) finished: {report['reason']}")
    out.print(f"  holdout accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'}, "
              f"loss {report['test_loss']:.4f}, {report['rounds']} rounds in "
              f"{report['seconds']:.1f} s")
    out.print(f"  {report['calculations_accepted']} calculations accepted, "
              f"{report['results_rejected']} results rejected\n")
    payouts = report.get("payouts", {})
    print_table(
        ("worker address", "accepted", "rejected", "paid RAVEN", "byzantine"),
        ((row["address"], row["accepted"], row["rejected"],
          format_amount(payouts.get(row["address"], 0)), "yes" if row["byzantine"] else "no")
         for row in report["workers"]),
        right=("accepted", "rejected", "paid RAVEN"),
    )
    if "deposit" in report:
        fees = report["fees"]
        out.print()
        print_table(
            ("deposit", "= workers", "+ master fee", "+ partner fees", "+ protocol fee",
             "+ refund"),
            [[format_amount(v) for v in (
                report["deposit"], sum(payouts.values()), fees["master"], fees["partner"],
                fees["protocol"], report["refund"])]],
            title="RAVEN", right=("deposit", "= workers", "+ master fee", "+ partner fees",
                                  "+ protocol fee", "+ refund"),
        )
        out.print(f"  settled in transaction {report['settle_tx']}")
    for failover in report.get("failovers", []):
        out.print(f"  round {failover['round']}: {failover['new_master']} took over from "
                  f"{failover['old_master']} in {failover['seconds_to_resume']:.1f} s")


def _serve(args: argparse.Namespace) -> int:
    from ravenp2p.devnet import serve_devnet
    from ravenp2p.training.spec import format_amount

    def ready(info: dict[str, Any]) -> None:
        if args.json:
            print_json(info)
        else:
            out = console()
            out.print(f"Devnet up: {len(info['masters'])} masters, {len(info['workers'])} "
                      f"workers ({len(info['byzantine'])} byzantine) on chain "
                      f"{info['chain_id']}; the requester has "
                      f"{format_amount(info['funds'])} RAVEN.")
            out.print(f"Submit jobs with: ravenp2p submit JOB.toml --wait --data-dir "
                      f"{info['data_dir']}")
            out.print(f"or from Python:   Client({str(info['data_dir'])!r})")
            out.print("Ctrl-C stops the devnet.")
        sys.stdout.flush()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                serve_devnet, args.nodes, args.byzantine, args.data_dir.resolve(),
                masters=args.masters, ready=ready,
            ))
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(serve)
    return EXIT_OK
