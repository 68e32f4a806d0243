"""`ravenp2p sim`: run a simulation scenario and write its metrics and plots."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ravenp2p.cli.options import add_json
from ravenp2p.cli.output import console, print_json, print_table
from ravenp2p.cli.status import EXIT_OK


def register(commands: Any) -> None:
    """Add the sim command."""
    sim = commands.add_parser(
        "sim", help="simulate a network of many peers in virtual time",
        description="Run a scenario (a TOML file, or the name of a shipped one such as "
        "baseline, churn, byzantine-30, master-crash, wan-100 or scale-10k) with the real "
        "protocol code over an in-memory network, a virtual clock and a model chain. Writes "
        "metrics (CSV and summary.json) and plots (PNG) into --out.",
    )
    sim.add_argument("scenario", metavar="SCENARIO.toml",
                     help="scenario file, or the name of a shipped scenario")
    sim.add_argument("--out", type=Path, required=True, metavar="DIR",
                     help="folder for the metrics and plots (created)")
    sim.add_argument("--seed", type=int, default=None, metavar="N",
                     help="seed instead of the scenario's own (same seed, same results)")
    sim.add_argument("--duration", type=float, default=None, metavar="S",
                     help="virtual seconds to simulate instead of the scenario's duration_s")
    sim.add_argument("--no-plots", action="store_true", help="write the metrics only")
    sim.add_argument("--log-level", default="error",
                     choices=("debug", "info", "warning", "error"),
                     help="least important log lines of the simulated peers shown "
                     "(default error)")
    add_json(sim)
    sim.set_defaults(run=run_sim_command)


def run_sim_command(args: argparse.Namespace) -> int:
    from ravenp2p.log import configure_logging
    from sims import load_scenario, run
    from sims.plots import write_plots

    scenario = load_scenario(args.scenario)
    if args.duration is not None:
        if not args.duration > 0:
            raise ValueError(f"--duration: must be positive, got {args.duration}")
        scenario = dataclasses.replace(
            scenario, duration_s=args.duration,
            sample_every_s=min(scenario.sample_every_s, args.duration),
        )
    if args.seed is not None:
        scenario = scenario.with_seed(args.seed)
    configure_logging(args.log_level)
    with _SimProgress(scenario.name, scenario.peers, enabled=not args.json) as bar:
        result = run(scenario, progress=bar.update)
    written = result.write(args.out)
    if not args.no_plots:
        written += write_plots(result, args.out)
    if args.json:
        print_json(result.summary)
        return EXIT_OK
    print_summary(result.summary)
    console().print(f"Wrote {len(written)} files to {args.out}")
    return EXIT_OK


def print_summary(summary: dict[str, Any]) -> None:
    """The summary for people: the run, the jobs, the attackers, the money."""
    out = console()
    out.print(f"[bold]{summary['scenario']}[/bold] (seed {summary['seed']}): "
              f"{summary['peers']} peers ({summary['peers_total']} over the run), "
              f"{summary['virtual_seconds']:.0f} virtual s in {summary['wall_seconds']:.1f} s, "
              f"{summary['compute']} compute")
    print_table(
        ("job", "name", "state", "rounds", "accuracy", "accepted", "rejected", "failovers"),
        [(j["job_id"][:12], j["name"], j["state"], j["rounds"],
          None if j["accuracy"] is None else f"{j['accuracy']:.3f}", j["accepted"],
          j["rejected"], j["failovers"]) for j in summary["jobs"]],
        right=("rounds", "accuracy", "accepted", "rejected", "failovers"),
    )
    delay = summary["detection_delay_s"]["mean"]
    payouts, attackers = summary["payouts"], summary["attackers"]
    rows = [
        ("accepted results", summary["accepted_results"]),
        ("accepted bad results", f"{summary['accepted_bad_results']} "
                                 f"({summary['accepted_bad_rate']:.2%})"),
        ("rejected results", summary["results_rejected"]),
        ("verified calculations/s", f"{summary['verified_per_s']:.3f}"),
        ("mean utilisation", f"{summary['utilisation_mean']:.1%}"),
        ("bytes on links", f"{summary['bytes'] / 1e6:.1f} MB"),
        ("byzantine detected", f"{summary['byzantine_detected']} of "
                               f"{summary['byzantine_workers']}"
                               + ("" if delay is None else f", after {delay:.0f} s on average")),
        ("paid to workers", f"{payouts['workers_raven']:.4f} RAVEN (Gini {payouts['gini']:.2f})"),
        ("attackers earned / slashed", f"{attackers['earned_raven']:.4f} / "
                                       f"{attackers['slashed_raven']:.2f} RAVEN"),
    ]
    for crash in summary["master_crashes"]:
        took = crash["failover_s"]
        rows.append((f"master crash at {crash['at']:.0f} s",
                     "no takeover" if took is None else f"taken over after {took:.1f} s"))
    print_table(("measure", "value"), rows)


class _SimProgress:
    """A progress bar in virtual time, with wall time and accepted calculations beside it."""

    def __init__(self, name: str, peers: int, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            console=Console(file=sys.stderr, width=None if sys.stderr.isatty() else 200),
            auto_refresh=False, disable=not enabled,
        )
        self._task = self._progress.add_task(f"{name} ({peers} peers)", total=None,
                                             detail="starting")

    def __enter__(self) -> _SimProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.refresh()
        self._progress.stop()

    def update(self, progress: Any) -> None:
        """Redraw from a `sims.Progress`."""
        detail = (f"virtual {progress.virtual_s:.0f}/{progress.duration_s:.0f} s · wall "
                  f"{progress.wall_s:.0f} s · {progress.accepted} accepted · jobs "
                  f"{progress.jobs_done}/{progress.jobs} done")
        self._progress.update(self._task, total=progress.duration_s,
                              completed=progress.virtual_s, detail=detail)
        self._progress.refresh()
