"""`ravenp2p submit`, `status`, `jobs`, `fetch` and `cancel`: a requester's jobs, through its node.

Each talks to the node running on `--data-dir` (start one with `ravenp2p
node`), which submits the job to the network and follows it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from ravenp2p.cli.options import add_data_dir, add_json
from ravenp2p.cli.output import console, print_json, print_table
from ravenp2p.cli.status import EXIT_FAILED, EXIT_OK
from ravenp2p.client import AsyncClient, ClientError, JobStatus

FAILURES: tuple[type[BaseException], ...] = (ClientError,)
"""Errors of these commands that mean "the operation failed" (exit code 1)."""


def register(commands: Any) -> None:
    """Add the submit, status, jobs, fetch and cancel commands."""
    submit = commands.add_parser(
        "submit", help="submit a training job described in a TOML spec",
        description="Submit a job to the network through the node on --data-dir: its data is "
        "cut into shards, a paid job's budget is deposited in escrow, and the master the "
        "escrow names accepts it.",
    )
    submit.add_argument("spec", type=Path, metavar="JOB.toml", help="the job spec")
    submit.add_argument("--master", metavar="PEER_ID",
                        help="the master to hand the job to (needed for an unpaid job; a paid "
                        "job goes to the one its escrow names)")
    submit.add_argument("--wait", action="store_true",
                        help="follow the job with a progress bar until it ends")
    add_data_dir(submit)
    add_json(submit)
    submit.set_defaults(run=run_submit)

    status = commands.add_parser("status", help="show one job's progress or outcome",
                                 description="Show one job's progress or outcome.")
    _add_job_options(status)
    status.add_argument("--wait", action="store_true",
                        help="follow the job with a progress bar until it ends")
    status.set_defaults(run=run_status)

    jobs = commands.add_parser("jobs", help="list the jobs this node submitted",
                               description="List the jobs the node on --data-dir submitted.")
    add_data_dir(jobs)
    add_json(jobs)
    jobs.set_defaults(run=run_jobs)

    fetch = commands.add_parser(
        "fetch", help="save a finished job's trained model (safetensors, ONNX)",
        description="Save a finished job's model: safetensors with the spec inside, the spec "
        "as TOML beside it, and optionally an ONNX export.",
    )
    _add_job_options(fetch)
    fetch.add_argument("--out", type=Path, metavar="FILE",
                       help="model file to write (default: NAME-JOBID.safetensors here)")
    fetch.add_argument("--onnx", action="store_true",
                       help="also export the model as ONNX (the same name, ending in .onnx)")
    fetch.set_defaults(run=run_fetch)

    cancel = commands.add_parser(
        "cancel", help="stop a job after its current round (a paid job is refunded the rest)",
        description="Ask the job's master to stop after the round in progress; a paid job "
        "settles what was accepted and the escrow refunds the rest of the deposit.",
    )
    _add_job_options(cancel)
    cancel.add_argument("--reason", default="", help="why, for the master's log")
    cancel.add_argument("--wait", action="store_true", help="wait until the job has ended")
    cancel.set_defaults(run=run_cancel)


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """The job a command is about, the node that submitted it, and --json."""
    parser.add_argument("job", metavar="JOB", help="job id, or a unique prefix of one")
    add_data_dir(parser)
    add_json(parser)


def _client(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(args.data_dir, start_node=False)


def status_lines(status: JobStatus) -> list[str]:
    """A job's status for people, one fact a line."""
    score = []
    if status.accuracy is not None:
        score.append(f"accuracy {status.accuracy:.4f}")
    if status.loss is not None:
        score.append(f"loss {status.loss:.4f}")
    lines = [
        f"job       {status.job_id}",
        f"name      {status.name} ({status.model})",
        f"state     {status.state}" + (f": {status.reason}" if status.reason else ""),
        f"master    {status.master}",
        f"rounds    {status.round} of at most {status.max_rounds}",
        "holdout   " + (", ".join(score) + f" (round {status.evaluated_round})"
                        if score else "not evaluated yet"),
        f"verified  {status.calculations_accepted} calculations "
        f"({status.verified_per_s:.2f}/s)"
        + ("" if status.results_rejected is None
           else f", {status.results_rejected} results rejected"),
    ]
    if status.paid:
        lines.append(f"spent     {status.spent} of {status.budget} RAVEN")
    if status.settle_tx:
        lines.append(f"settled   {status.settle_tx}")
    if status.failovers:
        lines.append(f"failovers {status.failovers}")
    if status.model_file:
        lines.append(f"model     {status.model_file}")
    return lines


def _report(args: argparse.Namespace, status: JobStatus) -> int:
    if args.json:
        print_json(status.to_dict())
    else:
        console().print("\n".join(status_lines(status)), markup=False)
    return EXIT_FAILED if status.ended and status.state in ("failed", "lost") else EXIT_OK


def run_submit(args: argparse.Namespace) -> int:
    from ravenp2p.training.spec import load_job_spec

    spec = load_job_spec(args.spec)  # a bad spec is refused before any node is asked

    async def submit() -> JobStatus:
        client = _client(args)
        await client.connect()
        if args.json:
            job = await client.submit(spec, master=args.master)
        else:
            with console().status(f"Preparing {spec.name}: shards, deposit, master"):
                job = await client.submit(spec, master=args.master)
            print(f"Submitted job {job.job_id}")
        return await job.wait(progress=not args.json) if args.wait else await job.status()

    return _report(args, trio.run(submit))


def run_status(args: argparse.Namespace) -> int:
    async def status() -> JobStatus:
        job = await _client(args).job(args.job)
        return await job.wait(progress=not args.json) if args.wait else await job.status()

    return _report(args, trio.run(status))


def run_jobs(args: argparse.Namespace) -> int:
    rows = trio.run(_client(args).jobs)
    if args.json:
        print_json([row.to_dict() for row in rows])
        return EXIT_OK
    if not rows:
        print("This node has submitted no jobs.")
        return EXIT_OK
    print_table(
        ("job", "name", "state", "rounds", "accuracy", "loss", "verified", "spent"),
        ((row.job_id[:16], row.name, row.state, row.round,
          None if row.accuracy is None else f"{row.accuracy:.4f}",
          None if row.loss is None else f"{row.loss:.4f}",
          row.calculations_accepted, row.spent) for row in rows),
        right=("rounds", "accuracy", "loss", "verified", "spent"),
    )
    return EXIT_OK


def run_fetch(args: argparse.Namespace) -> int:
    from ravenp2p.training.model_file import export_onnx, load_model

    async def fetch() -> tuple[JobStatus, Path]:
        job = await _client(args).job(args.job)
        status = await job.status()
        if not status.ended:
            raise ClientError(f"job {status.job_id[:16]} is still {status.state}: "
                              "fetch it once it has ended")
        out = args.out or Path(f"{status.name}-{status.job_id[:8]}.safetensors")
        return status, await job.save(out)

    status, path = trio.run(fetch)
    written = {"model": str(path), "spec": str(path.with_suffix(".toml"))}
    if args.onnx:
        written["onnx"] = str(export_onnx(load_model(path), path.with_suffix(".onnx")))
    if args.json:
        print_json({"job_id": status.job_id, **written})
    else:
        for kind, where in written.items():
            print(f"{kind:<6} {where}")
    return EXIT_OK


def run_cancel(args: argparse.Namespace) -> int:
    async def cancel() -> JobStatus:
        job = await _client(args).job(args.job)
        status = await job.cancel(args.reason)
        return await job.wait() if args.wait else status

    return _report(args, trio.run(cancel))
