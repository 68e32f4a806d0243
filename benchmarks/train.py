"""Training benchmark: time to 97% MNIST test accuracy, local vs devnet (R=1, R=3).

All three runs happen in one invocation on the same machine, so the ratios
compare like with like:

(a) plain local training in one process with one torch thread (the baseline);
(b) a devnet on real libp2p hosts on loopback with redundancy R=1;
(c) the same devnet with R=3 (every calculation computed three times).

Model: MLP 784-512-256-10, Adam lr 1e-3, cross entropy. The devnet's clock
starts when the job is submitted (data already cut into shards) and stops at
the evaluation that first reaches the target; the local clock covers training
and its evaluations. Also reported: per-calculation protocol overhead (time
from an order being published to the calculation's acceptance, minus the
workers' compute time) and the bytes moved per accepted calculation.

    python benchmarks/train.py [--mnist PATH] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio

from ravenp2p.devnet import start_devnet
from ravenp2p.roles.master import MasterConfig
from ravenp2p.roles.requester import prepare_job
from ravenp2p.training.compute import ModelRuntime
from ravenp2p.training.datasets import load_dataset
from ravenp2p.training.selector import resolve_model
from ravenp2p.training.spec import parse_job_spec

DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"

SPEC = """
name = "bench-mnist-mlp"
loss = "cross_entropy"
samples_per_calculation = {samples}
calculations_per_round = {calcs}
redundancy = {redundancy}
calculation = "{calculation}"
batch_size = {batch}
[model]
layers = [
  {{ type = "Flatten" }},
  {{ type = "Linear", out_features = 512 }}, {{ type = "ReLU" }},
  {{ type = "Linear", out_features = 256 }}, {{ type = "ReLU" }},
  {{ type = "Linear", out_features = 10 }},
]
[dataset]
source = "{mnist}"
format = "mnist"
[optimizer]
name = "adam"
lr = 0.001
[stop]
max_rounds = {rounds}
target_accuracy = {target}
evaluate_every = {evaluate_every}
[payment]
price_per_calculation = "0.000001"
budget = "100"
"""


def job_spec(mnist: Path, redundancy: int, args: argparse.Namespace):
    text = SPEC.format(
        samples=args.samples, calcs=args.calcs, redundancy=redundancy, mnist=mnist,
        calculation=args.calculation, batch=args.batch,
        rounds=args.max_rounds, target=args.target, evaluate_every=args.evaluate_every,
    )
    return parse_job_spec(text, source="benchmark")


def local_baseline(spec, target: float, batch: int, evaluate_every_samples: int) -> dict[str, Any]:
    """Plain single-process training with one thread; same model, optimizer and data."""
    torch.set_num_threads(1)
    info, train, holdout = load_dataset(spec.dataset)
    spec = resolve_model(spec, info.kind, info.input_shape, num_classes=info.num_classes)
    runtime = ModelRuntime(spec.model, info, spec.loss)
    model = runtime.module
    weights = runtime.initial_weights(spec.seed)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    # The multi-tensor kernels workers use for local steps: the faster path, for a fair baseline.
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.optimizer.lr, foreach=True)
    x = runtime.prepare_inputs(train.inputs)
    y = torch.from_numpy(train.targets)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    seen = since_eval = evaluations = 0
    while True:
        order = torch.from_numpy(rng.permutation(len(y)))
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i : i + batch]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
            seen += batch
            since_eval += batch
            if since_eval >= evaluate_every_samples:
                since_eval = 0
                evaluations += 1
                weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
                score = runtime.evaluate(weights, holdout)
                if score.accuracy is not None and score.accuracy >= target:
                    return {
                        "seconds": time.perf_counter() - started,
                        "epochs": seen / len(y),
                        "accuracy": score.accuracy,
                        "evaluations": evaluations,
                    }


async def devnet_run(spec, workers: int, timeout: float) -> dict[str, Any]:
    """Train `spec` on a devnet of `workers` workers; time to the target on the holdout."""
    async with start_devnet(
        workers, worker_processes=workers, master_config=MasterConfig(result_deadline_s=60)
    ) as net:
        requester = net.requester.node
        prepared = await trio.to_thread.run_sync(prepare_job, spec, requester.peer_id)
        for node in net.nodes:
            node.blobs.stats.served_bytes = 0
        handle = await net.requester.submit_prepared(prepared, net.master.node.peer_id)
        result = await handle.wait(timeout)
        hit = next(
            (e for e in result.evaluations
             if e["accuracy"] is not None and e["accuracy"] >= spec.stop.target_accuracy),
            None,
        )
        timings = net.master.calculation_timings
        overhead = [t.latency_s - t.compute_s for t in timings if t.accepted]
        compute = [t.compute_s for t in timings if t.accepted]
        # Workers run in their own processes: count what the master and requester served.
        moved = sum(node.blobs.stats.served_bytes for node in net.nodes)
        moved += sum(t.result_bytes for t in timings)
        accepted = result.done.calculations_accepted
        return {
            "workers": workers,
            "redundancy": spec.redundancy,
            "seconds": hit["seconds"] if hit else None,
            "rounds": hit["round"] + 1 if hit else result.done.rounds,
            "accuracy": hit["accuracy"] if hit else result.evaluation.accuracy,
            "reason": result.done.reason,
            "calculations_accepted": accepted,
            "overhead_ms_per_calculation": 1000 * statistics.median(overhead) if overhead else None,
            "compute_ms_per_calculation": 1000 * statistics.median(compute) if compute else None,
            "bytes_per_calculation": moved / accepted if accepted else None,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST,
                        help="folder with the four MNIST IDX files (gzipped or not)")
    parser.add_argument("--calculation", choices=("local_steps", "gradient"),
                        default="local_steps", help="what one calculation computes")
    parser.add_argument("--samples", type=int, default=2048, help="samples per calculation")
    parser.add_argument("--batch", type=int, default=64,
                        help="samples per local step (local_steps calculations)")
    parser.add_argument("--calcs", type=int, default=2, help="calculations per round")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--evaluate-every", type=int, default=6, help="rounds between scores")
    parser.add_argument("--max-rounds", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (target 0.9)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.target = 0.9
    if not args.mnist.is_dir():
        print(f"MNIST folder not found: {args.mnist} (use --mnist PATH)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    mnist = args.mnist.resolve()
    round_samples = args.samples * args.calcs
    local = local_baseline(job_spec(mnist, 1, args), args.target, 64,
                           round_samples * args.evaluate_every)
    r1 = trio.run(devnet_run, job_spec(mnist, 1, args), args.calcs, args.timeout)
    r3 = trio.run(devnet_run, job_spec(mnist, 3, args), 3, args.timeout)
    report = {
        "target_accuracy": args.target,
        "samples_per_calculation": args.samples,
        "calculations_per_round": args.calcs,
        "local": local,
        "devnet_r1": r1,
        "devnet_r3": r3,
        "ratio_r1": r1["seconds"] / local["seconds"] if r1["seconds"] else None,
        "ratio_r3": r3["seconds"] / local["seconds"] if r3["seconds"] else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"local (1 thread): {local['seconds']:.2f} s to {args.target:.0%} "
              f"({local['epochs']:.2f} epochs)")
        for name, row in (("R=1", r1), ("R=3", r3)):
            ratio = report["ratio_r1" if name == "R=1" else "ratio_r3"]
            print(f"devnet {name}, {row['workers']} workers: {row['seconds']} s "
                  f"({ratio and f'{ratio:.2f}x'} local), {row['rounds']} rounds, overhead "
                  f"{row['overhead_ms_per_calculation']} ms/calc, "
                  f"{row['bytes_per_calculation']} bytes/calc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
