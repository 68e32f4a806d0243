"""Whole simulations: the real roles in virtual time, reproducible, catching liars and crashes.

Scenarios here are small (a handful of peers, a few rounds) so that each run takes
seconds; the shipped scenarios are exercised by the command-line test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sims
from ravenp2p.training.spec import parse_job_spec
from sims.scenario import (
    ByzantineSettings,
    ChurnSettings,
    ComputeSettings,
    MasterCrash,
    NetworkSettings,
)

TINY_JOB = parse_job_spec("""
name = "tiny"
model = "auto"
loss = "cross_entropy"
calculation = "local_steps"
samples_per_calculation = 128
batch_size = 32
calculations_per_round = 2
redundancy = 3
[dataset]
source = "digits"
[optimizer]
name = "adam"
lr = 0.003
[stop]
max_rounds = 6
evaluate_every = 2
[payment]
price_per_calculation = "0.001"
budget = "0.1"
""")


def tiny(workers: int = 4, **changes: object) -> sims.Scenario:
    """A few peers on a LAN training a few rounds of digits."""
    base = sims.Scenario(
        name="tiny", jobs=(sims.JobEntry(TINY_JOB, reference_seconds=1.0),),
        duration_s=300, sample_every_s=5,
        network=NetworkSettings(masters=2, requesters=1, workers=workers,
                                latency_ms=sims.fixed(2.0)),
        compute=ComputeSettings(mode="real", share=sims.fixed(50)),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_job_trains_settles_and_pays_in_virtual_time() -> None:
    result = sims.run(tiny())
    summary = result.summary
    assert summary["jobs_done"] == 1 and summary["jobs"][0]["settled"]
    assert summary["accepted_results"] == 6 * 2
    assert summary["accepted_bad_results"] == 0
    assert summary["virtual_seconds"] < 300  # ended with the job, not at the deadline
    # Every accepted calculation pays its 3 workers 0.001 RAVEN, and they claimed it.
    assert summary["payouts"]["workers_raven"] == pytest.approx(12 * 3 * 0.001)
    assert sum(row["credited"] for row in result.workers) == 36
    assert result.series and result.series[-1]["accepted"] == 12
    assert summary["bytes_by_kind"]["stream"] > 0


def test_the_same_seed_gives_the_same_summary_byte_for_byte() -> None:
    scenario = tiny(workers=5, byzantine=ByzantineSettings(fraction=0.2, strategy="mixed"),
                    churn=ChurnSettings(leave_per_hour=20.0, join_per_hour=20.0, start_s=5.0))
    first, second = sims.run(scenario), sims.run(scenario)
    assert first.summary["churn"]["joined"] >= 1
    assert first.summary_bytes() == second.summary_bytes()
    assert first.series == [dict(row, wall_s=b["wall_s"]) for row, b in
                            zip(second.series, first.series, strict=True)]
    other = sims.run(scenario, seed=7)
    assert other.summary_bytes() != first.summary_bytes()


def test_lying_workers_are_outvoted_and_excluded() -> None:
    scenario = tiny(workers=6, byzantine=ByzantineSettings(fraction=0.34, strategy="random"))
    summary = sims.run(scenario).summary
    assert summary["byzantine_workers"] == 2
    assert summary["accepted_bad_results"] == 0
    assert summary["results_rejected"] >= 1
    assert summary["attackers"]["earned_raven"] == 0
    assert summary["jobs_done"] == 1


def test_a_crashed_master_is_replaced_by_the_next_in_rank() -> None:
    scenario = tiny(workers=4, master_crashes=(MasterCrash(at_s=8.0),),
                    network=NetworkSettings(masters=3, workers=4, latency_ms=sims.fixed(2.0)))
    summary = sims.run(scenario).summary
    (crash,) = summary["master_crashes"]
    assert crash["failover_s"] is not None
    # Silent for the escrow's master timeout (10 s), then the next master takes over.
    assert 5.0 <= crash["failover_s"] <= 25.0
    assert summary["jobs"][0]["failovers"] == 1 and summary["jobs_done"] == 1


def test_workers_come_and_go_and_the_job_still_finishes() -> None:
    scenario = tiny(workers=6, churn=ChurnSettings(leave_per_hour=30.0, join_per_hour=30.0,
                                                  crash_fraction=0.5, start_s=2.0))
    result = sims.run(scenario)
    summary = result.summary
    left = summary["churn"]["left"]
    assert left["crash"] + left["graceful"] >= 2 and summary["churn"]["joined"] >= 2
    assert summary["peers_total"] == summary["peers"] + summary["churn"]["joined"]
    assert any(row["left_at"] is not None for row in result.workers)
    assert summary["jobs_done"] == 1 and summary["accepted_bad_results"] == 0


def test_the_sim_command_writes_metrics_and_plots(tmp_path: Path) -> None:
    """`ravenp2p sim` on a shipped scenario, in two processes with different hash seeds."""
    out = [tmp_path / "a", tmp_path / "b"]
    summaries = []
    for i, folder in enumerate(out):
        env = {**os.environ, "PYTHONHASHSEED": str(i + 1)}
        done = subprocess.run(
            [sys.executable, "-m", "ravenp2p.cli", "sim", "baseline", "--out", str(folder),
             "--duration", "40", "--json"],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        for key in ("peers", "virtual_seconds", "wall_seconds", "accepted_bad_results",
                    "accepted_results"):
            assert key in summary
        assert summary["peers"] == 12 and summary["virtual_seconds"] == 40
        summaries.append({k: v for k, v in summary.items() if k != "wall_seconds"})
    assert summaries[0] == summaries[1]
    files = sorted(p.name for p in out[0].iterdir())
    for name in ("series.csv", "jobs.csv", "workers.csv", "events.csv", "summary.json",
                 "accuracy.png", "throughput.png", "utilisation.png", "bytes.png",
                 "rejections.png", "payouts.png", "attackers.png", "failover.png"):
        assert name in files
    assert (out[0] / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sim_command_names_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[network]\nworkers = -1\n[[jobs]]\nspec = "digits-sim"\n')
    done = subprocess.run(
        [sys.executable, "-m", "ravenp2p.cli", "sim", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2
    assert "network.workers" in done.stderr and "Traceback" not in done.stderr
