"""`make demo` benchmark: the newcomer's first run, end to end, against local training.

Runs the demo's own command (`ravenp2p devnet --nodes 5 --byzantine 1`, as a
separate process, with `--json` so its report can be read) RUNS times, and in
the same invocation the baseline: the same spec (digits, the selector's CNN,
Adam) trained in this process on one thread until its holdout accuracy reaches
the same target, scored as often as the devnet's requester scores it.

Reported per run: the whole command's wall time (interpreter start, contracts,
nodes, election, the job, settlement and every claim) and the job's own time
(submission to end), and both as ratios to the local baseline.

    python benchmarks/demo.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
sys.path.insert(0, str(Path(__file__).parent))

from train import local_baseline  # the training benchmark's baseline

from ravenp2p.devnet import devnet_spec

DEMO_COMMAND = ("devnet", "--nodes", "5", "--byzantine", "1")


def demo_run(timeout: float) -> dict[str, Any]:
    """One run of the demo's command; its wall time and the job's figures."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ravenp2p.cli", *DEMO_COMMAND, "--json"],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the demo failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    return {
        "wall_seconds": round(wall, 2),
        "job_seconds": report["seconds"],
        "rounds": report["rounds"],
        "accuracy": report["test_accuracy"],
        "accepted": report["calculations_accepted"],
        "rejected": report["results_rejected"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    spec = devnet_spec()
    target = spec.stop.target_accuracy
    assert target is not None
    scored_every = spec.stop.evaluate_every * spec.calculations_per_round
    local = local_baseline(spec, target, spec.batch_size,
                           scored_every * spec.samples_per_calculation)
    runs = [demo_run(args.timeout) for _ in range(args.runs)]
    walls = [run["wall_seconds"] for run in runs]
    jobs = [run["job_seconds"] for run in runs]
    report = {
        "command": "ravenp2p " + " ".join(DEMO_COMMAND),
        "target_accuracy": target,
        "local": local,
        "runs": runs,
        "median_wall_seconds": statistics.median(walls),
        "median_job_seconds": statistics.median(jobs),
        "wall_over_local": round(statistics.median(walls) / local["seconds"], 1),
        "job_over_local": round(statistics.median(jobs) / local["seconds"], 1),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"local (1 thread): {local['seconds']:.2f} s to {target:.0%}")
    for run in runs:
        print(f"demo: {run['wall_seconds']:.1f} s in all, job {run['job_seconds']:.1f} s, "
              f"{run['rounds']} rounds, accuracy {run['accuracy']:.3f}, "
              f"{run['accepted']} accepted, {run['rejected']} rejected")
    print(f"median: {report['median_wall_seconds']:.1f} s in all "
          f"({report['wall_over_local']}x local), job {report['median_job_seconds']:.1f} s "
          f"({report['job_over_local']}x local)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
