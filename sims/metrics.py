"""What a simulation measured: time series sampled in virtual time, and the summary at the end.

The recorder only reads the roles' own state (the requesters' job handles,
the masters' ledgers, the workers' calculators, the hub's counters, the model
chain): what a real requester, master or chain explorer could see, plus the
simulator's knowledge of who is byzantine (to count accepted bad results).

`Result.write(out)` writes `series.csv` (one row per sample), `jobs.csv` (one
row per job and sample), `workers.csv` (one row per worker, at the end),
`events.csv` (crashes, takeovers, exclusions) and `summary.json`. The summary
has no wall-clock figure besides `wall_seconds`, so the same scenario and
seed give the same summary byte for byte (`summary_bytes`).
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ravenp2p.roles.master import Master
from ravenp2p.roles.requester import JobHandle
from ravenp2p.roles.worker import Worker
from sims.world import World, finite, gini

RAVEN = 10**18
SERIES_FIELDS = (
    "t", "wall_s", "live_workers", "busy", "utilisation", "accepted", "accepted_bad",
    "rejected", "verified_per_s", "bytes", "bytes_pubsub", "bytes_request", "bytes_stream",
    "bytes_dht", "jobs_running", "jobs_done", "excluded_byzantine",
)
JOB_FIELDS = ("t", "job", "name", "state", "round", "accuracy", "loss", "accepted")
WORKER_FIELDS = ("peer_id", "device", "share", "byzantine", "joined_at", "left_at",
                 "computed", "delivered", "credited", "earned_raven", "stake_raven",
                 "slashed_raven", "first_bad_at", "excluded_at")
EVENT_FIELDS = ("t", "kind", "peer", "job", "detail")


@dataclass
class Result:
    """A finished simulation: the summary, the sampled series, per job and per worker rows."""

    summary: dict[str, Any]
    series: list[dict[str, Any]] = field(default_factory=list)
    job_series: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def summary_bytes(self) -> bytes:
        """The summary as canonical JSON (sorted keys), without `wall_seconds`: what repeats."""
        stable = {k: v for k, v in self.summary.items() if k != "wall_seconds"}
        return json.dumps(stable, sort_keys=True, separators=(",", ":")).encode()

    def write(self, out: Path) -> list[Path]:
        """Write the CSV files and summary.json into `out` (created); the paths written."""
        out.mkdir(parents=True, exist_ok=True)
        written = [
            _write_csv(out / "series.csv", SERIES_FIELDS, self.series),
            _write_csv(out / "jobs.csv", JOB_FIELDS, self.job_series),
            _write_csv(out / "workers.csv", WORKER_FIELDS, self.workers),
            _write_csv(out / "events.csv", EVENT_FIELDS, self.events),
        ]
        path = out / "summary.json"
        path.write_text(json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
        written.append(path)
        return written


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in fields})
    return path


def _cell(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


class Recorder:
    """Samples a running `World` every `sample_every_s` virtual seconds and sums it up."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.series: list[dict[str, Any]] = []
        self.job_series: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.excluded_at: dict[str, float] = {}
        self._wall_started = time.perf_counter()
        self._last_accepted = 0
        self._last_t = 0.0
        self._takeovers_seen: set[tuple[str, int]] = set()
        self._crashes_seen = 0

    def event(self, kind: str, peer: str = "", job: str = "", detail: str = "") -> None:
        """Note something that happened now (a crash, a takeover, an exclusion)."""
        self.events.append({"t": round(trio.current_time(), 3), "kind": kind, "peer": peer,
                            "job": job, "detail": detail})

    # --- sampling ---------------------------------------------------------------------
    def _accepted_counts(self) -> tuple[int, int]:
        byzantine = {p.peer_id for p in self.world.workers if p.byzantine}
        accepted = bad = 0
        for handle in self.world.jobs:
            for record in _latest_records(handle):
                for calc in record.accepted:
                    accepted += 1
                    if calc.workers and all(w in byzantine for w in calc.workers):
                        bad += 1
        return accepted, bad

    def _rejected(self) -> int:
        rejected = 0
        for handle in self.world.jobs:
            if handle.result is not None:
                rejected += handle.result.done.results_rejected
                continue
            for peer in self.world.masters:  # the job's current master only
                status = _master(peer.role).jobs.get(handle.job_id)
                if status is not None and peer.alive and peer.peer_id == handle.master:
                    rejected += status.results_rejected
        return rejected

    def _note_exclusions(self) -> None:
        byzantine = {p.peer_id for p in self.world.workers if p.byzantine}
        now = trio.current_time()
        for peer in self.world.masters:
            if not peer.alive:
                continue
            master = _master(peer.role)
            for handle in self.world.jobs:
                for worker in sorted(master.excluded_workers(handle.job_id)):
                    if worker not in self.excluded_at:
                        self.excluded_at[worker] = now
                        self.event("excluded", worker, handle.job_id,
                                   "byzantine" if worker in byzantine else "honest")

    def _note_crashes(self) -> None:
        for crash in self.world.crashes[self._crashes_seen:]:
            self.events.append({"t": round(crash.crashed_at, 3), "kind": "crash",
                                "peer": crash.master, "job": crash.job or "",
                                "detail": "master killed without a word"})
        self._crashes_seen = len(self.world.crashes)

    def _note_takeovers(self) -> None:
        for handle in self.world.jobs:
            for failover in handle.failovers:
                key = (handle.job_id, failover.round)
                if key in self._takeovers_seen:
                    continue
                self._takeovers_seen.add(key)
                self.events.append({
                    "t": round(failover.at, 3), "kind": "takeover", "peer": failover.new_master,
                    "job": handle.job_id,
                    "detail": f"round {failover.round}, master silent {failover.silent_s:.1f} s",
                })

    def sample(self) -> None:
        """One row of the series (and one per job)."""
        world = self.world
        now = trio.current_time()
        self._note_exclusions()
        self._note_crashes()
        self._note_takeovers()
        live = world.live_workers()
        accepted, bad = self._accepted_counts()
        elapsed = now - self._last_t
        rate = (accepted - self._last_accepted) / elapsed if elapsed > 0 else 0.0
        self._last_accepted, self._last_t = accepted, now
        sent = world.hub.stats.bytes_sent
        byzantine = [p for p in world.workers if p.byzantine]
        self.series.append({
            "t": round(now, 3),
            "wall_s": round(time.perf_counter() - self._wall_started, 3),
            "live_workers": len(live),
            "busy": world.ledger.busy,
            "utilisation": world.ledger.busy / len(live) if live else 0.0,
            "accepted": accepted,
            "accepted_bad": bad,
            "rejected": self._rejected(),
            "verified_per_s": rate,
            "bytes": sum(sent.values()),
            **{f"bytes_{kind}": sent.get(kind, 0)
               for kind in ("pubsub", "request", "stream", "dht")},
            "jobs_running": sum(1 for h in world.jobs if h.result is None),
            "jobs_done": sum(1 for h in world.jobs if h.result is not None),
            "excluded_byzantine": sum(1 for p in byzantine if p.peer_id in self.excluded_at),
        })
        for handle in world.jobs:
            status = handle.status()
            self.job_series.append({
                "t": round(now, 3), "job": handle.job_id, "name": status["name"],
                "state": status["state"], "round": status["round"],
                "accuracy": finite(status["accuracy"]), "loss": finite(status["loss"]),
                "accepted": status["calculations_accepted"],
            })

    # --- the end ------------------------------------------------------------------------
    async def finish(self) -> Result:
        """The final sample, per-worker rows from the chain, and the summary."""
        self.sample()
        world = self.world
        workers = []
        credited: dict[str, int] = {}
        for handle in world.jobs:
            if handle.result is not None:
                for credit in handle.result.done.credits:
                    credited[credit.worker] = credited.get(credit.worker, 0) + credit.accepted
        any_account = world.masters[0].node.chain
        assert any_account is not None
        for peer in world.workers:
            earned = (await any_account.earnings(peer.identity.address)).claimed
            stake = (await any_account.stake_of(peer.identity.address)).active
            slashed = max(0, peer.stake - stake)
            role = peer.role
            assert isinstance(role, Worker)
            workers.append({
                "peer_id": peer.peer_id, "device": peer.device.name if peer.device else "",
                "share": peer.node.config.share, "byzantine": peer.byzantine,
                "joined_at": round(peer.joined_at, 3),
                "left_at": None if peer.left_at is None else round(peer.left_at, 3),
                "computed": role.stats.computed, "delivered": role.stats.delivered,
                "credited": credited.get(peer.peer_id, 0),
                "earned_raven": earned / RAVEN, "stake_raven": stake / RAVEN,
                "slashed_raven": slashed / RAVEN,
                "first_bad_at": peer.first_bad_at,
                "excluded_at": self.excluded_at.get(peer.peer_id),
            })
        summary = self._summary(workers)
        summary["wall_seconds"] = round(time.perf_counter() - self._wall_started, 3)
        return Result(summary, self.series, self.job_series, workers, self.events)

    def _summary(self, workers: list[dict[str, Any]]) -> dict[str, Any]:
        world = self.world
        scenario = world.scenario
        accepted, bad = self._accepted_counts()
        now = trio.current_time()
        honest = [w for w in workers if not w["byzantine"]]
        attackers = [w for w in workers if w["byzantine"]]
        delays = [w["excluded_at"] - w["first_bad_at"] for w in attackers
                  if w["excluded_at"] is not None and w["first_bad_at"] is not None]
        utilisation = [row["utilisation"] for row in self.series]
        jobs = []
        for handle in world.jobs:
            status = handle.status()
            jobs.append({
                "job_id": handle.job_id, "name": status["name"], "state": status["state"],
                "rounds": status["round"], "accuracy": finite(status["accuracy"]),
                "loss": finite(status["loss"]), "accepted": status["calculations_accepted"],
                "rejected": status["results_rejected"], "failovers": status["failovers"],
                "settled": bool(status["settle_tx"]),
            })
        crashes = []
        for crash in world.crashes:
            takeover = next((e for e in self.events if e["kind"] == "takeover"
                             and e["job"] == crash.job and e["t"] >= crash.crashed_at), None)
            crashes.append({
                "at": round(crash.crashed_at, 3), "master": crash.master, "job": crash.job,
                "taken_over_at": None if takeover is None else takeover["t"],
                "failover_s": (None if takeover is None
                               else round(takeover["t"] - crash.crashed_at, 3)),
            })
        sent = world.hub.stats.bytes_sent
        earned = [w["earned_raven"] for w in workers]
        rounds = [s for peer in world.masters for s in _master(peer.role).round_seconds]
        return {
            "scenario": scenario.name,
            "seed": scenario.seed,
            "peers": scenario.peers,
            "peers_total": len(world.peers),
            "virtual_seconds": round(now, 3),
            "compute": scenario.compute.mode,
            "jobs": jobs,
            "jobs_submitted": len(world.jobs),
            "jobs_refused": len(world.submit_errors),
            "jobs_done": sum(1 for j in jobs if j["state"] == "done"),
            "accepted_results": accepted,
            "accepted_bad_results": bad,
            "accepted_bad_rate": bad / accepted if accepted else 0.0,
            "results_rejected": self._rejected(),
            "verified_per_s": accepted / now if now > 0 else 0.0,
            "rounds": len(rounds),
            "round_seconds": _stats(rounds),
            "calculations_computed": world.ledger.calculations,
            "torch_calculations": world.ledger.torch_calculations,
            "utilisation_mean": statistics.fmean(utilisation) if utilisation else 0.0,
            "bytes": sum(sent.values()),
            "bytes_by_kind": dict(sorted(sent.items())),
            "churn": {"left": dict(world.departures), "joined": world.arrivals},
            "byzantine_workers": len(attackers),
            "byzantine_detected": len(delays),
            "detection_delay_s": _stats(delays),
            "payouts": {
                "workers_raven": sum(earned),
                "honest_raven": sum(w["earned_raven"] for w in honest),
                "gini": gini(earned),
                "gini_honest": gini([w["earned_raven"] for w in honest]),
            },
            "attackers": {
                "earned_raven": sum(w["earned_raven"] for w in attackers),
                "slashed_raven": sum(w["slashed_raven"] for w in attackers),
            },
            "master_crashes": crashes,
        }


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "max": None}
    return {"mean": round(statistics.fmean(values), 3),
            "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def _latest_records(handle: JobHandle) -> list[Any]:
    """The job's round records, the newest per round (a takeover may rewrite rounds)."""
    latest: dict[int, Any] = {}
    for record in handle.rounds:
        latest[record.round] = record
    return [latest[r] for r in sorted(latest)]


def _master(role: object) -> Master:
    assert isinstance(role, Master)
    return role
