"""The simulation plots (sims/plots.py): eight valid PNGs, byte for byte repeatable.

The `Result` objects are built by hand: a few samples, two jobs (one with an
accuracy, one with only a loss), honest and byzantine workers, a master crash
and its takeover; and an empty one, which must still give every figure.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib.image

from sims.metrics import Result
from sims.plots import write_plots

NAMES = ("accuracy.png", "throughput.png", "utilisation.png", "bytes.png", "rejections.png",
         "payouts.png", "attackers.png", "failover.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JOB_A = "a1b2c3d4e5f6a7b8c9d0"
JOB_B = "0f1e2d3c4b5a69788796"


def _summary(**extra: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "scenario": "unit-plots", "seed": 7, "virtual_seconds": 0.0, "verified_per_s": 0.0,
        "utilisation_mean": 0.0, "payouts": {"gini": 0.0}, "jobs": [],
        "attackers": {"earned_raven": 0.0, "slashed_raven": 0.0}, "master_crashes": [],
        "detection_delay_s": {"mean": None, "median": None, "max": None},
    }
    summary.update(extra)
    return summary


def _worker(peer: str, earned: float, *, byzantine: bool = False, slashed: float = 0.0,
            first_bad_at: float | None = None, excluded_at: float | None = None,
            ) -> dict[str, Any]:
    return {"peer_id": "16Uiu2HAm" + peer, "device": "cpu", "share": 1.0,
            "byzantine": byzantine, "joined_at": 0.0, "left_at": None, "computed": 10,
            "delivered": 10, "credited": 8, "earned_raven": earned, "stake_raven": 10.0,
            "slashed_raven": slashed, "first_bad_at": first_bad_at, "excluded_at": excluded_at}


def _full() -> Result:
    series = []
    for i in range(6):
        t = 10.0 * i
        per_kind = {"pubsub": 2000 * i, "request": 50_000 * i, "stream": 300_000 * i, "dht": 0}
        series.append({
            "t": t, "wall_s": 0.1 * i, "live_workers": 6 - (i == 3), "busy": i % 4,
            "utilisation": (i % 4) / 6, "accepted": 5 * i, "accepted_bad": i // 3,
            "rejected": i, "verified_per_s": 0.5 if i else 0.0,
            "bytes": sum(per_kind.values()),
            **{f"bytes_{kind}": value for kind, value in per_kind.items()},
            "jobs_running": 2 if i < 5 else 1, "jobs_done": 0 if i < 5 else 1,
            "excluded_byzantine": 1 if i >= 4 else 0,
        })
    job_series = []
    for i in range(6):
        t = 10.0 * i
        job_series.append({"t": t, "job": JOB_A[:12], "name": "mnist",
                           "state": "done" if i == 5 else "training", "round": i,
                           "accuracy": None if i == 0 else 0.5 + 0.08 * i,
                           "loss": 2.0 / (i + 1), "accepted": 3 * i})
        job_series.append({"t": t, "job": JOB_B[:12], "name": "iris", "state": "training",
                           "round": i, "accuracy": float("nan") if i == 2 else None,
                           "loss": None if i == 0 else 1.5 / i, "accepted": 2 * i})
    workers = [
        _worker("honest1", 4.0), _worker("honest2", 2.5), _worker("honest3", 0.0),
        _worker("honest4", 3.0, excluded_at=33.0),
        _worker("byz1", 0.5, byzantine=True, slashed=5.0, first_bad_at=12.0, excluded_at=40.0),
        _worker("byz2", 0.0, byzantine=True, slashed=0.0, first_bad_at=30.0),
    ]
    events = [
        {"t": 33.0, "kind": "excluded", "peer": workers[3]["peer_id"], "job": JOB_A,
         "detail": "honest"},
        {"t": 40.0, "kind": "excluded", "peer": workers[4]["peer_id"], "job": JOB_A,
         "detail": "byzantine"},
        {"t": 27.5, "kind": "takeover", "peer": "16Uiu2HAmmaster2", "job": JOB_B,
         "detail": "round 2, master silent 6.0 s"},
    ]
    crashes = [
        {"at": 21.0, "master": "16Uiu2HAmmaster1", "job": JOB_B, "taken_over_at": 27.5,
         "failover_s": 6.5},
        {"at": 45.0, "master": "16Uiu2HAmmaster3", "job": None, "taken_over_at": None,
         "failover_s": None},
    ]
    summary = _summary(
        virtual_seconds=50.0, verified_per_s=0.5, utilisation_mean=0.3,
        payouts={"workers_raven": 10.0, "honest_raven": 9.5, "gini": 0.42,
                 "gini_honest": 0.3},
        attackers={"earned_raven": 0.5, "slashed_raven": 5.0}, master_crashes=crashes,
        byzantine_workers=2, byzantine_detected=1,
    )
    return Result(summary, series, job_series, workers, events)


def _write(result: Result, out: Path) -> list[Path]:
    """`write_plots`, failing on its fallback warning (a plot that raised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return write_plots(result, out)


def _check_pngs(paths: list[Path], out: Path) -> None:
    assert [p.name for p in paths] == list(NAMES)
    for path in paths:
        assert path.parent == out
        assert path.read_bytes().startswith(PNG_SIGNATURE), path.name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[2] in (3, 4), path.name
        assert image.shape[0] >= 300 and image.shape[1] >= 600, (path.name, image.shape)


def test_full_result_gives_eight_pngs_and_the_same_bytes_twice(tmp_path: Path) -> None:
    result = _full()
    first, second = tmp_path / "one", tmp_path / "two" / "nested"
    paths = _write(result, first)
    _check_pngs(paths, first)
    again = _write(result, second)
    for a, b in zip(paths, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_empty_result_still_draws_everything(tmp_path: Path) -> None:
    paths = _write(Result(_summary()), tmp_path)
    _check_pngs(paths, tmp_path)


def test_one_sample_no_accuracy_and_a_bare_summary(tmp_path: Path) -> None:
    full = _full()
    jobs = [{**row, "accuracy": None, "loss": None} for row in full.job_series[:2]]
    attackers_only = [w for w in full.workers if w["byzantine"]]
    result = Result({"scenario": "bare"}, full.series[:1], jobs, attackers_only,
                    full.events[2:])
    _check_pngs(_write(result, tmp_path), tmp_path)
