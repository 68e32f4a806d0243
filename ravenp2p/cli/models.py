"""`ravenp2p models list|get|publish` and `ravenp2p infer`: the model marketplace, through a node.

Each talks to the node running on `--data-dir` (start one with `ravenp2p
node`): it keeps the catalog of models announced on the network, fetches
model files from their publishers, serves the models it publishes, and
pays for priced calls from its chain account.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import trio
from rich.markup import escape

from ravenp2p.cli.options import add_data_dir, add_json, common_options
from ravenp2p.cli.output import console, print_json, print_table
from ravenp2p.cli.status import EXIT_OK
from ravenp2p.market.inputs import INPUT_SUFFIXES
from ravenp2p.node.control import RequestRefused, control_request

LIST_TIMEOUT_S = 35.0
PUBLISH_TIMEOUT_S = 150.0
FETCH_TIMEOUT_S = 630.0
"""A little longer than the node gives the operation, so the node's own error arrives first."""


class ModelsError(RuntimeError):
    """The node could not do what was asked (fetch, publish, a call); the message says why."""


FAILURES: tuple[type[BaseException], ...] = (ModelsError,)
"""Errors of these commands that mean "the operation failed" (exit code 1)."""


def register(commands: Any) -> None:
    """Add the models (list, get, publish) and infer commands."""
    models = commands.add_parser(
        "models", help="list, fetch and publish trained models on the network",
        description="List the models announced on the network, fetch one, or publish one of "
        "this node's trained models for others to fetch and call.",
    )
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list", help="list the models this node has heard of", parents=[common_options()],
        description="List the models the node on --data-dir has heard of: name, publisher, "
        "what they take, holdout accuracy, license and price per call.",
    )
    listing.add_argument("--name", metavar="TEXT", help="only models whose name contains TEXT")
    listing.add_argument("--publisher", metavar="PEER_ID",
                         help="only models of this publisher (a peer id or its prefix)")
    add_data_dir(listing)
    add_json(listing)
    listing.set_defaults(run=run_list)

    get = actions.add_parser(
        "get", help="fetch a model file from its publisher and save it",
        parents=[common_options()],
        description="Fetch a model's file from its publisher (checked against its signed "
        "record) and save it with its job spec as TOML beside it, optionally as ONNX too.",
    )
    get.add_argument("model", metavar="MODEL",
                     help="a model name, NAME@PEER_ID, or a model digest (or its prefix)")
    get.add_argument("--out", type=Path, metavar="FILE",
                     help="model file to write (default: NAME-DIGEST.safetensors here)")
    get.add_argument("--onnx", action="store_true",
                     help="also export the model as ONNX (the same name, ending in .onnx)")
    add_data_dir(get)
    add_json(get)
    get.set_defaults(run=run_get)

    publish = actions.add_parser(
        "publish", help="offer a finished job's model to the network",
        parents=[common_options()],
        description="Publish a trained model (a finished job of this node, or a model file) as "
        "a signed record: others can then fetch it and call it on this node, paying the price "
        "per call when one is set.",
    )
    publish.add_argument("job", metavar="JOB", nargs="?",
                         help="the job id (or a unique prefix) whose model to publish")
    publish.add_argument("--file", type=Path, metavar="FILE",
                         help="publish this model file instead of a job's")
    publish.add_argument("--name", help="the model's name (default: the job's name)")
    publish.add_argument("--license", default="", metavar="TEXT",
                         help="license the model is offered under, such as MIT or CC-BY-4.0")
    publish.add_argument("--price", default="0", metavar="RAVEN",
                         help="RAVEN per inference call, paid on-chain (default 0: free)")
    publish.add_argument("--description", default="", metavar="TEXT",
                         help="one line on what the model does")
    add_data_dir(publish)
    add_json(publish)
    publish.set_defaults(run=run_publish)

    infer = commands.add_parser(
        "infer", help="run a model on inputs, at its publisher or here",
        description="Run a published model on inputs and print its predictions: at the peer "
        "that publishes it (paid per call when it has a price), or here with --local after "
        "fetching it.",
    )
    infer.add_argument("model", metavar="MODEL",
                       help="a model name, NAME@PEER_ID, or a model digest (or its prefix)")
    infer.add_argument("input", metavar="INPUT",
                       help="an .npy, .npz, .csv or .safetensors file of samples, or, for a text "
                       "model, a prompt")
    infer.add_argument("--local", action="store_true",
                       help="fetch the model and run it on this machine instead")
    infer.add_argument("--text", action="store_true",
                       help="take INPUT as a prompt even when it looks like a file name")
    infer.add_argument("--max-price", default="0", metavar="RAVEN",
                       help="most RAVEN to pay for the call (default 0: free models only)")
    infer.add_argument("--payment", metavar="TX",
                       help="pay with this transfer already made (to retry a failed call)")
    add_data_dir(infer)
    add_json(infer)
    infer.set_defaults(run=run_infer)


