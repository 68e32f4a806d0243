"""Sweep: how redundancy R holds off colluding liars.

For each byzantine fraction and each R, simulate the same digits job with 15
workers, the liars colluding (they all return minus the honest result, so they
agree with each other), and report the share of accepted calculations whose
result came from liars only, and the job's final holdout accuracy. Writes the
table to stdout and the plot to docs/images/sweep-byzantine.png.

    .venv/bin/python docs/examples/sweep_byzantine.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import sims
from ravenp2p.training.spec import load_job_spec
from sims.scenario import JOBS_DIR

FRACTIONS = (0.0, 0.2, 0.4, 0.6)
REDUNDANCY = (1, 2, 3, 5)
OUT = Path(__file__).resolve().parents[1] / "images" / "sweep-byzantine.png"


def scenario(fraction: float, redundancy: int) -> sims.Scenario:
    """byzantine-30, shrunk: 15 workers lending 10, 25 or 50%, modeled compute, 12 rounds
    of digits-sim, colluding liars."""
    base = sims.load_scenario("byzantine-30")
    spec = load_job_spec(JOBS_DIR / "digits-sim.toml")
    spec = dataclasses.replace(spec, stop=dataclasses.replace(
        spec.stop, max_rounds=12, target_accuracy=None))
    jobs = sims.with_redundancy((dataclasses.replace(base.jobs[0], spec=spec),), redundancy)
    return dataclasses.replace(
        base, name=f"sweep-f{fraction}-r{redundancy}", jobs=jobs, duration_s=900,
        network=dataclasses.replace(base.network, workers=15),
        compute=dataclasses.replace(base.compute, mode="modeled", share=sims.Distribution(
            kind="choice", values=(10.0, 25.0, 50.0))),
        byzantine=sims.ByzantineSettings(fraction=fraction, strategy="colluding"),
    )


def main() -> None:
    rows = []
    print(f"{'fraction':>8} {'R':>3} {'accepted':>9} {'bad':>5} {'bad rate':>9} {'accuracy':>9}")
    for redundancy in REDUNDANCY:
        for fraction in FRACTIONS:
            summary = sims.run(scenario(fraction, redundancy)).summary
            accuracy = summary["jobs"][0]["accuracy"] if summary["jobs"] else None
            rows.append((fraction, redundancy, summary["accepted_bad_rate"], accuracy))
            print(f"{fraction:8.1f} {redundancy:3d} {summary['accepted_results']:9d} "
                  f"{summary['accepted_bad_results']:5d} {summary['accepted_bad_rate']:9.1%} "
                  f"{'-' if accuracy is None else f'{accuracy:.3f}':>9}", flush=True)
    figure = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    bad, acc = figure.subplots(1, 2)
    for redundancy in REDUNDANCY:
        mine = [r for r in rows if r[1] == redundancy]
        bad.plot([r[0] for r in mine], [100 * r[2] for r in mine], marker="o",
                 label=f"R = {redundancy}")
        acc.plot([r[0] for r in mine], [r[3] if r[3] is not None else float("nan")
                                        for r in mine], marker="o", label=f"R = {redundancy}")
    bad.set(xlabel="share of workers colluding", ylabel="accepted results from liars only (%)",
            title="Accepted bad results")
    acc.set(xlabel="share of workers colluding", ylabel="final holdout accuracy",
            title="Final accuracy (digits, 12 rounds)")
    for axis in (bad, acc):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Redundancy against colluding liars (15 workers, simulated)")
    figure.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUT, metadata={"Software": None})
    print(f"Wrote {OUT}")


if __name__ == "__main__":
    main()
