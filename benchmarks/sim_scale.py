"""How fast the simulator runs big networks: peers x virtual seconds per wall second.

Runs a scenario (default: the shipped scale-10k, 10,000 peers for an hour of
virtual time with modeled compute) and reports wall time, the rate, peak memory
(max RSS of this process) and what the network did. `--workers` and
`--duration` shrink it for a quick look.

    .venv/bin/python benchmarks/sim_scale.py [--workers N] [--duration S] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import time

import sims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scale-10k")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    scenario = sims.load_scenario(args.scenario)
    if args.workers is not None:
        scale = args.workers / scenario.network.workers
        scenario = dataclasses.replace(
            scenario, network=dataclasses.replace(scenario.network, workers=args.workers),
            jobs=tuple(dataclasses.replace(j, count=max(1, round(j.count * scale)))
                       for j in scenario.jobs),
        )
    if args.duration is not None:
        scenario = dataclasses.replace(scenario, duration_s=args.duration,
                                       sample_every_s=min(scenario.sample_every_s, args.duration))
    started = time.perf_counter()

    def progress(p: sims.Progress) -> None:
        if not args.json:
            print(f"  virtual {p.virtual_s:7.0f} s  wall {p.wall_s:6.1f} s  accepted "
                  f"{p.accepted}  jobs {p.jobs_done}/{p.jobs}", flush=True)

    result = sims.run(scenario, progress=progress)
    wall = time.perf_counter() - started
    summary = result.summary
    report = {
        "scenario": scenario.name,
        "peers": summary["peers"],
        "virtual_seconds": summary["virtual_seconds"],
        "wall_seconds": round(wall, 1),
        "peer_virtual_seconds_per_wall_second": round(
            summary["peers"] * summary["virtual_seconds"] / wall),
        "virtual_over_wall": round(summary["virtual_seconds"] / wall, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "jobs_submitted": summary["jobs_submitted"],
        "jobs_done": summary["jobs_done"],
        "accepted_results": summary["accepted_results"],
        "accepted_bad_results": summary["accepted_bad_results"],
        "bytes": summary["bytes"],
        "torch_calculations": summary["torch_calculations"],
        "calculations_computed": summary["calculations_computed"],
    }
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