def _request(args: argparse.Namespace, request: dict[str, Any], timeout: float) -> Any:
    """One control request; a refusal becomes ValueError (invalid) or `ModelsError`."""
    try:
        return trio.run(control_request, args.data_dir, request, timeout)
    except RequestRefused as exc:
        raise (ValueError if exc.kind == "invalid" else ModelsError)(str(exc)) from None


def _absolute(path: Path) -> str:
    """A path the node (whose working directory is not ours) reads the same way."""
    return os.path.abspath(os.path.expanduser(path))


def describe_input(row: dict[str, Any]) -> str:
    """What a model takes, for people: `image 1x8x8 uint8`."""
    shape = "x".join(str(d) for d in row["input_shape"])
    return f"{row['kind']} {shape} {row['input_dtype']}"


def run_list(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": "models"}
    if args.name:
        request["name"] = args.name
    if args.publisher:
        request["publisher"] = args.publisher
    rows = _request(args, request, LIST_TIMEOUT_S)
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("This node has heard of no models yet.")
        return EXIT_OK
    print_table(
        ("name", "publisher", "takes", "accuracy", "price", "license", "size", "here"),
        ((row["name"], f"{row['publisher'][:7]}…{row['publisher'][-4:]}", describe_input(row),
          None if row["accuracy"] is None else f"{row['accuracy']:.4f}",
          "free" if row["price_units"] == "0" else f"{row['price']} RAVEN",
          escape(row["license"]) or None, _size(row["size"]),
          "published" if row["own"] else "fetched" if row["fetched"] else None)
         for row in rows),
        right=("accuracy", "size"),
    )
    return EXIT_OK


def run_get(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": "model_get", "model": args.model}
    if args.out is not None:
        request["out"] = _absolute(args.out)
        result = _request(args, request, FETCH_TIMEOUT_S)
    else:  # fetch first: the default file name is the model's name and digest
        result = _request(args, request, FETCH_TIMEOUT_S)
        row = result["model"]
        default = Path(f"{row['name']}-{row['model'][:8]}.safetensors")
        result = _request(args, {**request, "out": _absolute(default)}, FETCH_TIMEOUT_S)
    out = Path(result["out"])
    written = {"model": result["out"], "spec": result["spec"]}
    if args.onnx:
        from ravenp2p.training.model_file import export_onnx, load_model

        written["onnx"] = str(export_onnx(load_model(out), out.with_suffix(".onnx")))
    if args.json:
        print_json({"name": result["model"]["name"], "publisher": result["model"]["publisher"],
                    "digest": result["model"]["model"], **written})
    else:
        for kind, where in written.items():
            print(f"{kind:<6} {where}")
    return EXIT_OK


def run_publish(args: argparse.Namespace) -> int:
    if (args.job is None) == (args.file is None):
        raise ValueError("publish: give a JOB id or --file FILE (one of them)")
    request: dict[str, Any] = {"op": "model_publish", "price": args.price,
                               "license": args.license, "description": args.description}
    if args.file is not None:
        request["file"] = _absolute(args.file)
    else:
        request["job"] = args.job
    if args.name is not None:
        request["name"] = args.name
    row = _request(args, request, PUBLISH_TIMEOUT_S)
    if args.json:
        print_json(row)
        return EXIT_OK
    price = "free" if row["price_units"] == "0" else f"{row['price']} RAVEN a call"
    console().print("\n".join([
        f"published {row['name']} ({price})",
        f"model     {row['model']} ({_size(row['size'])})",
        f"takes     {describe_input(row)}",
        f"job       {row['job']}",
    ]), markup=False)
    return EXIT_OK


def run_infer(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": "infer", "model": args.model, "local": args.local,
                               "max_price": args.max_price}
    if args.payment:
        request["payment"] = args.payment
    if not args.text and Path(args.input).suffix.lower() in INPUT_SUFFIXES:
        request["file"] = _absolute(Path(args.input))
    else:
        request["text"] = args.input
    result = _request(args, request, FETCH_TIMEOUT_S)
    result.pop("outputs", None)  # base64 safetensors: for programs, not for people or --json
    if args.json:
        print_json(result)
        return EXIT_OK
    where = "here" if result["where"] == "local" else f"at {result['publisher'][:7]}…"
    paid = f", paid {result['paid']} RAVEN ({result['payment_tx']})" if result["payment_tx"] else ""
    print(f"{result['model']} ran {where} on {result['batch']} sample"
          f"{'' if result['batch'] == 1 else 's'} in {result['compute_ms']:.1f} ms{paid}")
    if result["task"] == "language":
        for row in result["predictions"]:
            top = ", ".join(f"{t['token']!r} {t['probability']:.3f}" for t in row["top"])
            console().print(f"next {row['next']!r}   ({top})", markup=False)
        return EXIT_OK
    print_table(("sample", "class", "probability"),
                ((i, row["class"], f"{row['probability']:.4f}")
                 for i, row in enumerate(result["predictions"])),
                right=("sample", "class", "probability"))
    return EXIT_OK


def _size(size: int) -> str:
    """A byte count for people: `136.0 KiB`."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"
